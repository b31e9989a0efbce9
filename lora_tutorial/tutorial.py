"""Notebook support: the run sizes (quick or full), the working directory, and a small results store.

Every notebook starts with one "parameters" cell::

    from lora_tutorial.tutorial import notebook_params
    P = notebook_params()        # reads LORA_TUTORIAL_QUICK, moves to the repository root

``P`` holds the sizes the notebook uses. In **full** mode (the default) they are the seed's settings:
100 optimizer steps of 4 examples on the 200-question training subset, validation every 50 steps on the
20 validation questions; notebook 05 also compares base and tuned on the first 500 development
questions, and notebook 06 trains each other PEFT method for 40 steps. Everything else (the LoRA knobs,
the learning rate) comes from ``conf/peft_tuning.yaml`` unchanged. With ``LORA_TUTORIAL_QUICK=1`` (what
``make test`` sets for nbval) every size shrinks so that each notebook runs in well under three minutes
on two CPU cores: the code path is the same, only the numbers are smaller (and the results meaningless).

The notebooks pass their numbers to ``record_result`` and the last step of ``make tutorial`` prints
them with ``print_results_table``: zero-shot versus tuned EM/F1 and training time per method. Quick and
full runs keep separate files (``experiments/tutorial_results[.quick].json``), and so do their
experiment directories, so a test run never overwrites the adapter or numbers of a full run.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

QUICK_ENV = "LORA_TUTORIAL_QUICK"


@dataclass(frozen=True)
class NotebookParams:
    """The sizes one tutorial run uses; ``notebook_params()`` fills them for quick or full mode."""

    quick: bool
    train_steps: int           # optimizer steps of the LoRA run (03)
    val_check_interval: int    # validate every N optimizer steps during training (0: never)
    val_limit: int | None      # validation questions used during training (None: all 20)
    log_every_n_steps: int     # log the training loss every N steps (1, not the seed's 5: a denser loss curve)
    eval_limit: int | None     # questions for the zero-shot / tuned evaluations (None: all 20)
    big_eval_limit: int | None  # first N questions of the full dev set for the larger evaluation in 05 (None: skip)
    other_steps: int           # optimizer steps of each method in 06
    other_eval_limit: int | None  # validation questions for each method in 06 (None: all 20)
    histogram_limit: int | None   # dev questions whose token lengths 01 plots (None: all 10,570)
    lora_log_dir: str          # where 03 writes its run (04 and 05 read the adapter from it)
    root: str                  # the repository root (the working directory after notebook_params())

    def overrides(self) -> list[str]:
        """The config overrides (``key=value``) that turn the seed's LoRA run into this run's size."""
        out = [f"trainer.max_steps={self.train_steps}", f"trainer.val_check_interval={self.val_check_interval}",
               f"trainer.log_every_n_steps={self.log_every_n_steps}",
               f"exp_manager.explicit_log_dir={self.lora_log_dir}"]
        if self.val_limit is not None:
            out.append(f"model.data.validation_ds.limit={self.val_limit}")
        return out

    def eval_overrides(self) -> list[str]:
        """Overrides of ``conf/peft_eval.yaml`` for notebook 05 (fewer test questions in quick mode)."""
        return [] if self.eval_limit is None else [f"model.data.test_ds.limit={self.eval_limit}"]

    def method_overrides(self, scheme: str) -> list[str]:
        """Overrides for one run of notebook 06: ``scheme`` (e.g. "ia3", "lora,ptuning") trained for
        ``other_steps`` steps without validation, in its own log dir (``experiments/peft_<scheme>``, never
        the LoRA run of notebook 03 that 04 and 05 read), evaluated afterwards."""
        suffix = "_quick" if self.quick else ""
        out = [f"model.peft.peft_scheme={scheme}", f"trainer.max_steps={self.other_steps}",
               "trainer.val_check_interval=0", f"trainer.log_every_n_steps={self.log_every_n_steps}",
               f"exp_manager.explicit_log_dir=experiments/peft_{scheme.replace(',', '_')}{suffix}"]
        if self.other_eval_limit is not None:
            out.append(f"model.data.validation_ds.limit={self.other_eval_limit}")
        return out

    def trained_adapter(self) -> Path:
        """The adapter file notebook 03 wrote for this mode; a clear error if 03 has not run yet."""
        from .config import load_config
        from .training import adapter_path_of

        path = Path(self.root) / adapter_path_of(load_config(Path(self.root) / "conf" / "peft_tuning.yaml",
                                                             self.overrides()))
        if not path.is_file():
            mode = "LORA_TUTORIAL_QUICK=1 (quick mode)" if self.quick else "full mode"
            raise FileNotFoundError(f"{path} does not exist: run notebooks/03_training.ipynb first, in the same "
                                    f"mode ({mode}); it trains LoRA and writes this adapter file")
        return path.relative_to(self.root) if Path.cwd() == Path(self.root) else path


FULL = dict(train_steps=100, val_check_interval=50, val_limit=None, log_every_n_steps=1, eval_limit=None,
            big_eval_limit=500, other_steps=40, other_eval_limit=None, histogram_limit=None,
            lora_log_dir="experiments/tutorial_lora")
QUICK = dict(train_steps=4, val_check_interval=4, val_limit=4, log_every_n_steps=1, eval_limit=4,
             big_eval_limit=None, other_steps=3, other_eval_limit=4, histogram_limit=500,
             lora_log_dir="experiments/tutorial_lora_quick")


def is_quick() -> bool:
    """True when ``LORA_TUTORIAL_QUICK`` is set to anything but "", "0", "false" or "no"."""
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def find_repo_root(start: str | Path | None = None) -> Path:
    """The folder holding ``conf/peft_tuning.yaml``: the working directory or one above it, else the
    checkout this package was imported from."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "conf" / "peft_tuning.yaml").is_file():
            return folder
    here = Path(__file__).resolve().parents[1]
    if (here / "conf" / "peft_tuning.yaml").is_file():
        return here
    raise FileNotFoundError(f"cannot find the repository root (a folder with conf/peft_tuning.yaml) above {start}")


