"""Does a faster evaluation precision change the scores? float32 vs bf16 vs int8, on the validation split.

    python bench/precision_equivalence.py     # about 8 minutes on 2 cores (trains the recipe first if missing)

The notebooks and ``make tutorial`` evaluate with bf16 weights (``trainer.precision: auto`` on a CPU with
native bf16), and ``inference.quantize_int8`` offers int8 weights. This scores the recipe's adapter
(``conf/peft_tuning.yaml``, the one ``bench/test_split.py`` trains) on all 500 validation questions three
times with ``python -m lora_tutorial evaluate``: float32, bf16 and int8. Besides each EM/F1 with its 95 %
interval it reports the *paired* difference to float32 (per-question F1 differences, bootstrap interval):
the question is whether that interval contains 0, and how many answers change at all. The validation
split, not the test split: this is a check of the implementation, and no setting is chosen here on the
questions the headline scores use. Writes ``bench/precision_equivalence.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from test_split import RUNS, evaluate, train

from lora_tutorial.metrics import bootstrap_interval, per_question_scores

REPO = Path(__file__).resolve().parents[1]
SPLIT = "data/SQuAD/splits/validation.jsonl"
PRECISIONS = {"fp32": ["trainer.precision=32"], "bf16": ["trainer.precision=bf16-mixed"],
              "int8": ["trainer.precision=bf16-mixed", "inference.quantize_int8=true"]}


def main() -> None:
    adapter = train("fast", RUNS["fast"])["adapter"]
    out_dir = REPO / "experiments" / "precision_equivalence"
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "split": SPLIT, "adapter": adapter}
    per_question = {}
    for name, overrides in PRECISIONS.items():
        predictions = out_dir / f"{name}.jsonl"
        results[name] = evaluate(adapter, predictions, f"model.data.test_ds.file_names=[{SPLIT}]", *overrides)
        # split on b"\n" only: the file keeps characters like U+2028 raw, which splitlines() would break on
        rows = [json.loads(line) for line in predictions.read_bytes().split(b"\n") if line]
        per_question[name] = rows, per_question_scores([r["prediction"] for r in rows], [r["answers"] for r in rows])[1]
        print(f"{name}: {results[name]['line']}", flush=True)
    reference_rows, reference_f1 = per_question["fp32"]
    for name in ("bf16", "int8"):
        rows, f1 = per_question[name]
        if [r["input"] for r in rows] != [r["input"] for r in reference_rows]:
            raise SystemExit(f"{name}: its predictions are not the same questions in the same order as fp32's")
        differences = [a - b for a, b in zip(f1, reference_f1)]
        low, high = bootstrap_interval(differences)
        changed = sum(r["prediction"] != s["prediction"] for r, s in zip(rows, reference_rows))
        results[f"{name}_vs_fp32"] = {"f1_difference": sum(differences) / len(differences),
                                      "f1_difference_interval": [low, high], "answers_changed": changed,
                                      "questions": len(rows)}
        print(f"{name} - fp32: F1 {sum(differences) / len(differences):+.2f} [{low:+.2f}, {high:+.2f}], "
              f"{changed} of {len(rows)} answers differ", flush=True)
    path = REPO / "bench" / "precision_equivalence.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
