"""Numbers about data, adapters and training runs: what the notebooks print and plot.

Nothing here changes a model for good (``merged_outputs_agree`` merges and unmerges again), and
nothing here draws: ``plots.py`` turns these numbers into figures.
"""

from __future__ import annotations

import csv
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .generation import eval_mode
from .model import GPT
from .peft import adapter_parameters, merge_lora, unmerge_lora
from .peft.lora import LoRALinear, lora_modules
from .sft_data import SFTDataset, read_jsonl
from .squad import split_context

# ----------------------------------------------------------------------------------------------
# Data (notebook 01)
# ----------------------------------------------------------------------------------------------


def read_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """The records of an SFT jsonl file (checked line by line as the dataset checks them), the first
    ``limit`` when given."""
    return [record for _, record in read_jsonl(path, ("input", "output"))][:limit]


def token_lengths(dataset: SFTDataset) -> dict[str, list[int]]:
    """Token counts of each item of ``dataset``: prompt, answer (+ EOS) and the whole training example,
    exactly as the dataset tokenizes them."""
    items = [dataset[i] for i in range(len(dataset))]
    return {"prompt": [item["prompt_len"] for item in items],
            "answer": [len(item["input_ids"]) - item["prompt_len"] for item in items],
            "total": [len(item["input_ids"]) for item in items]}


def length_summary(lengths: Mapping[str, Sequence[int]]) -> list[tuple[str, int, int, float, int]]:
    """(part, min, median, mean, max) rows for ``token_lengths`` output."""
    rows = []
    for part, values in lengths.items():
        ordered = sorted(values)
        rows.append((part, ordered[0], ordered[len(ordered) // 2], round(sum(ordered) / len(ordered), 1), ordered[-1]))
    return rows


def subset_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How many questions, from how many articles and paragraphs, and the answers' mean word count."""
    contexts = {split_context(r["input"])[1] for r in records}
    words = [len(r["output"].split()) for r in records]
    return {"questions": len(records), "articles": len({r.get("title") for r in records}),
            "paragraphs": len(contexts), "mean answer words": round(sum(words) / len(words), 2)}


# ----------------------------------------------------------------------------------------------
# LoRA updates (notebook 04)
# ----------------------------------------------------------------------------------------------


def grouped_adapter_rows(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, int, tuple, int, int]]:
    """Adapter tensors that differ only by layer index, grouped: (pattern, layers, shape, values each,
    values in all), e.g. ("blocks.*.mlp.mlp_fc1.lora_A", 30, (32, 576), 18432, 552960)."""
    groups: OrderedDict[tuple[str, tuple], list[int]] = OrderedDict()
    for name in sorted(tensors, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)]):
        pattern = re.sub(r"^blocks\.\d+\.", "blocks.*.", name)
        groups.setdefault((pattern, tuple(tensors[name].shape)), []).append(tensors[name].numel())
    return [(pattern, len(sizes), shape, sizes[0], sum(sizes)) for (pattern, shape), sizes in groups.items()]


def named_lora_layers(model: torch.nn.Module) -> list[tuple[str, LoRALinear]]:
    """(module name, LoRALinear) pairs, in layer order."""
    layers = set(map(id, lora_modules(model)))
    return [(name, m) for name, m in model.named_modules() if id(m) in layers]


