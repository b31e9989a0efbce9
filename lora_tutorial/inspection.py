"""Looking at things: data examples and token lengths, adapter files, ΔW = B·A, loss curves, a QA demo.

The notebooks call these functions so that no notebook cell holds more than a line or two of logic.
Nothing here changes a model for good: ``merged_outputs_agree`` merges and unmerges again, and the
functions that read a model only read it.

Tables are plain lists of rows; ``format_table`` prints them aligned (monospace, for ``print``) or as
markdown (for ``IPython.display.Markdown``). Plots return the matplotlib ``Figure``; a notebook cell
ends with ``plt.show()``.
"""

from __future__ import annotations

import csv
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .data import format_squad_input, read_jsonl
from .model import GPT

# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, tuple):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return str(value)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], markdown: bool = False) -> str:
    """Rows as an aligned text table (numbers right-aligned, thousands separated) or a markdown table."""
    text = [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows) and bool(rows)
               for i in range(len(headers))]
    if markdown:
        esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in text]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(row[i]) for row in text]) for i, h in enumerate(headers)]
    def line(cells):
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in text])


# ----------------------------------------------------------------------------------------------
# Data (notebook 01)
# ----------------------------------------------------------------------------------------------


def count_examples(paths: Mapping[str, str | Path]) -> list[tuple[str, str, int]]:
    """(name, file, number of lines) for each jsonl file: one example per line."""
    rows = []
    for name, path in paths.items():
        with open(path, "rb") as f:
            rows.append((name, str(path), sum(1 for _ in f)))
    return rows


def read_examples(path: str | Path, n: int | None = None) -> list[dict]:
    """The first ``n`` records (all when None) of an SFT jsonl file, validated as the dataset does."""
    records = [record for _, record in read_jsonl(path, ("input", "output"))]
    return records if n is None else records[:n]


def wrap(text: str, width: int = 100) -> str:
    """Wrap each line of ``text`` to ``width`` columns, keeping the line breaks that are there."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) if line else "" for line in text.split("\n"))


def show_example(record: Mapping[str, Any], width: int = 100) -> str:
    """One SFT record as readable text: the prompt (wrapped), the training target and the gold answers."""
    import textwrap

    lines = ["input:", textwrap.indent(wrap(record["input"], width), "    "), f"output: {record['output']!r}"]
    if "answers" in record:
        lines.append(f"answers (all golds, for EM/F1): {record['answers']!r}")
    return "\n".join(lines)


def label_view(item: Mapping[str, Any], tokenizer, last: int = 10) -> list[tuple[int, str, str]]:
    """The last ``last`` tokens of one ``SFTDataset`` item: (position, token text, label).

    The label column shows what the loss sees: "-100 (ignored)" on prompt tokens, the token itself where
    the model is trained to predict it (answer and EOS).
    """
    ids, labels = item["input_ids"], item["labels"]
    rows = []
    for pos in range(max(0, len(ids) - last), len(ids)):
        text = tokenizer.decode([ids[pos]], skip_special_tokens=False)
        label = "-100 (ignored)" if labels[pos] == -100 else repr(tokenizer.decode([labels[pos]],
                                                                                  skip_special_tokens=False))
        rows.append((pos, repr(text), label))
    return rows


def subset_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How many questions, how many distinct paragraphs they are about, and the answers' mean word count."""
    contexts = {r["input"].split(" Question:")[0] for r in records}
    words = [len(r["output"].split()) for r in records]
    return {"questions": len(records), "paragraphs": len(contexts),
            "mean answer words": round(sum(words) / len(words), 2)}


def token_lengths(path: str | Path, tokenizer, limit: int | None = None,
                  prompt_template: str = "{input} {output}") -> dict[str, list[int]]:
    """Token counts of the prompts, the answers and the full training texts of a jsonl file.

    Uses the tokenizer's batch encoder (fast); ``SFTDataset`` adds the EOS token, which is counted here too.
    """
    records = read_examples(path, limit)
    prompts = [r["input"] for r in records]
    answers = [" " + r["output"] for r in records]
    full = [prompt_template.format(**r) for r in records]
    n_prompt = [len(ids) for ids in tokenizer.encode_batch(prompts)]
    n_answer = [len(ids) for ids in tokenizer.encode_batch(answers)]
    n_full = [len(ids) + 1 for ids in tokenizer.encode_batch(full)]  # + EOS
    return {"prompt": n_prompt, "answer": n_answer, "total": n_full}


