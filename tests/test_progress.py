"""Progress bars: the Lightning callback counts optimizer steps during fit (not micro-batches) and batches during
predict; outside Jupyter a bar is plain tqdm."""

from __future__ import annotations

import io

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.std import tqdm as std_tqdm

from lora_tutorial import progress_callback
from lora_tutorial.progress import in_notebook, progress_bar
from lora_tutorial.progress_callback import StepProgressBar

# Lightning 2.6 on torch 2.13 (training.quiet_lightning filters the same for its own trainers)
pytestmark = pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\).*:FutureWarning")


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self.layer(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class WatchBar(pl.Callback):
    """Reads the bar's position after every micro-batch (runs after StepProgressBar: later in the list)."""

    def __init__(self, bar: StepProgressBar) -> None:
        self.bar, self.positions = bar, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.positions.append(self.bar.bar.n)


@pytest.fixture
def bars(monkeypatch):
    """Every bar StepProgressBar opens, written to a string instead of the terminal."""
    made = []

    def fake(iterable=None, **kwargs):
        made.append(std_tqdm(iterable, file=io.StringIO(), **kwargs))
        return made[-1]

    monkeypatch.setattr(progress_callback, "progress_bar", fake)
    return made


def trainer(callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", callbacks=callbacks, enable_progress_bar=False, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, **kwargs)


def test_fit_counts_optimizer_steps_not_micro_batches(bars):
    bar = StepProgressBar()
    watch = WatchBar(bar)
    data = DataLoader(torch.randn(40, 2, generator=torch.Generator().manual_seed(0)), batch_size=2)
    trainer([bar, watch], max_steps=3, accumulate_grad_batches=2).fit(TinyModule(), data)
    (fit_bar,) = bars
    assert (fit_bar.n, fit_bar.total) == (3, 3)
    assert watch.positions == [0, 1, 1, 2, 2, 3]  # it moves when an optimizer step completes
    assert "loss=" in str(fit_bar)
    assert bar.bar is None  # closed at the end of training


def test_predict_counts_batches(bars):
    bar = StepProgressBar()
    data = DataLoader(torch.randn(10, 2), batch_size=3)  # 4 batches
    out = trainer([bar]).predict(TinyModule(), data)
    assert len(out) == 4
    (predict_bar,) = bars
    assert (predict_bar.n, predict_bar.total) == (4, 4)


def test_outside_a_notebook_a_bar_is_plain_tqdm():
    assert not in_notebook()
    bar = progress_bar(range(3), file=io.StringIO(), desc="x")
    assert type(bar) is std_tqdm
    assert list(bar) == [0, 1, 2]


def test_importing_the_package_does_not_import_lightning():
    """Generating or loading a model must not pay Lightning's import (seconds, ~150 MiB per process)."""
    import subprocess
    import sys

    code = ("import sys, lora_tutorial, lora_tutorial.generation, lora_tutorial.quantize, lora_tutorial.progress; "
            "print(sorted(m for m in ('pytorch_lightning', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
