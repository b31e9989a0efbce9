"""One-line progress bars that look right in a terminal, in a live notebook and in a *saved* notebook.

In a terminal this is plain ``tqdm`` on stderr. In Jupyter, ``tqdm``'s widget bar saves only its very
first state as the text a reader sees later (a bar frozen at "0/100"), so in a notebook the bar is a line
of text shown with ``IPython.display`` and *updated in place*: the live notebook shows it moving, and the
saved notebook keeps its final state, readable anywhere (GitHub included), no widgets needed.

``StepProgressBar`` is the Lightning callback the trainer uses: during ``fit`` it counts optimizer steps
(not micro-batches) and shows the latest training loss and validation scores next to the bar; during
``predict`` it counts batches of questions.
"""

from __future__ import annotations

import io
import sys
from typing import Any

import pytorch_lightning as pl
from tqdm.std import tqdm as std_tqdm


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where stderr is not a terminal and widgets would be needed)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class _NotebookLine(std_tqdm):
    """``tqdm`` whose text goes to one IPython display, updated in place (its final state is what is saved)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from IPython.display import display

        self._handle = display({"text/plain": ""}, raw=True, display_id=True)
        super().__init__(*args, file=io.StringIO(), **kwargs)  # every line goes to the display, none to a stream

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        self._handle.update({"text/plain": msg if msg is not None else self.__str__()}, raw=True)
        return True


def progress_bar(iterable: Any = None, **kwargs: Any) -> std_tqdm:
    """``tqdm(iterable, **kwargs)`` for here: plain text in a terminal, an updating line in a notebook."""
    kwargs.setdefault("dynamic_ncols", True)
    if in_notebook():
        kwargs.setdefault("mininterval", 0.5)
        kwargs.pop("dynamic_ncols")
        return _NotebookLine(iterable, ncols=100, **kwargs)
    return std_tqdm(iterable, **kwargs)


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


__all__ = ["progress_bar", "StepProgressBar", "in_notebook"]