def length_summary(lengths: Mapping[str, Sequence[int]]) -> list[tuple[str, int, int, float, int]]:
    """(part, min, median, mean, max) rows for ``token_lengths`` output."""
    rows = []
    for part, values in lengths.items():
        ordered = sorted(values)
        rows.append((part, ordered[0], ordered[len(ordered) // 2], round(sum(ordered) / len(ordered), 1),
                     ordered[-1]))
    return rows


def plot_token_lengths(lengths: Mapping[str, Sequence[int]], max_seq_length: int | None = None, title: str = ""):
    """Histograms of total (prompt + answer) and answer token counts; a line at ``max_seq_length``."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1.hist(lengths["total"], bins=50, color="tab:blue")
    ax1.set(xlabel="tokens per training example (prompt + answer + EOS)", ylabel="examples",
            title=title or "example length")
    if max_seq_length:
        ax1.axvline(max_seq_length, color="tab:red", ls="--", label=f"max_seq_length = {max_seq_length}")
        ax1.legend()
    ax2.hist(lengths["answer"], bins=range(0, max(lengths["answer"]) + 2), color="tab:green")
    ax2.set(xlabel="answer tokens", ylabel="examples", title="answer length")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Adapter files and LoRA updates (notebook 04)
# ----------------------------------------------------------------------------------------------


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata (PEFT configs, base model, fingerprint) of an adapter file."""
    from .peft.checkpoint import read_adapter_file

    return read_adapter_file(path)


def adapter_tensor_rows(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple, int]]:
    """(name, shape, number of values) for every tensor, in layer order (blocks.2 before blocks.10)."""
    def key(name: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
    return [(name, tuple(tensors[name].shape), tensors[name].numel()) for name in sorted(tensors, key=key)]


def grouped_adapter_rows(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, int, tuple, int, int]]:
    """Tensors that differ only by layer index grouped: (pattern, tensors, shape, values each, values total)."""
    groups: OrderedDict[tuple[str, tuple], list[int]] = OrderedDict()
    for name, shape, numel in adapter_tensor_rows(tensors):
        pattern = re.sub(r"^blocks\.\d+\.", "blocks.*.", name)
        groups.setdefault((pattern, shape), []).append(numel)
    return [(pattern, len(sizes), shape, sizes[0], sum(sizes)) for (pattern, shape), sizes in groups.items()]


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(module name, LoRALinear) pairs of a model, in layer order."""
    from .peft import LoRALinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = scaling · B A, the full-size (out, in) update a LoRA layer adds to its frozen weight (float32)."""
    return scaling * (lora_B.detach().float() @ lora_A.detach().float())


def delta_weight_norms(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Per LoRA layer: the Frobenius norms of ΔW and of the frozen W, and their ratio ||ΔW|| / ||W||."""
    rows = []
    for name, layer in lora_layers(model):
        delta = delta_weight(layer.lora_A, layer.lora_B, layer.scaling)
        base = layer.base.weight.detach().float()
        if layer.merged:  # base.weight holds W + ΔW while merged
            base = base - delta
        match = re.search(r"blocks\.(\d+)\.", name)
        d, w = torch.linalg.matrix_norm(delta).item(), torch.linalg.matrix_norm(base).item()
        rows.append({"name": name, "layer": int(match.group(1)) if match else -1, "target": name.split(".")[-1],
                     "delta_norm": d, "weight_norm": w, "relative": d / w if w else float("nan")})
    return rows


def plot_delta_norms(rows: Sequence[Mapping[str, Any]]):
    """||ΔW|| per layer (left) and ||ΔW|| / ||W|| in percent (right), one line per adapted matrix."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    targets = list(OrderedDict.fromkeys(r["target"] for r in rows))
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        layers = [r["layer"] for r in mine]
        ax1.plot(layers, [r["delta_norm"] for r in mine], marker="o", ms=3, label=target)
        ax2.plot(layers, [100 * r["relative"] for r in mine], marker="o", ms=3, label=target)
    ax1.set(xlabel="layer", ylabel="||ΔW|| (Frobenius)", title="Size of the learned update ΔW = (α/r)·B·A")
    ax2.set(xlabel="layer", ylabel="||ΔW|| / ||W|| (%)", title="Relative to the frozen weight W")
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of a matrix, largest first (float64 for accuracy)."""
    return torch.linalg.svdvals(delta.detach().double())


def rank_for_energy(values: torch.Tensor, energy: float = 0.9) -> int:
    """How many of the largest singular values hold ``energy`` of ||ΔW||² (= the sum of their squares)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    squares = values.double() ** 2
    total = squares.sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(squares, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12).item()) + 1


