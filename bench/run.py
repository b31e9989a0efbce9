"""Benchmarks: lora_tutorial vs Hugging Face transformers + PEFT on the same SmolLM2 weights.

    make bench                      # everything (about 30 minutes on 2 CPU cores)
    python bench/run.py --quick     # fewer steps/repeats, no 500-question evaluation

Four variants: ours and HF + PEFT, each in float32 and in bf16 mixed precision. Every measurement runs in
its own process (``bench/workers.py``) so peak RSS is per variant, rounds alternate the order so that a
slow moment of the machine does not favour one side, and the best round counts. Prints a table and
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


VARIANTS = (("ours", "int8"), ("ours", "bf16"), ("ours", "32"), ("hf", "32"), ("hf", "bf16"))
LABELS = {("ours", "int8"): "ours int8", ("ours", "bf16"): "ours bf16-mixed", ("ours", "32"): "ours fp32",
          ("hf", "32"): "HF+PEFT fp32", ("hf", "bf16"): "HF+PEFT bf16"}
TRAINS = {"32", "bf16"}  # int8 weights are for generation only


def key(impl: str, precision: str) -> str:
    return impl if precision == "32" else f"{impl}_{precision}"


def run(quick: bool) -> dict:
    steps = "4" if quick else "10"
    rounds = 1 if quick else 2
    kinds = ("train_micro1", "train_micro4", "decode_b1", "decode_b16")
    raw: dict[str, list] = {kind: [] for kind in kinds}
    print("Loss parity (same A/B, same batches):", flush=True)
    parity = worker("lossparity")
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]  # alternate, so no variant always goes first
        print(f"Round {r + 1}/{rounds}:", flush=True)
        for impl, precision in order:
            common = ("--impl", impl, "--precision", precision)
            if precision in TRAINS:
                raw["train_micro1"].append(worker("train", *common, "--micro", "1", "--steps", steps))
                raw["train_micro4"].append(worker("train", *common, "--micro", "4", "--steps", "3" if quick else "5"))
            raw["decode_b1"].append(worker("decode", *common, "--batch", "1"))
            raw["decode_b16"].append(worker("decode", *common, "--batch", "16"))

    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": "python bench/run.py"
               + (" --quick" if quick else ""), "loss_parity": parity}
    for kind in kinds:
        results[kind] = {key(i, p): best_of([r for r in raw[kind] if r["impl"] == i and r["precision"] == p])
                         for i, p in VARIANTS if kind.startswith("decode") or p in TRAINS}

    def ratio(kind: str, ours: str, hf: str, field: str = "tokens_per_s") -> float:
        return results[kind][ours][field] / results[kind][hf][field]

    # The issue's ratios: ours as recommended on a CPU (bf16-mixed) against HF + PEFT as it comes (fp32).
    results["train_tokens_per_s_ratio"] = ratio("train_micro1", "ours_bf16", "hf")
    results["train_peak_rss_ratio"] = ratio("train_micro1", "ours_bf16", "hf", "peak_rss_mb")
    results["train_micro4_tokens_per_s_ratio"] = ratio("train_micro4", "ours_bf16", "hf")
    # Decoding: ours with int8 weights (the fastest at batch 1), and bf16, against HF + PEFT fp32.
    results["decode_b1_tokens_per_s_ratio"] = ratio("decode_b1", "ours_int8", "hf")
    results["decode_b1_bf16_tokens_per_s_ratio"] = ratio("decode_b1", "ours_bf16", "hf")
    best_batched = max(results["decode_b16"].values(), key=lambda r: r["tokens_per_s"])
    results["decode_batched_vs_hf_b1_ratio"] = best_batched["tokens_per_s"] / results["decode_b1"]["hf"]["tokens_per_s"]
    results["decode_batched_best_variant"] = f"{best_batched['impl']} {best_batched['precision']}"
    # Like for like: the same precision on both sides.
    results["same_precision_ratios"] = {
        f"{kind}_{p}": ratio(kind, key("ours", p), key("hf", p)) for kind in kinds for p in ("32", "bf16")}
    results["same_precision_ratios"].update({
        f"train_micro1_peak_rss_{p}": ratio("train_micro1", key("ours", p), key("hf", p), "peak_rss_mb")
        for p in ("32", "bf16")})
    if not quick:
        for precision in ("int8", "32"):
            print(f"Evaluation (zero-shot, chat template, {precision}) on dev[:500]:", flush=True)
            results[f"evaluate_dev500_{precision}"] = worker("evaluate", "--precision", precision, "--n", "500")
    return results


def table(results: dict) -> str:
    names = [key(i, p) for i, p in VARIANTS]
    rows = [("benchmark", *(LABELS[v] for v in VARIANTS))]

    def cell(kind: str, name: str, field: str = "tokens_per_s", fmt: str = "{:.1f}") -> str:
        return fmt.format(results[kind][name][field]) if name in results[kind] else "-"

    for kind, label in (("train_micro1", "LoRA training, micro batch 1 (tokens/s)"),
                        ("train_micro4", "LoRA training, micro batch 4 (tokens/s)"),
                        ("decode_b1", "greedy decoding, batch 1 (tokens/s)"),
                        ("decode_b16", "greedy decoding, batch 16 (tokens/s)")):
        rows.append((label, *(cell(kind, n) for n in names)))
    rows.append(("LoRA training, micro batch 1: peak RSS (MB)",
                 *(cell("train_micro1", n, "peak_rss_mb", "{:.0f}") for n in names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    p = results["loss_parity"]
    extra = ["Targets (against HF + PEFT fp32):",
             f"  training, ours bf16-mixed: tokens/s x{results['train_tokens_per_s_ratio']:.2f} (target >= 1.5) "
             f"at peak RSS x{results['train_peak_rss_ratio']:.2f} (target <= 0.8)",
             f"  decoding batch 1, ours int8: x{results['decode_b1_tokens_per_s_ratio']:.2f} (target >= 2; "
             f"ours bf16: x{results['decode_b1_bf16_tokens_per_s_ratio']:.2f})",
             f"  batch 16 ({results['decode_batched_best_variant']}) vs HF batch 1: "
             f"x{results['decode_batched_vs_hf_b1_ratio']:.2f} (target >= 5)",
             "Same precision on both sides: " + ", ".join(
                 f"{k} x{v:.2f}" for k, v in results["same_precision_ratios"].items()),
             f"Loss parity, fp32, same A/B (max |ours - HF| over {p['batches']} real batches): "
             f"{p['max_abs_loss_diff']:.2e}; bf16-mixed moves our loss by up to {p['bf16_max_abs_loss_diff']:.3f} "
             f"(mean loss {p['mean_loss']:.2f})"]
    for precision in ("int8", "32"):
        e = results.get(f"evaluate_dev500_{precision}")
        if e:
            extra.append(f"EM/F1 evaluation of dev[:500], ours {precision} (zero-shot, chat template): "
                         f"{e['seconds']:.0f} s (EM {e['exact_match']:.1f}, F1 {e['f1']:.1f})")
    return "\n".join(lines + [""] + extra + [f"machine: {results['machine']}"])


REQUIRED_DATA = ("data/SQuAD/squad_short_train.jsonl", "data/SQuAD/squad_val.jsonl")


def check_data() -> None:
    """Stop with one line naming the first missing SQuAD file and the command that writes it."""
    for name in REQUIRED_DATA:
        if not (HERE.parent / name).is_file():
            print(f"error: {name} not found: the benchmarks read the prepared SQuAD files; run `make data` "
                  "(or `python -m lora_tutorial prepare-data`) first", file=sys.stderr)
            raise SystemExit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    check_data()
    results = run(args.quick)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