def quiet_logs() -> None:
    """Keep notebook output to what teaches: no Lightning banners about absent GPUs/TPUs, no
    warnings about DataLoader workers (the data is tokenized lazily and 0 workers is the right choice)."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "pytorch_lightning.accelerators.cuda", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def notebook_params(quick: bool | None = None, chdir: bool = True, verbose: bool = True) -> NotebookParams:
    """Sizes for this run (quick when ``LORA_TUTORIAL_QUICK`` is set) and ``cwd`` = the repository root.

    Moving to the root makes the paths of ``conf/*.yaml`` (``data/SQuAD/...``, ``experiments/...``) work
    from ``notebooks/``, where Jupyter starts the kernel.
    """
    quick = is_quick() if quick is None else quick
    root = find_repo_root()
    if chdir:
        os.chdir(root)
    quiet_logs()
    params = NotebookParams(quick=quick, root=str(root), **(QUICK if quick else FULL))
    if verbose:
        mode = (f"QUICK mode ({QUICK_ENV} is set): tiny sizes, for testing only; results are meaningless" if quick
                else "FULL mode: the seed's settings")
        val = (f"every {params.val_check_interval} steps on {params.val_limit or 20} questions"
               if params.val_check_interval else "off")
        print(f"{mode}\n  LoRA training: {params.train_steps} steps, validation {val}\n"
              f"  evaluations: {params.eval_limit or 20} questions; "
              f"other PEFT methods: {params.other_steps} steps each")
    return params


# ----------------------------------------------------------------------------------------------
# Base vs. tuned on one dataloader (notebook 05)
# ----------------------------------------------------------------------------------------------

def predict_base_and_tuned(model, trainer, dataloader) -> dict[str, Any]:
    """``trainer.predict`` twice on the same questions and score both (SQuAD EM/F1).

    * tuned: base + adapter with the seed's prompt (the model's inference config as set);
    * base: adapters switched off with ``disable_adapters`` and the prompt wrapped in the chat template,
      the fair zero-shot setting for an instruct model.

    The model's inference config is restored afterwards. Returns ``prompts``, ``golds``, ``answers`` and
    ``scores`` (each a dict keyed "base (chat template)" / "base + adapter") and ``seconds`` per model.
    """
    from .metrics import score_predictions
    from .peft import disable_adapters
    from .sft_model import collect_predictions

    started = time.perf_counter()
    tuned, golds, prompts = collect_predictions(trainer.predict(model, dataloader))
    seconds = {"base + adapter": time.perf_counter() - started}
    saved = dict(model.inference_cfg)
    model.set_inference_config({"use_chat_template": True})
    started = time.perf_counter()
    try:
        with disable_adapters(model.model):
            base, _, _ = collect_predictions(trainer.predict(model, dataloader))
    finally:
        model.set_inference_config(saved)
    seconds["base (chat template)"] = time.perf_counter() - started
    answers = {"base (chat template)": base, "base + adapter": tuned}
    return {"prompts": prompts, "golds": golds, "answers": answers, "seconds": seconds,
            "scores": {name: score_predictions(a, golds) for name, a in answers.items()}}


# ----------------------------------------------------------------------------------------------
# Results store
# ----------------------------------------------------------------------------------------------

def results_path(quick: bool | None = None, root: str | Path | None = None) -> Path:
    """``experiments/tutorial_results.json`` (full runs) or ``tutorial_results.quick.json`` (quick runs)."""
    quick = is_quick() if quick is None else quick
    root = Path(root) if root is not None else find_repo_root()
    return root / "experiments" / ("tutorial_results.quick.json" if quick else "tutorial_results.json")


def load_results(path: str | Path | None = None) -> dict[str, dict]:
    path = Path(path) if path is not None else results_path()
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def record_result(key: str, values: Mapping[str, Any], path: str | Path | None = None) -> None:
    """Merge ``values`` into the entry ``key`` of the results file (created if needed).

    Typical keys in an entry: ``method``, ``trainable_params``, ``train_steps``, ``train_seconds``,
    ``n_eval``, ``zero_shot_em``, ``zero_shot_f1``, ``tuned_em``, ``tuned_f1``. Numbers are stored as given.
    Returns None, so that a notebook cell ending with it shows nothing; ``load_results()[key]`` reads it back.
    """
    path = Path(path) if path is not None else results_path()
    results = load_results(path)
    entry = {**results.get(key, {}), **dict(values), "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    results[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


RESULT_COLUMNS = (  # (header, key, format)
    ("run", "method", ""),
    ("trainable params", "trainable_params", ",d"),
    ("steps", "train_steps", "d"),
    ("train time (s)", "train_seconds", ".0f"),
    ("eval questions", "n_eval", "d"),
    ("zero-shot EM", "zero_shot_em", ".1f"),
    ("zero-shot F1", "zero_shot_f1", ".1f"),
    ("tuned EM", "tuned_em", ".1f"),
    ("tuned F1", "tuned_f1", ".1f"),
)


def results_table(results: Mapping[str, Mapping[str, Any]] | None = None, path: str | Path | None = None) -> str:
    """The stored results as a markdown table, one row per key (in the order they were first recorded).

    Zero-shot is the base model with its chat template; tuned is base + the trained adapter on the same
    questions (``n_eval``). A missing number shows as "–".
    """
    if results is None:
        results = load_results(path)
    if not results:
        return "(no results recorded yet: run the notebooks, or `make tutorial`)"
    headers = [h for h, _, _ in RESULT_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in
                                                               range(len(headers))) + "|"]
    for key, entry in results.items():
        cells = []
        for _, field, spec in RESULT_COLUMNS:
            value = entry.get(field, key) if field == "method" else entry.get(field)
            cells.append(_fmt(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_results_table(path: str | Path | None = None) -> None:
    """Print ``results_table`` with a line saying which file (quick or full run) it came from."""
    path = Path(path) if path is not None else results_path()
    print(f"Results from {path}:\n")
    print(results_table(path=path))


__all__ = ["NotebookParams", "notebook_params", "is_quick", "find_repo_root", "quiet_logs", "predict_base_and_tuned",
           "results_path", "load_results", "record_result", "results_table", "print_results_table"]
