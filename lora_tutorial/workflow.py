"""The tutorial's two jobs as functions: train from a config, evaluate from a config.

These are what ``python -m lora_tutorial train|evaluate`` run, and what the notebooks show cell by cell.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import load_config
from .metrics import score_predictions
from .sft_model import SFTModel, collect_predictions
from .training import adapter_path_of, build_trainer, exp_manager


def train(cfg: DictConfig) -> dict:
    """Fine-tune as configured; returns the log dir, adapter path, wall time and final metrics."""
    from .peft import peft_configs_from_scheme

    pl.seed_everything(cfg.model.seed, verbose=False)
    trainer = build_trainer(cfg)
    log_dir = exp_manager(trainer, cfg)
    model = SFTModel.restore_from(cfg.model.restore_from_path, cfg, trainer)
    model.add_adapter(peft_configs_from_scheme(cfg.model))
    if cfg.model.peft.restore_from_path:
        model.load_adapters(cfg.model.peft.restore_from_path)
    started = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {"log_dir": log_dir, "adapter": adapter_path_of(cfg), "train_seconds": seconds, "metrics": metrics,
            "model": model, "trainer": trainer}


def train_from_config(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    result = train(load_config(path, overrides))
    if result["trainer"].is_global_zero:
        print(f"Training took {result['train_seconds']:.0f} s; adapter: {result['adapter']}")
    return result


def evaluate(cfg: DictConfig, model: SFTModel | None = None, trainer: pl.Trainer | None = None) -> dict:
    """Predict on ``model.data.test_ds`` with ``trainer.predict``, score EM/F1 and write predictions jsonl.

    With ``inference.quantize_int8`` the model (also one passed in) is frozen and quantized in place:
    use it for inference only afterwards.
    """
    if model is None:
        model = SFTModel.restore_from(cfg.model.restore_from_path, cfg)
        if cfg.model.peft.restore_from_path:
            model.load_adapters(cfg.model.peft.restore_from_path)
    if cfg.inference.quantize_int8:
        from .quantize import quantize_int8

        model.model.requires_grad_(False)  # evaluation only: every base linear layer may be quantized
        quantize_int8(model.model)
    model.set_inference_config(cfg.inference)
    trainer = trainer or build_trainer(cfg, devices=1, num_nodes=1, strategy="auto")
    dataloader = model.build_dataloader(cfg.model.data.test_ds)
    started = time.perf_counter()
    response = trainer.predict(model, dataloader)
    seconds = time.perf_counter() - started
    answers, golds, prompts = collect_predictions(response)
    scores = score_predictions(answers, golds)
    out = cfg.inference.output_file
    if out:
        write_predictions(out, prompts, answers, golds)
    return {"scores": scores, "answers": answers, "golds": golds, "prompts": prompts, "seconds": seconds,
            "output_file": out}


def evaluate_from_config(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    cfg = load_config(path, overrides)
    if not cfg.inference.output_file:
        base = Path(cfg.model.peft.restore_from_path).parent if cfg.model.peft.restore_from_path else Path(".")
        OmegaConf.update(cfg, "inference.output_file", str(base / "predictions.jsonl"))
    result = evaluate(cfg)
    s = result["scores"]
    print(f"EM {s['exact_match']:.1f}  F1 {s['f1']:.1f}  on {s['n']} questions "
          f"({result['seconds']:.0f} s); predictions: {result['output_file']}")
    return result


def write_predictions(path: str | Path, prompts: Sequence[str], answers: Sequence[str],
                      golds: Sequence[Sequence[str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for prompt, answer, gold in zip(prompts, answers, golds):
            f.write(json.dumps({"input": prompt, "prediction": answer, "answers": list(gold)},
                               ensure_ascii=False) + "\n")
    return path


def evaluate_quick(model: SFTModel, ds_cfg: DictConfig, use_chat_template: bool = False,
                   batch_size: int = 16, progress: bool = True) -> dict:
    """EM/F1 of ``model`` on a dataset without a Trainer (for notebook cells: one call, a progress bar)."""
    dataset = model.build_dataset(ds_cfg)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate_fn)
    answers, golds = [], []
    for batch in tqdm(loader, desc="evaluate", disable=not progress):
        answers += model.generate_answers(batch, use_chat_template=use_chat_template, greedy=True)
        golds += batch["answers"]
    return {"scores": score_predictions(answers, golds), "answers": answers, "golds": golds}
