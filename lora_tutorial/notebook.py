"""Notebook support: the run's settings, tables, a results store, and the interactive QA box.

Every notebook starts with one "parameters" cell::

    import os
    from lora_tutorial.notebook import notebook_params
    P = notebook_params()      # reads LORA_TUTORIAL_MODE: "fast" (default) or "nemo"
    os.chdir(P.root)           # the paths in conf/*.yaml are relative to the repository root

**fast** (the default) is this project's recipe, ``conf/peft_tuning.yaml``: chosen on the validation
split to get the best test score a 2-core CPU reaches in a few minutes. **nemo** is the NVIDIA NeMo LoRA
tutorial's own settings, ``conf/nemo_tutorial.yaml`` (200 training questions, LoRA on the fused QKV
projection only, learning rate 1e-4, 100 steps of 4), for anyone who wants to retrace that tutorial
number by number. Both are scored on the same test questions.

The notebooks pass their scores to ``record_result``; ``make tutorial`` prints them at the end with
``print_results_table``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from .config import load_config
from .files import write_json
from .metrics import Scores, per_question_scores
from .sft_model import SFTModel
from .squad import format_prompt, question_of
from .evaluation import answer_dataset
from .peft import parameter_summary
from .training import adapter_path_of, build_trainer, exp_manager, train

MODE_ENV = "LORA_TUTORIAL_MODE"


@dataclass(frozen=True)
class NotebookParams:
    """The settings one tutorial run uses (``notebook_params()`` fills them for the chosen mode)."""

    mode: str                   # "fast" or "nemo"
    root: Path                  # the repository root
    config_file: str            # the training config of this mode
    eval_limit: int             # test questions notebooks 03 and 05 score on (the first N of the shuffled split)
    method_eval_limit: int      # test questions each method of notebooks 06 and 07 is scored on
    method_steps: int           # optimizer steps of each method in notebooks 06 and 07
    method_layers: tuple[int, ...] | None  # the layers those methods adapt (None: all)
    standalone_steps: int       # steps of the short adapter 04/05 train when 03's is missing

    @property
    def run_dir(self) -> str:
        """Where notebook 03 writes its run (04 and 05 read the adapter from it)."""
        return f"experiments/tutorial_{self.mode}/lora"

    def config(self, *overrides: str) -> DictConfig:
        """This mode's training config, writing to ``run_dir``, with ``overrides`` on top."""
        return load_config(self.root / self.config_file, [f"exp_manager.explicit_log_dir={self.run_dir}", *overrides])

    def test_overrides(self, limit: int | None = None) -> list[str]:
        """Overrides that make ``model.data.test_ds`` the first ``limit`` (default ``eval_limit``) test questions."""
        return [f"model.data.test_ds.limit={limit or self.eval_limit}"]

    def adapter_path(self) -> Path:
        return adapter_path_of(self.config())

    def method_overrides(self, scheme: str, lr: float) -> list[str]:
        """Notebooks 06 and 07: ``scheme`` on the same data and budget as the others (``method_steps``,
        ``method_layers``), in its own run directory, with its own learning rate."""
        layers = [] if self.method_layers is None else [
            f"model.peft.{section}.layer_selection=[{','.join(map(str, self.method_layers))}]"
            for section in ("lora_tuning", "adapter_tuning", "ia3_tuning")]
        return [f"model.peft.peft_scheme={scheme}", f"model.optim.lr={lr}", f"trainer.max_steps={self.method_steps}",
                "trainer.val_check_interval=0", *layers,
                f"exp_manager.explicit_log_dir=experiments/tutorial_{self.mode}/methods/{scheme.replace(',', '_')}"]

    def method_config(self, scheme: str, lr: float) -> DictConfig:
        """``method_overrides`` applied to this mode's config (never ``run_dir``: 04 and 05 read 03's adapter)."""
        return load_config(self.root / self.config_file, self.method_overrides(scheme, lr))


MODES = {
    # Notebooks 06 and 07 train nine models between them: to fit a 90-minute class they adapt only the top
    # 15 layers (the backward pass then stops halfway: 1.55x faster) for 16 steps of 8 questions.
    "fast": dict(config_file="conf/peft_tuning.yaml", eval_limit=200, method_eval_limit=100, method_steps=16,
                 method_layers=tuple(range(15, 30)), standalone_steps=24),
    "nemo": dict(config_file="conf/nemo_tutorial.yaml", eval_limit=200, method_eval_limit=200, method_steps=40,
                 method_layers=None, standalone_steps=40),
}


