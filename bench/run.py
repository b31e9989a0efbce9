"""Benchmarks: lora_tutorial vs Hugging Face transformers + PEFT on the same SmolLM2 weights.

    make bench                      # everything (about 15 minutes on 2 CPU cores)
    python bench/run.py --quick     # fewer steps/repeats, no 500-question evaluation

Every measurement runs in its own process (``bench/workers.py``) so peak RSS is per implementation, and
ours/HF alternate so that a slow moment of the machine does not favour one side. Prints a table and
writes ``bench/results.json`` (git-ignored) with the ratios and the raw figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def worker(*args: str) -> dict:
    cmd = [sys.executable, str(HERE / "workers.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {' '.join(args):45s} -> {json.dumps(result)}", flush=True)
    return result


def best_of(results: list[dict], key: str = "tokens_per_s") -> dict:
    return max(results, key=lambda r: r[key])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run(quick: bool) -> dict:
    steps = "4" if quick else "10"
    rounds = 1 if quick else 2
    raw: dict[str, list] = {"train_micro1": [], "train_micro4": [], "decode_b1": [], "decode_b16": []}
    print("Loss parity (same A/B, same batches):", flush=True)
    parity = worker("lossparity")
    for r in range(rounds):
        order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
        print(f"Round {r + 1}/{rounds} ({' then '.join(order)}):", flush=True)
        for impl in order:
            raw["train_micro1"].append(worker("train", "--impl", impl, "--micro", "1", "--steps", steps))
            raw["train_micro4"].append(worker("train", "--impl", impl, "--micro", "4", "--steps", "3" if quick else "5"))
            raw["decode_b1"].append(worker("decode", "--impl", impl, "--batch", "1"))
            raw["decode_b16"].append(worker("decode", "--impl", impl, "--batch", "16"))

    def pick(kind: str, impl: str) -> dict:
        return best_of([r for r in raw[kind] if r["impl"] == impl])

    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "loss_parity": parity}
    for kind in raw:
        results[kind] = {"ours": pick(kind, "ours"), "hf": pick(kind, "hf")}
    t1 = results["train_micro1"]
    results["train_tokens_per_s_ratio"] = t1["ours"]["tokens_per_s"] / t1["hf"]["tokens_per_s"]
    results["train_peak_rss_ratio"] = t1["ours"]["peak_rss_mb"] / t1["hf"]["peak_rss_mb"]
    t4 = results["train_micro4"]
    results["train_micro4_tokens_per_s_ratio"] = t4["ours"]["tokens_per_s"] / t4["hf"]["tokens_per_s"]
    d1, d16 = results["decode_b1"], results["decode_b16"]
    results["decode_b1_tokens_per_s_ratio"] = d1["ours"]["tokens_per_s"] / d1["hf"]["tokens_per_s"]
    results["decode_batched_vs_hf_b1_ratio"] = d16["ours"]["tokens_per_s"] / d1["hf"]["tokens_per_s"]
    results["decode_b16_tokens_per_s_ratio"] = d16["ours"]["tokens_per_s"] / d16["hf"]["tokens_per_s"]
    if not quick:
        print("Evaluation (zero-shot, chat template) on dev[:500]:", flush=True)
        results["evaluate_dev500"] = worker("evaluate", "--n", "500")
    return results


def table(results: dict) -> str:
    rows = [("benchmark", "ours", "HF + PEFT", "ratio")]
    for kind, label in (("train_micro1", "LoRA training, micro batch 1 (tokens/s)"),
                        ("train_micro4", "LoRA training, micro batch 4 (tokens/s)"),
                        ("decode_b1", "greedy decoding, batch 1 (tokens/s)"),
                        ("decode_b16", "greedy decoding, batch 16 (tokens/s)")):
        ours, hf = results[kind]["ours"]["tokens_per_s"], results[kind]["hf"]["tokens_per_s"]
        rows.append((label, f"{ours:.1f}", f"{hf:.1f}", f"{ours / hf:.2f}x"))
    t1 = results["train_micro1"]
    rows.append(("LoRA training, micro batch 1: peak RSS (MB)", f"{t1['ours']['peak_rss_mb']:.0f}",
                 f"{t1['hf']['peak_rss_mb']:.0f}", f"{results['train_peak_rss_ratio']:.2f}x"))
    rows.append(("batched decoding (b16) vs HF batch 1", f"{results['decode_b16']['ours']['tokens_per_s']:.1f}",
                 f"{results['decode_b1']['hf']['tokens_per_s']:.1f}", f"{results['decode_batched_vs_hf_b1_ratio']:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    extra = [f"loss parity (max |ours - HF| over 4 real batches): {results['loss_parity']['max_abs_loss_diff']:.2e}"]
    if "evaluate_dev500" in results:
        e = results["evaluate_dev500"]
        extra.append(f"EM/F1 evaluation of dev[:500] (zero-shot, chat template): {e['seconds']:.0f} s "
                     f"(EM {e['exact_match']:.1f}, F1 {e['f1']:.1f})")
    return "\n".join(lines + [""] + extra + [f"machine: {results['machine']}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    results = run(args.quick)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
