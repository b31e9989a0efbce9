"""How the default recipe was chosen: train a grid of settings, score each on the *validation* split.

    python bench/recipe_sweep.py                 # every run not yet in bench/recipe_sweep.jsonl
    python bench/recipe_sweep.py --table         # print the results as a markdown table

Each run is ``python -m lora_tutorial train`` with the overrides below (no validation during training),
then greedy answers to the 500 validation questions (``data/SQuAD/splits/validation.jsonl``: held-out
*training* articles). The test split is never touched here: the README's test scores come from the one
setting chosen on these numbers. Results are appended to ``bench/recipe_sweep.jsonl`` as they finish,
so the sweep can be stopped and resumed; the committed file is the record behind the README's table.
Run it on a quiet machine: the times are part of the choice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "recipe_sweep.jsonl"

BASE = ["trainer.precision=bf16-mixed", "trainer.val_check_interval=0", "trainer.enable_progress_bar=false",
        "model.micro_batch_size=4", "model.global_batch_size=8", "trainer.max_steps=64",
        "model.peft.lora_tuning.target_modules=[all]", "model.peft.lora_tuning.adapter_dim=32",
        "model.peft.lora_tuning.alpha=32", "exp_manager.create_checkpoint_callback=false"]
# name -> overrides on top of conf/peft_tuning.yaml + BASE. "examples" = steps x global batch, each a new question.
GRID: dict[str, list[str]] = {
    # learning rate, at 512 questions (64 steps x 8)
    "lr5e-4": ["model.optim.lr=5e-4"],
    "lr1e-3": ["model.optim.lr=1e-3"],
    "lr3e-4": ["model.optim.lr=3e-4"],
    "lr2e-4": ["model.optim.lr=2e-4"],
    # LoRA on the top half of the layers only: the backward pass stops halfway (faster)
    "lr5e-4_top15": ["model.optim.lr=5e-4", "model.peft.lora_tuning.layer_selection=[15,16,17,18,19,20,21,22,23,"
                     "24,25,26,27,28,29]"],
    # NeMo's targets, rank, batch size
    "lr5e-4_qkv": ["model.optim.lr=5e-4", "model.peft.lora_tuning.target_modules=[attention_qkv]"],
    "lr5e-4_r8": ["model.optim.lr=5e-4", "model.peft.lora_tuning.adapter_dim=8", "model.peft.lora_tuning.alpha=8"],
    "lr5e-4_b16": ["model.optim.lr=5e-4", "model.global_batch_size=16", "trainer.max_steps=32"],
    # the prompts in the instruct model's own chat template, the answer as its reply
    "lr5e-4_chat": ["model.optim.lr=5e-4", "model.data.train_ds.chat_template=true",
                    "model.data.validation_ds.chat_template=true",
                    "model.data.train_ds.prompt_template='{input}{output}'",
                    "model.data.validation_ds.prompt_template='{input}{output}'"],
    # notebooks 06 and 07: each method's learning rate, at their budget (16 steps x 8, the top 15 layers)
    **{f"method_{scheme.replace(',', '+')}_lr{lr}": [
        f"model.peft.peft_scheme={scheme}", f"model.optim.lr={lr}", "trainer.max_steps=16",
        *[f"model.peft.{section}.layer_selection=[15,16,17,18,19,20,21,22,23,24,25,26,27,28,29]"
          for section in ("lora_tuning", "adapter_tuning", "ia3_tuning")]]
       for scheme, lrs in (("lora", ("5e-4", "1e-3", "2e-3", "4e-3")), ("adapter", ("1e-3", "3e-3", "1e-2")),
                           ("ia3", ("3e-3", "1e-2", "3e-2", "1e-1")), ("ptuning", ("1e-3", "1e-2", "3e-2")),
                           ("lora,ptuning", ("2e-3",)))
       for lr in lrs},
    # how many questions
    "lr5e-4_256q": ["model.optim.lr=5e-4", "trainer.max_steps=32"],
    "lr5e-4_1024q": ["model.optim.lr=5e-4", "trainer.max_steps=128"],
}


def run_one(name: str, overrides: list[str]) -> dict:
    import torch

    from lora_tutorial.config import load_config
    from lora_tutorial.evaluation import answer_dataset
    from lora_tutorial.training import train

    log_dir = f"exp_manager.explicit_log_dir=/tmp/recipe_sweep/{name}"
    cfg = load_config(REPO / "conf/peft_tuning.yaml", BASE + overrides + [log_dir])
    result = train(cfg)
    examples = cfg.trainer.max_steps * cfg.model.global_batch_size
    validation = cfg.model.data.validation_ds.copy()
    validation.limit = 500
    result.model.model.requires_grad_(False)
    with torch.no_grad():
        scores = answer_dataset(result.model, validation, progress=False)
    s = scores.scores
    return {"name": name, "overrides": overrides, "examples": examples, "train_seconds": round(result.train_seconds, 1),
            "validation_n": s.n, "em": round(s.exact_match, 2), "f1": round(s.f1, 2),
            "em_interval": [round(x, 2) for x in s.em_interval], "f1_interval": [round(x, 2) for x in s.f1_interval],
            "eval_seconds": round(scores.seconds, 1), "date": time.strftime("%Y-%m-%d %H:%M")}


def done() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    return {r["name"]: r for r in map(json.loads, RESULTS.read_text().splitlines())}


def table() -> str:
    """The recorded runs as a markdown table, in the grid's order (recipe runs, then each method's)."""
    from lora_tutorial.notebook import format_table, interval

    results = done()
    rows = [(r["name"], r["examples"], round(r["train_seconds"]), interval(r["em"], r["em_interval"]),
             interval(r["f1"], r["f1_interval"])) for r in (results[name] for name in GRID if name in results)]
    return format_table(rows, ["run", "examples", "train s", "validation EM [95 % CI]", "validation F1 [95 % CI]"],
                        markdown=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="print the results so far and exit")
    parser.add_argument("--only", nargs="*", help="run only these grid entries")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one entry, in this process (the sweep starts one per run)
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    if args.run:
        row = run_one(args.run, GRID[args.run])
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return
    unknown = [name for name in args.only or () if name not in GRID]
    if unknown:
        parser.error(f"--only: unknown grid entries {', '.join(unknown)}; known: {', '.join(GRID)}")
    finished = done()
    for name in args.only or GRID:  # in the order given
        if name in finished:
            continue
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, __file__, "--run", name], check=True)  # a fresh process per run
    print(table())


if __name__ == "__main__":
    sys.exit(main())