def find_repo_root(start: str | Path | None = None) -> Path:
    """The folder holding ``conf/peft_tuning.yaml``: the working directory or one above it, else the
    checkout this package was imported from."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents, Path(__file__).resolve().parents[1]):
        if (folder / "conf" / "peft_tuning.yaml").is_file():
            return folder
    raise FileNotFoundError(f"cannot find the repository root (a folder with conf/peft_tuning.yaml) above {start}")


def notebook_params(mode: str | None = None, verbose: bool = True) -> NotebookParams:
    """The settings for this run: ``mode`` or ``$LORA_TUTORIAL_MODE`` ("fast" when unset)."""
    mode = (mode or os.environ.get(MODE_ENV) or "fast").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    params = NotebookParams(mode=mode, root=find_repo_root(), **MODES[mode])
    if verbose:
        what = ("this project's recipe (conf/peft_tuning.yaml)" if mode == "fast"
                else "the NeMo LoRA tutorial's settings (conf/nemo_tutorial.yaml)")
        print(f"{mode.upper()} mode: {what}; scores on the first {params.eval_limit} test questions.\n"
              f"(Set {MODE_ENV}=nemo or fast before starting Jupyter to switch.)")
    return params


def ensure_adapter(params: NotebookParams) -> Path:
    """The adapter notebook 03 trained in this mode; when it is missing, train a short one now (so that
    notebooks 04 and 05 also run on their own) and say so."""
    path = params.root / params.adapter_path()
    if path.is_file():
        print(f"Using the adapter notebook 03 trained: {path.relative_to(params.root)}")
        return path
    print(f"{path.relative_to(params.root)} not found (notebook 03 has not run in {params.mode} mode), so a short "
          f"adapter is trained now: {params.standalone_steps} steps instead of 03's full run.")
    cfg = params.config(f"trainer.max_steps={params.standalone_steps}", "trainer.val_check_interval=0")
    train(cfg)
    return params.root / adapter_path_of(cfg)


def start_run(cfg: DictConfig) -> tuple[SFTModel, pl.Trainer]:
    """NeMo's first three steps for one run: the trainer, the experiment manager, the base model."""
    pl.seed_everything(cfg.model.seed, verbose=False)
    trainer = build_trainer(cfg)
    exp_manager(trainer, cfg)
    return SFTModel.restore_from(cfg.model.restore_from_path, cfg, trainer), trainer


def fit_and_score(model: SFTModel, trainer: pl.Trainer, test_ds: DictConfig, label: str) -> dict[str, Any]:
    """``trainer.fit``, then greedy answers to ``test_ds``; returns a row for ``plots.plot_methods`` and the
    results store (method, scores, trainable parameters, steps, seconds)."""
    started = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - started
    scores = answer_dataset(model, test_ds, desc=label).scores
    summary = parameter_summary(model.model)
    print(f"{label}: {scores}; {summary.trainable:,} trainable parameters, "
          f"{trainer.global_step} steps in {seconds:.0f} s")
    return {"method": label, "scores": scores, "f1": scores.f1, "f1_interval": scores.f1_interval,
            "trainable_params": summary.trainable, "percent_of_base": summary.percent_of_base,
            "steps": trainer.global_step, "train_seconds": round(seconds)}


def train_in_subprocess(cfg_file: str | Path, overrides: Sequence[str], report: str | Path,
                        cwd: str | Path | None = None) -> dict[str, Any]:
    """``python -m lora_tutorial train`` in a process of its own (run in ``cwd``, the repository root for
    the configs' relative data paths), so that its peak memory is its own; returns the report it wrote
    (train_seconds, steps, peak_rss_mb, trainable_params, adapter)."""
    report = Path(report).resolve()  # the child runs in ``cwd``: give it the path the parent reads back
    command = [sys.executable, "-m", "lora_tutorial", "train", "--config", str(cfg_file), "--report", str(report),
               "trainer.enable_progress_bar=false", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(overrides)}):\n{done.stderr[-2000:]}")
    return json.loads(report.read_text())