def plot_singular_values(values: torch.Tensor, rank: int, title: str = "", energy: float = 0.9):
    """The first 2·rank singular values (log scale) and their cumulative share of ||ΔW||²."""
    import matplotlib.pyplot as plt

    shown = values[: 2 * rank].double()
    total = (values.double() ** 2).sum()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    idx = range(1, len(shown) + 1)
    ax1.semilogy(idx, shown.clamp_min(1e-12).numpy(), marker="o", ms=3)
    ax1.axvline(rank + 0.5, color="tab:red", ls="--", label=f"r = {rank}")
    ax1.set(xlabel="index", ylabel="singular value", title=title or "singular values of ΔW")
    ax1.legend()
    share = (torch.cumsum(shown ** 2, 0) / total).numpy() if total > 0 else shown.numpy() * 0
    ax2.plot(idx, 100 * share, marker="o", ms=3, color="tab:green")
    k = rank_for_energy(values, energy)
    ax2.axhline(100 * energy, color="gray", ls=":")
    ax2.axvline(k, color="gray", ls=":", label=f"{k} values hold {energy:.0%}")
    ax2.set(xlabel="number of singular values", ylabel="% of ||ΔW||²", title="cumulative share", ylim=(0, 101))
    ax2.legend(loc="lower right")
    fig.tight_layout()
    return fig


