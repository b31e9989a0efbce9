"""The figures draw the numbers they are given: the plotted data is read back from the matplotlib artists and
compared with the numbers computed by analysis.py (or written by hand)."""

from __future__ import annotations

import collections

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lora_tutorial import analysis, plots  # noqa: E402

from helpers import METRICS_CSV, lora_model  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_delta_norm_lines_are_the_computed_norms():
    model = lora_model(layers=None)
    rows = analysis.delta_weight_norms(model)
    fig = plots.plot_delta_norms(rows)
    absolute, relative = fig.axes
    for ax, key, scale in ((absolute, "delta_norm", 1), (relative, "relative", 100)):
        lines = {line.get_label(): line for line in ax.lines}
        assert set(lines) == {"attention_qkv", "mlp_fc1"}
        for target, line in lines.items():
            mine = [r for r in rows if r["target"] == target]
            assert list(line.get_xdata()) == [r["layer"] for r in mine]
            np.testing.assert_allclose(line.get_ydata(), [scale * r[key] for r in mine])


def test_singular_value_plot_shows_the_values_and_their_cumulative_share():
    values = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, 0.0])  # squares 9, 4, 1, 0.25: total 14.25
    fig = plots.plot_singular_values(values, rank=2, energy=0.9)
    left, right = fig.axes
    shown = left.lines[0]
    assert list(shown.get_xdata()) == [1, 2, 3, 4]  # the first 2 x rank values
    np.testing.assert_allclose(shown.get_ydata(), [3.0, 2.0, 1.0, 0.5])
    share = right.lines[0]
    np.testing.assert_allclose(share.get_ydata(), [100 * 9 / 14.25, 100 * 13 / 14.25, 100 * 14 / 14.25, 100.0])
    # 9 + 4 = 13 of 14.25 (91 %) is the first count reaching 90 %: the marker sits at 2 values
    assert "2 values hold 90%" in [t.get_text() for t in right.get_legend().get_texts()]


def test_loss_curve_draws_the_logged_series(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS_CSV)
    metrics = analysis.read_metrics(tmp_path)
    fig = plots.plot_loss_curve(tmp_path)
    loss_ax, f1_ax = fig.axes
    drawn = {line.get_label(): line.get_xydata().tolist() for line in loss_ax.lines + f1_ax.lines}
    assert drawn == {"train loss (mean of the step's micro-batches)": [list(p) for p in metrics["train_loss"]],
                     "validation loss": [list(p) for p in metrics["val_loss"]],
                     "validation F1": [list(p) for p in metrics["val_f1"]]}


def test_loss_curve_without_validation_has_one_axis(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,train_loss,trained_steps\n0,2.0,1.0\n1,1.5,2.0\n")
    fig = plots.plot_loss_curve(tmp_path)
    assert len(fig.axes) == 1 and fig.axes[0].lines[0].get_xydata().tolist() == [[1, 2.0], [2, 1.5]]


def test_token_length_histograms_count_the_examples():
    lengths = {"total": [40, 55, 55, 90, 200], "answer": [2, 3, 3, 3, 7], "prompt": [38, 52, 52, 87, 193]}
    fig = plots.plot_token_lengths(lengths, max_seq_length=128)
    total, answer = fig.axes
    assert sum(p.get_height() for p in total.patches) == 5
    assert [list(line.get_xdata()) for line in total.lines] == [[128, 128]]  # the max_seq_length marker
    heights = {int(round(p.get_x())): p.get_height() for p in answer.patches if p.get_height()}
    assert heights == collections.Counter(lengths["answer"])  # one bin per token count


def test_methods_bars_are_the_f1_scores_with_their_intervals():
    rows = [{"method": "LoRA", "f1": 70.0, "f1_interval": (65.0, 74.0), "trainable_params": 1_474_560},
            {"method": "IA3", "f1": 30.0, "f1_interval": (26.0, 35.0), "trainable_params": 57_600}]
    fig = plots.plot_methods(rows, baseline={"f1": 20.0})
    ax = fig.axes[0]
    bars = [p for p in ax.patches]
    assert [b.get_height() for b in bars] == [70.0, 30.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["LoRA", "IA3"]
    error_segments = [seg for collection in ax.collections for seg in collection.get_segments()]
    assert sorted((s[0][1], s[1][1]) for s in error_segments) == [(26.0, 35.0), (65.0, 74.0)]
    assert [list(line.get_ydata()) for line in ax.lines if line.get_linestyle() == ":"] == [[20.0, 20.0]]
    assert {t.get_text() for t in ax.texts} == {"1,474,560\nparams", "57,600\nparams"}
    assert not [line for line in plots.plot_methods(rows).axes[0].lines if line.get_linestyle() == ":"]
