"""QLoRA memory benchmark: peak RSS and training speed of LoRA on a float32, bf16, Q4_1 and int8 base.

    python bench/qlora_memory.py                       # all four, one after another, 1 thread each
    python bench/qlora_memory.py --bases q4_1 bf16 --steps 6 --threads 2 --micro 1
    python bench/qlora_memory.py --json out.json       # also write the raw figures
    python bench/qlora_memory.py --json out.json --table   # reprint a recorded run

Each base runs in its *own* process, one at a time (never two at once: they would compete for cores and
memory), and reports its peak resident memory (``ru_maxrss``: the high-water mark of the whole process,
Python and PyTorch included) and its training speed. The work is the same for every base: LoRA r32
(alpha 32) on all four projections of every block, micro-batches of 4 (``--micro``) real SQuAD training examples
(``data/SQuAD/squad_short_train.jsonl``, answer-only loss), AdamW, the step under ``torch.autocast("cpu",
bfloat16)``. The bases:

* ``fp32``: ``load_base_model()``, float32 weights (autocast rounds each one to bf16 at every matmul
  and keeps that copy for the backward pass);
* ``bf16``: ``load_base_model(dtype=torch.bfloat16)``, what ``trainer.precision: bf16-mixed`` loads;
* ``q4_1``: the bf16 load, then ``quantize_base(model, "q4_1")``: the GGUF's own 4-bit blocks;
* ``int8``: the bf16 load, then ``quantize_base(model, "int8")``.

Tokens/s counts the real (non-pad) tokens of the steps after the first (which warms up the allocator and
the kernels). On a shared machine times are rough; memory is the figure to trust.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRAIN_FILE = ROOT / "data" / "SQuAD" / "squad_short_train.jsonl"
BASES = ("fp32", "bf16", "q4_1", "int8")
RANK, ALPHA = 32, 32.0


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(base: str, steps: int, threads: int, micro: int = 4) -> dict:
    """One measurement, in this process: load, quantize, add LoRA, train ``steps`` steps."""
    import torch

    torch.set_num_threads(threads)
    from lora_tutorial import load_base_model
    from lora_tutorial.peft import LoraPEFTConfig, add_adapter
    from lora_tutorial.qlora import quantize_base, quantized_layers
    from lora_tutorial.sft_data import SFTCollator, SFTDataset
    from lora_tutorial.squad import split_context

    out = {"base": base, "threads": threads, "micro": micro, "rss_after_import_mb": current_rss_mb()}
    started = time.perf_counter()
    model, tokenizer = load_base_model(dtype=torch.float32 if base == "fp32" else torch.bfloat16)
    out["peak_after_load_mb"] = peak_rss_mb()
    if base in ("q4_1", "int8"):
        quantize_base(model, base)
    out["load_seconds"] = time.perf_counter() - started
    out["peak_after_quantize_mb"] = peak_rss_mb()
    out["rss_after_quantize_mb"] = current_rss_mb()
    out["quantized_storage_mb"] = sum(m.storage_bytes() for m in quantized_layers(model).values()) / 2**20
    torch.manual_seed(0)  # the same LoRA init for every base
    add_adapter(model, LoraPEFTConfig(None, target_modules=["all"], adapter_dim=RANK, alpha=ALPHA), verbose=False)
    model.train()

    dataset = SFTDataset([str(TRAIN_FILE)], tokenizer, max_seq_length=1024, context_splitter=split_context)
    collate = SFTCollator(tokenizer.pad_id)
    batches = [collate([dataset[i] for i in range(s * micro, (s + 1) * micro)]) for s in range(steps)]
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
    losses, times, tokens = [], [], []
    for batch in batches:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(batch["input_ids"], batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        tokens.append(int(batch["attention_mask"].sum()))
        losses.append(loss.item())
    timed = slice(1, None) if steps > 1 else slice(None)
    out.update(losses=losses, step_seconds=times, tokens=tokens,
               tokens_per_s=sum(tokens[timed]) / sum(times[timed]), peak_rss_mb=peak_rss_mb(),
               rss_end_mb=current_rss_mb())
    return out


def run_all(bases: list[str], steps: int, threads: int, micro: int = 4) -> list[dict]:
    results = []
    for base in bases:  # one process each, strictly one after another
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, __file__, "--worker", base, "--steps", str(steps), "--threads", str(threads),
                   "--micro", str(micro)]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{base}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  {base}: peak {r['peak_rss_mb']:.0f} MiB, {r['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    return results


def table(results: list[dict]) -> str:
    from lora_tutorial.notebook import format_table

    reference = next((r for r in results if r["base"] == "fp32"), None)
    rows = []
    for r in results:
        timed = r["step_seconds"][1:] or r["step_seconds"]
        rows.append((r["base"], round(r["peak_rss_mb"]), r["peak_rss_mb"] / reference["peak_rss_mb"] if reference else "-",
                     round(r["peak_after_quantize_mb"]), round(r["quantized_storage_mb"]) or "-",
                     round(r["tokens_per_s"]), sum(timed) / len(timed), f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}"))
    lines = [format_table(rows, ["base", "peak RSS MiB", "x fp32", "peak at setup MiB", "quantized MiB", "tokens/s",
                                 "s/step", "loss first->last"], digits=2)]
    if results:
        r = results[0]
        steps = len(r["tokens"])
        lines.append(f"(LoRA r{RANK} on all projections, {r['trainable']:,} trainable; micro batch {r['micro']}, "
                     f"{steps} steps, tokens/s and s/step over steps 2-{steps}; {r['threads']} thread(s); "
                     f"RSS after `import torch`: {r['rss_after_import_mb']:.0f} MiB; setup = load + quantize)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro", type=int, default=4, help="examples per step (default 4)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--table", action="store_true", help="print the table of the results in --json; measure nothing")
    parser.add_argument("--worker", choices=BASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table and not args.json:
        parser.error("--table reprints a recorded run: give its file with --json")
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.threads, args.micro)))
        return
    if not TRAIN_FILE.is_file():
        raise SystemExit(f"error: {TRAIN_FILE.relative_to(ROOT)} not found; run `make data` first")
    results = run_all(args.bases, args.steps, args.threads, args.micro)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
