"""``StepProgressBar``: the Lightning callback behind the trainer's one-line bar.

During ``fit`` it counts optimizer steps (not micro-batches) and shows the latest training loss and
validation scores next to the bar; during ``predict`` it counts batches of questions. The bar itself is
``progress.progress_bar`` (plain ``tqdm`` in a terminal, a line updated in place in a notebook).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from tqdm.std import tqdm as std_tqdm

from .progress import progress_bar


class StepProgressBar(pl.Callback):
    """A one-line bar over the optimizer steps of ``trainer.fit``, with the loss and validation scores."""

    def __init__(self) -> None:
        self.bar: std_tqdm | None = None
        self.postfix: dict[str, str] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.bar = progress_bar(total=trainer.max_steps, initial=trainer.global_step, desc="train", unit="step")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.bar is None or trainer.global_step <= self.bar.n:
            return
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            self.postfix["loss"] = f"{float(loss):.3f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.set_postfix({**self.postfix, "validating": "..."})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is None:
            return
        for key in ("val_loss", "val_f1"):
            if key in trainer.callback_metrics:
                self.postfix[key] = f"{float(trainer.callback_metrics[key]):.3g}"
        self.bar.set_postfix(self.postfix)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.bar = progress_bar(total=sum(trainer.num_predict_batches), desc="predict", unit="batch")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["StepProgressBar"]
