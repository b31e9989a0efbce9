"""The notebooks' figures. Each function takes numbers (from ``analysis.py`` or a training log) and
returns a matplotlib ``Figure``; a notebook cell ends with ``plt.show()``."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from .analysis import rank_for_energy, read_metrics


def plot_token_lengths(lengths: Mapping[str, Sequence[int]], max_seq_length: int | None = None,
                       title: str = "") -> Figure:
    """Histograms of total (prompt + answer) and answer token counts; a line at ``max_seq_length``."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1.hist(lengths["total"], bins=50, color="tab:blue")
    ax1.set(xlabel="tokens per training example (prompt + answer + EOS)", ylabel="examples",
            title=title or "example length")
    if max_seq_length:
        ax1.axvline(max_seq_length, color="tab:red", ls="--", label=f"max_seq_length = {max_seq_length}")
        ax1.legend(loc="upper right")
    ax2.hist(lengths["answer"], bins=range(0, max(lengths["answer"]) + 2), color="tab:green")
    ax2.set(xlabel="answer tokens (+ EOS)", ylabel="examples", title="answer length")
    fig.tight_layout()
    return fig


def plot_loss_curve(log_dir: str | Path) -> Figure:
    """Training loss per optimizer step (each point the mean over that step's micro-batches), validation
    loss and validation F1 at the steps where they were measured (step 0: before training)."""
    metrics = read_metrics(log_dir)
    fig, ax = plt.subplots(figsize=(9, 4.2), layout="constrained")
    if "train_loss" in metrics:
        steps, values = zip(*metrics["train_loss"])
        ax.plot(steps, values, color="tab:blue", lw=1, label="train loss (mean of the step's micro-batches)")
    if "val_loss" in metrics:
        steps, values = zip(*metrics["val_loss"])
        ax.plot(steps, values, marker="s", ls="--", color="tab:orange", label="validation loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (answer tokens)", title="Training curve")
    ax.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0]
    if "val_f1" in metrics:
        ax2 = ax.twinx()
        steps, values = zip(*metrics["val_f1"])
        ax2.plot(steps, values, color="tab:green", marker="^", ls=":", label="validation F1")
        ax2.set(ylabel="F1 (%)", ylim=(0, 100))
        handles += ax2.get_legend_handles_labels()[0]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncol=len(handles),
               fontsize="small")
    return fig


def plot_delta_norms(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """||ΔW|| per layer (left) and ||ΔW|| / ||W|| in percent (right), one line per adapted matrix."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    for target in OrderedDict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        layers = [r["layer"] for r in mine]
        ax1.plot(layers, [r["delta_norm"] for r in mine], marker="o", ms=3, label=target)
        ax2.plot(layers, [100 * r["relative"] for r in mine], marker="o", ms=3, label=target)
    ax1.set(xlabel="layer", ylabel="||ΔW|| (Frobenius)", title="Size of the learned update ΔW = (α/r)·B·A")
    ax2.set(xlabel="layer", ylabel="||ΔW|| / ||W|| (%)", title="Relative to the frozen weight W")
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    return fig


def plot_singular_values(values: torch.Tensor, rank: int, title: str = "", energy: float = 0.9) -> Figure:
    """The first 2·rank singular values (log scale) and their cumulative share of ||ΔW||²."""
    shown = values[: 2 * rank].double()
    share = torch.cumsum(shown ** 2, 0) / (values.double() ** 2).sum()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    idx = range(1, len(shown) + 1)
    ax1.semilogy(idx, shown.clamp_min(1e-12).numpy(), marker="o", ms=3)
    ax1.axvline(rank + 0.5, color="tab:red", ls="--", label=f"r = {rank}")
    ax1.set(xlabel="index", ylabel="singular value", title=title or "singular values of ΔW")
    ax1.legend()
    k = rank_for_energy(values, energy)
    ax2.plot(idx, 100 * share.numpy(), marker="o", ms=3, color="tab:green")
    ax2.axhline(100 * energy, color="gray", ls=":")
    ax2.axvline(k, color="gray", ls=":", label=f"{k} values hold {energy:.0%}")
    ax2.set(xlabel="number of singular values", ylabel="% of ||ΔW||²", title="cumulative share", ylim=(0, 101))
    ax2.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_methods(rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any] | None = None) -> Figure:
    """F1 per method as bars with their 95 % bootstrap intervals as error bars (labels under the bars,
    trainable parameters in them); a dotted line at the zero-shot ``baseline`` when given.

    Each row: ``{"method", "f1", "f1_interval": (low, high), "trainable_params"}``.
    """
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["method"] for r in rows]
    f1 = [r["f1"] for r in rows]
    errors = [[r["f1"] - r["f1_interval"][0] for r in rows], [r["f1_interval"][1] - r["f1"] for r in rows]]
    bars = ax.bar(range(len(rows)), f1, yerr=errors, capsize=5, color="tab:blue", alpha=0.8)
    for bar, row in zip(bars, rows):
        ax.text(bar.get_x() + bar.get_width() / 2, 3, f"{row['trainable_params']:,}\nparams", ha="center",
                va="bottom", fontsize="x-small", color="white")
    if baseline is not None:
        ax.axhline(baseline["f1"], color="gray", ls=":", label=f"zero-shot base, F1 {baseline['f1']:.1f}")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xticks(range(len(rows)), names, rotation=15, ha="right")
    ax.set(ylabel="F1 (%) with 95 % interval", ylim=(0, 100), title="Same data, same budget: F1 by method")
    fig.tight_layout()
    return fig


__all__ = ["plot_token_lengths", "plot_loss_curve", "plot_delta_norms", "plot_singular_values", "plot_methods"]