def same_tensors(path_a: str | Path, path_b: str | Path) -> bool:
    """Whether two safetensors files hold the same tensor names with bit-identical values."""
    from safetensors.torch import load_file

    a, b = load_file(str(path_a)), load_file(str(path_b))

    def bits(t: torch.Tensor) -> torch.Tensor:  # the raw bytes: -0.0 differs from 0.0, a NaN equals itself
        return t.contiguous().reshape(-1).view(torch.uint8)

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(bits(a[k]), bits(b[k])) for k in a)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_cell(v, digits) for v in value) + ")"
    return str(value)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], markdown: bool = False, digits: int = 1) -> str:
    """Rows as an aligned text table or a markdown table: integers with thousands separators, floats
    rounded to ``digits`` decimals, numeric columns right-aligned."""
    text = [[_cell(v, digits) for v in row] for row in rows]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows)
               for i in range(len(headers))]
    if markdown:
        def escape(cell: str) -> str:
            return cell.replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        return "\n".join(lines + ["| " + " | ".join(map(escape, row)) + " |" for row in text])
    widths = [max([len(h)] + [len(row[i]) for row in text]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in text])


def interval(value: float, bounds: Sequence[float]) -> str:
    """``61.2 [58.1, 64.3]``: a score with its 95 % interval."""
    return f"{value:.1f} [{bounds[0]:.1f}, {bounds[1]:.1f}]"


def scores_table(named: Mapping[str, Scores], split: str = "test") -> str:
    """Markdown: one row per model, EM and F1 with their 95 % bootstrap intervals."""
    rows = [(name, f"{s.n:,} {split}", interval(s.exact_match, s.em_interval), interval(s.f1, s.f1_interval))
            for name, s in named.items()]
    return format_table(rows, ["model", "questions", "EM [95 % CI]", "F1 [95 % CI]"], markdown=True)


def show_example(record: Mapping[str, Any], width: int = 100) -> str:
    """One SFT record as readable text: the prompt (wrapped), the training target and the gold answers."""
    wrapped = "\n".join(textwrap.fill(line, width) if line else "" for line in record["input"].split("\n"))
    lines = ["input:", textwrap.indent(wrapped, "    "), f"output: {record['output']!r}"]
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
        label = ("-100 (ignored)" if labels[pos] == -100
                 else repr(tokenizer.decode([labels[pos]], skip_special_tokens=False)))
        rows.append((pos, repr(text), label))
    return rows


def prediction_rows(prompts: Sequence[str], golds: Sequence[Sequence[str]], answers: Mapping[str, Sequence[str]],
                    max_chars: int = 60) -> list[list[str]]:
    """One row per question: the question, its first gold answer and each model's answer (shortened)."""
    def short(text: str) -> str:
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"
    return [[short(question_of(p)), short(golds[i][0])] + [short(a[i]) for a in answers.values()]
            for i, p in enumerate(prompts)]


def wrong_answers(prompts: Sequence[str], answers: Sequence[str], golds: Sequence[Sequence[str]],
                  limit: int = 10, max_chars: int = 60) -> list[tuple[str, str, str, float]]:
    """(question, first gold, answer, F1) for the first ``limit`` answers that are not an exact match."""
    em, f1 = per_question_scores(answers, golds)
    rows = [(question_of(p)[:max_chars], g[0][:max_chars], a[:max_chars], score)
            for p, a, g, exact, score in zip(prompts, answers, golds, em, f1) if not exact]
    return rows[:limit]


# ----------------------------------------------------------------------------------------------
# Results store (make tutorial prints it at the end)
# ----------------------------------------------------------------------------------------------


def results_path(mode: str | None = None) -> Path:
    mode = mode or os.environ.get(MODE_ENV) or "fast"
    return find_repo_root() / "experiments" / f"tutorial_{mode}" / "results.json"


def load_results(path: str | Path | None = None) -> dict[str, dict]:
    path = Path(path) if path is not None else results_path()
    return json.loads(path.read_text()) if path.is_file() else {}