def delta_weight_norms(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Per LoRA layer: the Frobenius norms of what training changed, ΔW, and of the base model's W, and
    their ratio ||ΔW|| / ||W|| (for DoRA and PiSSA too: ``LoRALinear.original_and_update``)."""
    rows = []
    for name, layer in named_lora_layers(model):
        base, delta = layer.original_and_update()
        d, w = torch.linalg.matrix_norm(delta).item(), torch.linalg.matrix_norm(base).item()
        rows.append({"name": name, "layer": int(re.search(r"blocks\.(\d+)\.", name).group(1)),
                     "target": name.split(".")[-1], "delta_norm": d, "weight_norm": w, "relative": d / w})
    return rows


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a matrix, largest first (float64 for accuracy)."""
    return torch.linalg.svdvals(matrix.detach().double())


def rank_for_energy(values: torch.Tensor, energy: float = 0.9) -> int:
    """How many of the largest singular values hold ``energy`` of ||ΔW||² (= the sum of their squares)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    squares = values.double() ** 2
    if squares.sum() == 0:
        return 0
    cumulative = torch.cumsum(squares, 0) / squares.sum()
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12).item()) + 1


def rank_usage(model: torch.nn.Module, energy: float = 0.9) -> list[tuple[str, int, int, int, int, int]]:
    """Per adapted matrix type: (target, layers, rank r, min / median / max over layers of the number of
    singular values of ΔW that hold ``energy`` of ||ΔW||²)."""
    counts: OrderedDict[str, list[int]] = OrderedDict()
    ranks: dict[str, int] = {}
    for name, layer in named_lora_layers(model):
        target = name.split(".")[-1]
        counts.setdefault(target, []).append(rank_for_energy(singular_values(layer.original_and_update()[1]), energy))
        ranks[target] = layer.rank
    rows = []
    for target, ks in counts.items():
        ordered = sorted(ks)
        rows.append((target, len(ks), ranks[target], ordered[0], ordered[len(ordered) // 2], ordered[-1]))
    return rows


@torch.no_grad()
def merged_outputs_agree(model: GPT, input_ids: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-5) -> dict[str, Any]:
    """Logits with LoRA as a side branch vs merged into the weights, then unmerged again.

    Returns the largest absolute logit differences (merged vs unmerged, and after unmerging vs before),
    whether both are within ``atol + rtol * max|logit|`` (float32 rounding grows with the logits' size),
    and the largest change of a base weight left after the round trip. The model is left unmerged.
    Use a float32 model: merging into bf16 weights rounds ``W + BA`` to 8 bits of mantissa, so a bf16
    base shows that rounding (about 1e-2 in the logits), not a merge bug.
    """
    layers = lora_modules(model)
    if not layers:
        raise ValueError("merged_outputs_agree: the model has no LoRA layers")
    weights = [m.base.weight.detach().clone() for m in layers]
    with eval_mode(model):
        unmerged = model(input_ids).float()
        n = merge_lora(model)
        try:
            merged = model(input_ids).float()
        finally:  # whatever happens, hand the model back unmerged
            unmerge_lora(model)
        again = model(input_ids).float()
    merged_diff = (merged - unmerged).abs().max().item()
    roundtrip_diff = (again - unmerged).abs().max().item()
    weight_diff = max((m.base.weight - w).abs().max().item() for m, w in zip(layers, weights))
    max_logit = unmerged.abs().max().item()
    tolerance = atol + rtol * max_logit
    return {"layers": n, "max_logit": max_logit, "merged_vs_unmerged": merged_diff, "after_unmerge": roundtrip_diff,
            "weight_change_after_unmerge": weight_diff, "tolerance": tolerance,
            "agree": merged_diff <= tolerance and roundtrip_diff <= tolerance}


def parameter_budget(model: GPT) -> list[tuple[str, int, float, float]]:
    """Trainable parameters and training memory, PEFT vs a full fine-tune of the same model.

    Memory counts fp32 values with AdamW: every *trainable* parameter needs its value, its gradient and
    two optimizer moments (16 bytes); a frozen one only its value (4 bytes). Activations are not counted.
    Rows: (setup, trainable parameters, % of the base model's parameters, GiB of weights + gradients +
    optimizer state).
    """
    adapters = adapter_parameters(model).values()
    base = model.num_parameters() - sum(p.numel() for p in adapters)
    trainable = sum(p.numel() for p in adapters if p.requires_grad)
    methods = "+".join(c.scheme for c in model.peft_configs) or "adapter"
    return [("full fine-tune", base, 100.0, 16 * base / 2**30),
            (methods, trainable, 100.0 * trainable / base, (4 * base + 16 * trainable) / 2**30)]


# ----------------------------------------------------------------------------------------------
# Training logs (notebook 03)
# ----------------------------------------------------------------------------------------------


def read_metrics(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``<log_dir>/metrics.csv`` as {metric: [(optimizer steps taken, value), ...]}.

    Lightning's own ``step`` column counts differently for training and validation rows, so
    ``SFTModel`` logs ``trained_steps`` with every row: k for the loss of the k-th optimizer step, and
    for a validation run after k steps (0: before training).
    """
    path = Path(log_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics logged (has trainer.fit run with this log dir?)")
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("trained_steps"):
                continue
            step = int(float(row["trained_steps"]))
            for key, value in row.items():
                if key not in ("step", "epoch", "trained_steps") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


__all__ = ["read_records", "token_lengths", "length_summary", "subset_summary", "grouped_adapter_rows",
           "named_lora_layers", "delta_weight_norms", "singular_values", "rank_for_energy", "rank_usage",
           "merged_outputs_agree", "parameter_budget", "read_metrics"]