def rank_usage(model: torch.nn.Module, energy: float = 0.9) -> list[tuple[str, int, int, int, int, int]]:
    """Per adapted matrix type: (target, layers, rank r, min / median / max over layers of the number of
    singular values of ΔW that hold ``energy`` of ||ΔW||²)."""
    counts: OrderedDict[str, list[int]] = OrderedDict()
    ranks: dict[str, int] = {}
    for name, layer in lora_layers(model):
        target = name.split(".")[-1]
        values = singular_values(delta_weight(layer.lora_A, layer.lora_B, layer.scaling))
        counts.setdefault(target, []).append(rank_for_energy(values, energy))
        ranks[target] = layer.rank
    rows = []
    for target, ks in counts.items():
        ordered = sorted(ks)
        rows.append((target, len(ks), ranks[target], ordered[0], ordered[len(ordered) // 2], ordered[-1]))
    return rows


@torch.no_grad()
def merged_outputs_agree(model: torch.nn.Module, input_ids: torch.Tensor, atol: float = 1e-4,
                         rtol: float = 1e-5) -> dict[str, Any]:
    """Logits with LoRA as a side branch vs merged into the weights, then unmerged again.

    Returns the largest absolute logit differences (merged vs unmerged, and after unmerging vs before),
    whether both are within ``atol + rtol * max|logit|`` (float32 rounding grows with the logits' size),
    and the largest change of a base weight left after the round trip. The model is left unmerged.
    """
    from .generation import eval_mode
    from .peft import merge_lora, unmerge_lora
    from .peft.lora import lora_modules

    layers = lora_modules(model)
    if not layers:
        raise ValueError("merged_outputs_agree: the model has no LoRA layers")
    weights = [m.base.weight.detach().clone() for m in layers]
    with eval_mode(model):
        unmerged = model(input_ids).float()
        n = merge_lora(model)
        merged = model(input_ids).float()
        unmerge_lora(model)
        again = model(input_ids).float()
    merged_diff = (merged - unmerged).abs().max().item()
    roundtrip_diff = (again - unmerged).abs().max().item()
    weight_diff = max((m.base.weight - w).abs().max().item() for m, w in zip(layers, weights))
    max_logit = unmerged.abs().max().item()
    tolerance = atol + rtol * max_logit
    return {"layers": n, "max_logit": max_logit, "merged_vs_unmerged": merged_diff,
            "after_unmerge": roundtrip_diff, "weight_change_after_unmerge": weight_diff, "tolerance": tolerance,
            "agree": merged_diff <= tolerance and roundtrip_diff <= tolerance}


def parameter_budget(model: GPT) -> list[tuple[str, int, float, float]]:
    """Trainable parameters and training memory, PEFT vs a full fine-tune of the same model.

    Memory counts fp32 values with AdamW: every *trainable* parameter needs its value, its gradient and
    two optimizer moments (16 bytes); a frozen one only its value (4 bytes). Activations are not counted.
    Rows: (setup, trainable parameters, % of the base, GiB of weights + gradients + optimizer state).
    """
    from .peft import adapter_parameters

    adapters = adapter_parameters(model).values()
    base = model.num_parameters() - sum(p.numel() for p in adapters)
    trainable = sum(p.numel() for p in adapters if p.requires_grad)
    gib = 2 ** 30
    methods = "+".join(c.scheme for c in getattr(model, "peft_configs", [])) or "adapter"
    return [("full fine-tune", base, 100.0, round(16 * base / gib, 3)),
            (methods, trainable, round(100.0 * trainable / base, 3), round((4 * base + 16 * trainable) / gib, 3))]


# ----------------------------------------------------------------------------------------------
# Training logs (notebook 03)
# ----------------------------------------------------------------------------------------------


def read_metrics(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``<log_dir>/metrics.csv`` (Lightning's CSVLogger) as {metric: [(step, value), ...]}, empty cells skipped."""
    path = Path(log_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics logged (has trainer.fit run with this log dir?)")
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curve(log_dir: str | Path, smooth: int = 10):
    """Training loss (raw points and a running mean over ``smooth`` logged values), validation loss and
    validation F1 when logged, against the optimizer step."""
    import matplotlib.pyplot as plt

    metrics = read_metrics(log_dir)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    if "train_loss" in metrics:
        steps, values = zip(*metrics["train_loss"])
        ax.plot(steps, values, ".", color="tab:blue", alpha=0.35, label="train loss (one logged step)")
        if len(values) > 1 and smooth > 1:
            ax.plot(steps, running_mean(values, smooth), color="tab:blue",
                    label=f"train loss, mean of last {smooth}")
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
    ax.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize="small")
    fig.tight_layout()
    return fig


def file_size_mib(path: str | Path) -> float:
    return Path(path).stat().st_size / 2 ** 20


# ----------------------------------------------------------------------------------------------
# Predictions and scores (notebooks 03, 05, 06)
# ----------------------------------------------------------------------------------------------

_QUESTION = re.compile(r"Question:\s*(?P<q>.*?)\s*(?:\n\nAssistant:)?\s*$", re.DOTALL)


def question_of(prompt: str) -> str:
    """The question part of a seed prompt ("... Question: <q>\\n\\nAssistant:")."""
    match = _QUESTION.search(prompt)
    return match["q"] if match else prompt


def scores_rows(named_scores: Mapping[str, Mapping[str, float]]) -> list[tuple[str, int, float, float]]:
    """(model, questions, EM, F1) rows from ``{"name": {"exact_match", "f1", "n"}}``."""
    return [(name, int(s["n"]), round(s["exact_match"], 1), round(s["f1"], 1)) for name, s in named_scores.items()]


def predictions_rows(prompts: Sequence[str], golds: Sequence[Sequence[str]],
                     answers: Mapping[str, Sequence[str]], max_chars: int = 60) -> list[list[str]]:
    """One row per question: the question, its first gold answer and each model's answer (shortened)."""
    def short(text: str) -> str:
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append([short(question_of(prompt)), short(golds[i][0])] + [short(a[i]) for a in answers.values()])
    return rows


def plot_methods(results: Mapping[str, Mapping[str, Any]], metric: str = "tuned_f1", baseline: float | None = None):
    """Scatter of trainable parameters (log scale) against ``metric`` for the given runs, with a dotted line
    at ``baseline`` (e.g. the zero-shot F1 of the base model) when given."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, entry in results.items():
        if entry.get("trainable_params") and entry.get(metric) is not None:
            ax.scatter(entry["trainable_params"], entry[metric], s=40)
            ax.annotate(entry.get("method", key), (entry["trainable_params"], entry[metric]),
                        textcoords="offset points", xytext=(6, 4))
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls=":", label="zero-shot base (chat template)")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=metric.replace("_", " ") + " (%)", ylim=(0, 100),
           title="Quality vs. size of the trained part")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Interactive question answering (notebook 05)
# ----------------------------------------------------------------------------------------------


def answer_question(model, context: str, question: str, greedy: bool = True, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 0.9, tokens_to_generate: int = 30,
                    use_chat_template: bool = False, seed: int | None = None) -> str:
    """Answer one question about a context with an ``SFTModel`` (base, or base + adapter).

    The prompt is the seed's training format; ``use_chat_template`` wraps it in the chat template instead
    (the fair way to ask the untuned instruct model). ``seed`` makes sampling repeatable.
    """
    prompt = format_squad_input(context, question)
    ids = model.tokenizer.encode(prompt)
    batch = {"input_ids": torch.tensor([ids]), "prompt_lens": torch.tensor([len(ids)]), "prompts": [prompt]}
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate_answers(batch, use_chat_template=use_chat_template, greedy=greedy,
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  tokens_to_generate=tokens_to_generate)[0]


DEMO_CONTEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. This basin "
                "encompasses seven million square kilometres, of which five and a half million square "
                "kilometres are covered by the rainforest. The majority of the forest is contained within "
                "Brazil, with 60% of the rainforest, followed by Peru with 13%, and Colombia with 10%.")
DEMO_QUESTION = "Which country contains most of the Amazon rainforest?"


def qa_demo(model, context: str = DEMO_CONTEXT, question: str = DEMO_QUESTION,
            answer_fn: Callable[..., str] = answer_question):
    """An ipywidgets box: context and question in, answer out, with greedy / sampling knobs.

    All the work happens in ``answer_fn(model, context, question, **knobs)``; this only wires widgets.
    """
    import ipywidgets as w

    style = {"description_width": "110px"}
    context_box = w.Textarea(value=context, description="Context", layout=w.Layout(width="95%", height="110px"),
                             style=style)
    question_box = w.Text(value=question, description="Question", layout=w.Layout(width="95%"), style=style)
    greedy = w.Checkbox(value=True, description="greedy (off: sample)", style=style)
    temperature = w.FloatSlider(value=0.7, min=0.1, max=2.0, step=0.1, description="temperature", style=style)
    top_k = w.IntSlider(value=0, min=0, max=100, description="top_k (0 = off)", style=style)
    top_p = w.FloatSlider(value=0.9, min=0.05, max=1.0, step=0.05, description="top_p", style=style)
    tokens = w.IntSlider(value=30, min=1, max=100, description="max tokens", style=style)
    chat = w.Checkbox(value=False, description="wrap in chat template", style=style)
    button = w.Button(description="Answer", button_style="primary")
    out = w.Output()

    def sync(_=None):
        for knob in (temperature, top_k, top_p):
            knob.disabled = greedy.value
    greedy.observe(sync, "value")
    sync()

    def on_click(_):
        with out:
            out.clear_output()
            answer = answer_fn(model, context_box.value, question_box.value, greedy=greedy.value,
                               temperature=temperature.value, top_k=top_k.value, top_p=top_p.value,
                               tokens_to_generate=tokens.value, use_chat_template=chat.value)
            print(f"Answer: {answer}")
    button.on_click(on_click)
    knobs = w.HBox([w.VBox([greedy, chat, tokens]), w.VBox([temperature, top_k, top_p])])
    return w.VBox([context_box, question_box, knobs, button, out])


__all__ = ["format_table", "count_examples", "read_examples", "wrap", "show_example", "label_view", "subset_summary",
           "token_lengths", "length_summary", "plot_token_lengths", "read_adapter", "adapter_tensor_rows",
           "grouped_adapter_rows", "lora_layers", "delta_weight", "delta_weight_norms", "plot_delta_norms",
           "singular_values", "rank_for_energy", "plot_singular_values", "rank_usage", "merged_outputs_agree",
           "parameter_budget", "read_metrics", "running_mean", "plot_loss_curve", "file_size_mib", "question_of",
           "scores_rows", "predictions_rows", "plot_methods", "answer_question", "DEMO_CONTEXT", "DEMO_QUESTION",
           "qa_demo"]