def record_result(key: str, method: str, scores: Scores, split: str = "test", path: str | Path | None = None,
                  **extra: Any) -> None:
    """Store one run's scores (with their intervals and the split they were measured on) under ``key``.

    ``extra`` holds what else the table shows: ``trainable_params``, ``train_seconds``, ``steps``.
    """
    path = Path(path) if path is not None else results_path()
    results = load_results(path)
    results[key] = {"method": method, "split": split, "n": scores.n, "em": scores.exact_match, "f1": scores.f1,
                    "em_interval": list(scores.em_interval), "f1_interval": list(scores.f1_interval), **extra,
                    "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(results, path)


def results_table(results: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The stored results as a markdown table, one row per run, in the order they were first recorded."""
    results = load_results() if results is None else results
    if not results:
        return "(no results recorded yet: run the notebooks, or `make tutorial`)"
    rows = [(r["method"], r.get("trainable_params"), r.get("steps"), r.get("train_seconds"), f"{r['n']:,} {r['split']}",
             interval(r["em"], r["em_interval"]), interval(r["f1"], r["f1_interval"])) for r in results.values()]
    return format_table(rows, ["run", "trainable params", "steps", "train s", "questions", "EM [95 % CI]",
                               "F1 [95 % CI]"], markdown=True, digits=0)


def print_results_table(mode: str | None = None) -> None:
    """Print ``results_table`` with the file it came from."""
    path = results_path(mode)
    print(f"Results from {path.relative_to(find_repo_root())}:\n")
    print(results_table(load_results(path)))


# ----------------------------------------------------------------------------------------------
# Asking questions (notebook 05)
# ----------------------------------------------------------------------------------------------


def answer_question(model: SFTModel, context: str, question: str, greedy: bool = True, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 0.9, tokens_to_generate: int = 30, use_chat_template: bool = False,
                    seed: int | None = None) -> str:
    """Answer one question about a context with an ``SFTModel`` (base, or base + adapter).

    The prompt is the training format; ``use_chat_template`` wraps it in the chat template instead (the
    fair way to ask the untuned instruct model). ``seed`` makes sampling repeatable without touching
    torch's global random state.
    """
    prompt = format_prompt(context, question)
    ids = model.tokenizer.encode(prompt)
    batch = {"input_ids": torch.tensor([ids]), "prompt_lens": torch.tensor([len(ids)]), "prompts": [prompt]}
    generator = torch.Generator(model.model.wte.weight.device).manual_seed(seed) if seed is not None else None
    return model.generate_answers(batch, generator=generator, use_chat_template=use_chat_template, greedy=greedy,
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  tokens_to_generate=tokens_to_generate)[0]


DEMO_CONTEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. This basin "
                "encompasses seven million square kilometres, of which five and a half million square "
                "kilometres are covered by the rainforest. The majority of the forest is contained within "
                "Brazil, with 60% of the rainforest, followed by Peru with 13%, and Colombia with 10%.")
DEMO_QUESTION = "Which country contains most of the Amazon rainforest?"


def qa_demo(model: SFTModel, context: str = DEMO_CONTEXT, question: str = DEMO_QUESTION,
            answer_fn: Callable[..., str] = answer_question):
    """An ipywidgets box: context and question in, answer out, with greedy / sampling knobs.

    All the work happens in ``answer_fn(model, context, question, **knobs)``; this only wires widgets.
    Returns the box; ``box.answer()`` does what the button does (and returns the answer text).
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

    def sync(_: Any = None) -> None:
        for knob in (temperature, top_k, top_p):
            knob.disabled = greedy.value
    greedy.observe(sync, "value")
    sync()

    def answer(_: Any = None) -> str:
        text = answer_fn(model, context_box.value, question_box.value, greedy=greedy.value,
                         temperature=temperature.value, top_k=top_k.value, top_p=top_p.value,
                         tokens_to_generate=tokens.value, use_chat_template=chat.value)
        out.clear_output()
        out.append_stdout(f"Answer: {text}\n")
        return text
    button.on_click(answer)
    knobs = w.HBox([w.VBox([greedy, chat, tokens]), w.VBox([temperature, top_k, top_p])])
    box = w.VBox([context_box, question_box, knobs, button, out])
    box.answer = answer
    return box


__all__ = ["NotebookParams", "notebook_params", "ensure_adapter", "start_run", "fit_and_score", "train_in_subprocess",
           "format_table", "interval", "scores_table", "show_example", "label_view", "prediction_rows",
           "wrong_answers", "record_result", "load_results", "results_table", "print_results_table",
           "answer_question", "qa_demo", "DEMO_CONTEXT", "DEMO_QUESTION"]
