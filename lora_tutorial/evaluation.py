"""Evaluation: answer a set of questions, score EM/F1 with 95 % intervals, write the predictions.

Two ways in, as in NeMo's tutorial:

* ``evaluate(cfg)`` is ``python -m lora_tutorial evaluate``: restore the base, load the adapter, set
  the inference config, ``trainer.predict`` over ``model.data.test_ds``, score, write a jsonl.
* ``answer_dataset(model, ds_cfg)`` is the same work without a Trainer, for notebook cells and scripts:
  one call, one progress bar.

Both batch prompts of similar length together (``SFTDataset.indices_by_length``), so that little time
goes into padding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from .files import write_jsonl
from .metrics import Scores, score_predictions
from .peft import adapter_parameters, disable_adapters
from .peft.lora import merged_for_inference
from .prepack import packed_for_evaluation
from .progress import progress_bar
from .quantize import quantize_int8
from .sft_model import SFTModel, collect_predictions
from .training import build_trainer


@dataclass
class Evaluation:
    """Answers to a set of questions and their scores (``prompts``, ``answers``, ``golds`` line up)."""

    scores: Scores
    prompts: list[str]
    answers: list[str]
    golds: list[list[str]]
    seconds: float


def answer_dataset(model: SFTModel, ds_cfg: DictConfig, use_chat_template: bool = False,
                   batch_size: int | None = None, desc: str = "evaluate", progress: bool = True) -> Evaluation:
    """Greedy answers of ``model`` to every question of one ``model.data.*_ds`` section, scored.

    Questions are generated ``batch_size`` at a time (default: the section's ``micro_batch_size``, else
    16), sorted by prompt length so that a batch pads little."""
    dataset = model.build_dataset(ds_cfg)
    batch_size = batch_size or ds_cfg.get("micro_batch_size") or 16
    loader = DataLoader(dataset, batch_size=batch_size, sampler=dataset.indices_by_length(),
                        collate_fn=model.collator())
    prompts, answers, golds = [], [], []
    started = time.perf_counter()
    # one matmul per adapted layer instead of three; then bf16 weights packed once for oneDNN (prepack.py)
    with merged_for_inference(model.model), packed_for_evaluation(model.model):
        for batch in progress_bar(loader, desc=desc, unit="batch", disable=not progress):
            answers += model.generate_answers(batch, use_chat_template=use_chat_template, greedy=True)
            golds += batch["answers"]
            prompts += batch["prompts"]
    return Evaluation(score_predictions(answers, golds), prompts, answers, golds, time.perf_counter() - started)


def compare_base_and_tuned(model: SFTModel, ds_cfg: DictConfig, progress: bool = True) -> dict[str, Evaluation]:
    """The same questions twice: the base model (adapters off, chat template: its fair zero-shot setting)
    and base + adapter (the training prompt)."""
    with disable_adapters(model.model):
        base = answer_dataset(model, ds_cfg, use_chat_template=True, desc="base", progress=progress)
    tuned = answer_dataset(model, ds_cfg, desc="base + adapter", progress=progress)
    return {"base (chat template)": base, "base + adapter": tuned}


def evaluate(cfg: DictConfig, model: SFTModel | None = None, trainer: pl.Trainer | None = None) -> Evaluation:
    """Predict on ``model.data.test_ds`` with ``trainer.predict``, score EM/F1 and write predictions jsonl.

    With ``inference.quantize_int8`` the model (also one passed in) is frozen and quantized in place:
    use it for inference only afterwards.
    """
    trainer = trainer or build_trainer(cfg, devices=1, num_nodes=1, strategy="auto")
    if model is None:  # a bf16 trainer loads the frozen weights in bf16 (faster generation on most CPUs)
        model = SFTModel.restore_from(cfg.model.restore_from_path, cfg, trainer)
        if cfg.model.peft.restore_from_path:
            model.load_adapters(cfg.model.peft.restore_from_path)
    if cfg.inference.quantize_int8:  # evaluation only: freeze the base so that every base linear layer is quantized
        adapters = {id(p) for p in adapter_parameters(model.model).values()}
        for p in model.model.parameters():
            p.requires_grad_(id(p) in adapters)
        quantize_int8(model.model)
    model.set_inference_config(cfg.inference)
    dataloader = model.build_dataloader(cfg.model.data.test_ds)
    started = time.perf_counter()
    answers, golds, prompts = collect_predictions(trainer.predict(model, dataloader))
    result = Evaluation(score_predictions(answers, golds), prompts, answers, golds, time.perf_counter() - started)
    if cfg.inference.output_file:
        write_predictions(cfg.inference.output_file, prompts, answers, golds)
    return result


def write_predictions(path: str | Path, prompts: Sequence[str], answers: Sequence[str],
                      golds: Sequence[Sequence[str]]) -> Path:
    """One line per question: the prompt, the model's answer and every gold answer."""
    return write_jsonl(({"input": p, "prediction": a, "answers": list(g)} for p, a, g in zip(prompts, answers, golds)),
                       path)


__all__ = ["Evaluation", "answer_dataset", "compare_base_and_tuned", "evaluate", "write_predictions"]
