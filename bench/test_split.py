"""The README's headline scores: the 1,000-question test split, once, for the chosen recipe.

    python bench/test_split.py            # trains what is missing, then scores (about 15 minutes on 2 cores)

Scores three models on all of ``data/SQuAD/splits/test.jsonl`` with ``python -m lora_tutorial evaluate``:
the base model zero-shot (its chat template), this project's recipe (``conf/peft_tuning.yaml``) and NeMo's
tutorial settings (``conf/nemo_tutorial.yaml``), each trained by ``python -m lora_tutorial train`` in its
own process (``--report`` gives its time and peak memory). Nothing here chooses a setting: the recipe was
chosen on the validation split (``bench/recipe_sweep.py``). Writes ``bench/test_split.json``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {"fast": "conf/peft_tuning.yaml", "nemo": "conf/nemo_tutorial.yaml"}


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lora_tutorial", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lora_tutorial {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def train(name: str, config: str) -> dict:
    """``python -m lora_tutorial train`` in its own process (the notebooks' helper); its report, reused when present."""
    log_dir = REPO / "experiments" / "test_split" / name
    report = log_dir / "report.json"
    if report.exists():
        return json.loads(report.read_text())
    from lora_tutorial.notebook import train_in_subprocess  # here: it imports Lightning, which main() need not

    print(f"training {name} ({config})", flush=True)
    return train_in_subprocess(config, [f"exp_manager.explicit_log_dir={log_dir}"], report, cwd=REPO)


def evaluate(adapter: str | None, out: Path, *extra: str) -> dict:
    """EM/F1 with intervals from ``python -m lora_tutorial evaluate`` on the whole test split."""
    started = time.perf_counter()
    stdout = cli("evaluate", f"model.peft.restore_from_path={adapter or 'null'}", "model.data.test_ds.limit=null",
                 f"inference.output_file={out}", "trainer.enable_progress_bar=false", *extra)
    line = stdout.strip().splitlines()[-1]  # "EM 61.2 [58.1, 64.3]  F1 70.1 [67.4, 72.8]  on 1,000 questions ..."
    em, em_low, em_high, f1, f1_low, f1_high = map(float, re.findall(r"-?\d+\.\d+", line.split(" on ")[0])[:6])
    return {"em": em, "em_interval": [em_low, em_high], "f1": f1, "f1_interval": [f1_low, f1_high],
            "n": int(re.search(r"on ([\d,]+) questions", line)[1].replace(",", "")),
            "seconds": round(time.perf_counter() - started, 1), "line": line}


def main() -> None:
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "split": "data/SQuAD/splits/test.jsonl"}
    out_dir = REPO / "experiments" / "test_split"
    results["zero_shot"] = evaluate(None, out_dir / "zero_shot.jsonl", "inference.use_chat_template=true")
    print("zero-shot:", results["zero_shot"]["line"], flush=True)
    for name, config in RUNS.items():
        run = train(name, config)
        results[name] = {"train": run, "test": evaluate(run["adapter"], out_dir / f"{name}.jsonl")}
        print(f"{name}:", results[name]["test"]["line"], flush=True)
    path = REPO / "bench" / "test_split.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
