"""``SFTModel``: the LightningModule that fine-tunes a base model with PEFT (NeMo's ``MegatronGPTSFTModel``).

It holds the base ``GPT`` (``self.model``), its tokenizer and the config, and mirrors NeMo's flow::

    model = SFTModel.restore_from(cfg.model.restore_from_path, cfg, trainer)
    model.add_adapter(LoraPEFTConfig(cfg.model))
    trainer.fit(model)                                  # answer-only loss; val_loss and EM/F1
    ...
    model.load_adapters(path)
    model.set_inference_config(cfg.inference)
    response = trainer.predict(model, dataloader)       # batches of {"sentences", "answers", ...}

Lightning does the loop, devices, precision, accumulation, clipping and checkpointing; this file only
says what one step computes and where the data comes from. Checkpoints keep only the trainable (adapter)
tensors: the frozen base is reloaded from its own file, so a checkpoint is megabytes, not 540 MB.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from .config import default_config
from .generation import PAD_MULTIPLE, generate_ids, stop_token_ids
from .metrics import clean_prediction, score_predictions
from .model import GPT
from .peft import PEFTConfig, ParameterSummary, add_adapter, load_adapters
from .peft.lora import merged_for_inference
from .precision import cast_frozen_weights
from .prepack import packed_for_evaluation
from .pretrained import load_base_model
from .qlora import quantize_base
from .sampler import ResumableRandomSampler
from .sft_data import SFTCollator, SFTDataset
from .squad import chat_format, chat_message, chat_wrapping, split_context
from .tokenizer import Tokenizer

MIXED_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # Lightning precision -> frozen dtype


class SFTModel(pl.LightningModule):
    """Supervised fine-tuning of ``GPT`` with answer-only loss and SQuAD EM/F1 validation."""

    def __init__(self, cfg: DictConfig, model: GPT, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model.train()  # loaders return eval mode; Lightning switches modes from here on
        self.model.activations_checkpointing = cfg.model.activations_checkpointing
        self.tokenizer = tokenizer
        self.inference_cfg: dict[str, Any] = OmegaConf.to_container(cfg.inference, resolve=True)
        self.strict_loading = False  # checkpoints hold the adapter tensors only
        self._step_losses: list[torch.Tensor] = []
        self._val_predictions: list[str] = []
        self._val_references: list[list[str]] = []

    # -- construction, as in NeMo ---------------------------------------------------------------

    @classmethod
    def restore_from(cls, restore_path: str | None = None, cfg: DictConfig | None = None,
                     trainer: pl.Trainer | None = None) -> "SFTModel":
        """Load the base model (name, .gguf or HF directory) and wrap it.

        With a ``trainer`` whose precision is ``bf16-mixed`` the frozen matrices are loaded straight in
        bf16 (from a bf16 cache file after the first time), so no float32 copy of the base is ever made.
        """
        cfg = cfg if cfg is not None else default_config()
        dtype = MIXED_DTYPES.get(str(trainer.precision), torch.float32) if trainer is not None else torch.float32
        model, tokenizer = load_base_model(restore_path or cfg.model.restore_from_path, dtype=dtype)
        quantize_base(model, cfg.model.quantized_base)  # QLoRA (qlora.py); None leaves the base as loaded
        return cls(cfg, model, tokenizer)

    def add_adapter(self, peft_cfgs: PEFTConfig | Sequence[PEFTConfig]) -> ParameterSummary:
        """Freeze the base and insert the PEFT modules (``lora_tutorial.peft.add_adapter``); returns the summary."""
        return add_adapter(self.model, peft_cfgs)

    def load_adapters(self, path: str, name: str = "default") -> list[PEFTConfig]:
        """Load an adapter file written by training (the PEFT configs are stored in it) as the adapter
        ``name``; load several under different names and switch with ``peft.set_adapter``."""
        return load_adapters(self.model, path, name=name)

    def set_inference_config(self, inference_cfg: dict | DictConfig) -> None:
        """Update the decoding options (``greedy``, ``tokens_to_generate``...) used by ``predict_step``."""
        if isinstance(inference_cfg, DictConfig):
            inference_cfg = OmegaConf.to_container(inference_cfg, resolve=True)
        unknown = set(inference_cfg) - set(self.inference_cfg)
        if unknown:
            raise ValueError(f"set_inference_config: unknown key(s) {sorted(unknown)}; "
                             f"expected some of {sorted(self.inference_cfg)}")
        self.inference_cfg.update(inference_cfg)

    def setup(self, stage: str) -> None:
        """Under ``bf16-mixed`` / ``16-mixed``, store the frozen weights in that dtype (see precision.py).

        Autocast would round them at every matmul anyway; stored rounded they take half the memory and
        skip that conversion. The adapters stay float32. (A no-op when ``restore_from`` already loaded them so.)
        """
        dtype = MIXED_DTYPES.get(str(self.trainer.precision))
        if dtype is not None:
            cast_frozen_weights(self.model, dtype)

    # -- data ----------------------------------------------------------------------------------

    def build_dataset(self, ds_cfg: DictConfig, is_train: bool = False) -> SFTDataset:
        """An ``SFTDataset`` from one ``model.data.*_ds`` section (SQuAD prompts: only the context is cut)."""
        return SFTDataset(
            list(ds_cfg.file_names), self.tokenizer, max_seq_length=ds_cfg.max_seq_length,
            prompt_template=ds_cfg.prompt_template, add_bos=ds_cfg.add_bos, add_eos=ds_cfg.add_eos,
            truncation_field=ds_cfg.truncation_field, answer_only_loss=ds_cfg.answer_only_loss,
            concat_sampling_probabilities=ds_cfg.concat_sampling_probabilities if is_train else None,
            num_samples=ds_cfg.num_samples if is_train else None, seed=self.cfg.model.seed, limit=ds_cfg.limit,
            context_splitter=split_context, prompt_format=chat_format(self.tokenizer) if ds_cfg.chat_template else None)

    def build_dataloader(self, ds_cfg: DictConfig, is_train: bool = False,
                         dataset: SFTDataset | None = None) -> DataLoader:
        """Training: a resumable shuffled stream; evaluation: batches of similar prompt length, so that
        generation pads little (results come back with their golds, so the order does not matter)."""
        dataset = dataset if dataset is not None else self.build_dataset(ds_cfg, is_train)
        batch_size = ds_cfg.micro_batch_size or self.cfg.model.micro_batch_size
        sampler = self._train_sampler(dataset) if is_train else dataset.indices_by_length()
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.collator(),
                          num_workers=ds_cfg.num_workers, persistent_workers=ds_cfg.num_workers > 0)

    def collator(self) -> SFTCollator:
        """Right-padding to a multiple of 32 tokens: a few dozen shapes for the CPU's kernels (sft_data.py)."""
        return SFTCollator(self.tokenizer.pad_id, pad_to_multiple_of=PAD_MULTIPLE)

    def _train_sampler(self, dataset: SFTDataset) -> ResumableRandomSampler:
        """Exactly the examples the remaining optimizer steps need, starting after those already seen,
        in micro-batches of similar length when ``length_grouping`` is on."""
        trainer, ds_cfg, micro = self.trainer, self.cfg.model.data.train_ds, self.cfg.model.micro_batch_size
        per_step = micro * trainer.accumulate_grad_batches
        max_steps = trainer.max_steps if trainer.max_steps > 0 else math.ceil(
            (trainer.max_epochs or 1) * len(dataset) / (per_step * trainer.world_size))
        start = self.global_step * per_step
        grouped = ds_cfg.length_grouping and micro > 1
        return ResumableRandomSampler(len(dataset), max_steps * per_step - start, seed=self.cfg.model.seed, start=start,
                                      rank=trainer.global_rank, world_size=trainer.world_size, shuffle=ds_cfg.shuffle,
                                      length_of=dataset.token_length if grouped else None,
                                      group=32 * micro * trainer.world_size, batch=micro)

    def train_dataloader(self) -> DataLoader:
        return self.build_dataloader(self.cfg.model.data.train_ds, is_train=True)

    def val_dataloader(self) -> DataLoader:
        return self.build_dataloader(self.cfg.model.data.validation_ds)

    # -- steps ---------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Batches are right-padded: under causal attention real tokens never look at the pads to their
        # right, and pad labels are -100, so no attention mask is needed (the fast causal kernel runs).
        loss = self.model.loss(batch["input_ids"], batch["labels"])
        self._step_losses.append(loss.detach())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log one training loss per optimizer step: the mean over its accumulated micro-batches."""
        if self._step_losses:
            self.log("train_loss", torch.stack(self._step_losses).mean(), prog_bar=True)
            self.log("lr", optimizer.param_groups[0]["lr"])
            # this step, counted from 1 (see analysis.read_metrics)
            self.log("trained_steps", float(self.global_step + 1))
        self._step_losses = []

    def configure_callbacks(self) -> list[pl.Callback]:
        return [MergedWhileGenerating()]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.model.loss(batch["input_ids"], batch["labels"])
        self.log("val_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        ds_cfg = self.cfg.model.data.validation_ds
        if ds_cfg.metric == "squad":
            self._val_predictions += self.generate_answers(batch, tokens_to_generate=ds_cfg.tokens_to_generate,
                                                           greedy=True)
            self._val_references += batch["answers"]

    def on_validation_epoch_end(self) -> None:
        if self._val_predictions:
            scores = score_predictions(self._val_predictions, self._val_references)
            self.log("val_em", scores.exact_match, prog_bar=True)
            self.log("val_f1", scores.f1, prog_bar=True)
        self.log("trained_steps", float(self.global_step))  # 0: measured before any training
        self._val_predictions, self._val_references = [], []

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, list]:
        """Generate with the inference config; ``sentences`` = prompt + answer (as NeMo), ``answers`` = answer."""
        answers = self.generate_answers(batch)
        return {"sentences": [p + " " + a for p, a in zip(batch["prompts"], answers)], "answers": answers,
                "prompts": batch["prompts"], "golds": batch["answers"]}

    # -- generation ----------------------------------------------------------------------------

    def prompt_ids(self, batch: dict, use_chat_template: bool = False) -> list[list[int]]:
        """The token ids to generate from: each example's (possibly truncated) prompt, or the prompt as
        one message in the base model's chat template (the fair zero-shot setting for an instruct model)."""
        if not use_chat_template or batch["prompts"][0].startswith(chat_wrapping(self.tokenizer)[0]):  # already in it
            return [ids[:n].tolist() for ids, n in zip(batch["input_ids"], batch["prompt_lens"])]
        chats = [self.tokenizer.apply_chat_template([{"role": "user", "content": chat_message(p)}])
                 for p in batch["prompts"]]
        return [self.tokenizer.encode(c) for c in chats]

    @torch.no_grad()
    def generate_answers(self, batch: dict, generator: torch.Generator | None = None, **overrides: Any) -> list[str]:
        """Answers (cleaned: first line, no special tokens) for one collated batch.

        ``overrides`` change the inference config for this call; ``generator`` makes sampling repeatable.
        """
        opts = {**self.inference_cfg, **overrides}
        prompts = self.prompt_ids(batch, opts["use_chat_template"])
        # An answer is its first line (metrics.clean_prediction), so a row may end at its first newline.
        newlines, blanks = self.newline_and_blank_ids()
        new_ids = generate_ids(self.model, prompts, tokens_to_generate=opts["tokens_to_generate"],
                               greedy=opts["greedy"], temperature=opts["temperature"], top_k=opts["top_k"],
                               top_p=opts["top_p"], repetition_penalty=opts["repetition_penalty"],
                               stop_ids=stop_token_ids(self.tokenizer), pad_id=self.tokenizer.pad_id,
                               generator=generator, end_ids=newlines, blank_ids=blanks)
        return [clean_prediction(self.tokenizer.decode(ids)) for ids in new_ids]

    def newline_and_blank_ids(self) -> tuple[list[int], list[int]]:
        """The vocabulary's tokens that hold a newline, and those that are only whitespace (computed once)."""
        if not hasattr(self, "_newlines_and_blanks"):
            self._newlines_and_blanks = (self.tokenizer.ids_where(lambda text: "\n" in text),
                                         self.tokenizer.ids_where(lambda text: not text.strip()))
        return self._newlines_and_blanks

    # -- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        optim = self.cfg.model.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: call add_adapter(...) before trainer.fit(model)")
        cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
        optimizer = cls(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        schedule = warmup_cosine(optim.sched.warmup_steps, total, optim.sched.min_lr / optim.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: adapter tensors only -------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the trainable tensors, and PiSSA / OLoRA's initial factors (``lora_A0``, ``lora_B0``: buffers
        that resuming needs in the state dict; ``add_adapter`` recomputes the same values on resume)."""
        trainable = {"model." + n for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trainable or k.endswith((".lora_A0", ".lora_B0"))}


class MergedWhileGenerating(pl.Callback):
    """Validation and prediction only read the model, so LoRA runs merged there (one matmul per adapted
    layer instead of three: ``peft.lora.merged_for_inference``) with its bf16 weights packed for oneDNN
    (``prepack.packed_for_evaluation``); the base weights are put back exactly when the loop ends, and also
    when it fails or is interrupted (``on_exception``), so training never resumes on merged weights."""

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None

    def _enter(self, pl_module: pl.LightningModule) -> None:
        self._exit()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(merged_for_inference(pl_module.model))
        self._stack.enter_context(packed_for_evaluation(pl_module.model))  # after merging: pack the merged weights

    def _exit(self, *_: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(pl_module)

    on_validation_end = on_predict_end = on_exception = _exit


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def collect_predictions(response: Sequence[dict]) -> tuple[list[str], list[list[str]], list[str]]:
    """Flatten ``trainer.predict`` batches into (answers, gold lists, prompts)."""
    answers, golds, prompts = [], [], []
    for batch in response:
        answers += batch["answers"]
        golds += batch["golds"]
        prompts += batch["prompts"]
    return answers, golds, prompts


__all__ = ["SFTModel", "collect_predictions", "warmup_cosine"]
