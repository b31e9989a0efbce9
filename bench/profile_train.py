"""Where a LoRA training step spends its time: torch.profiler over four bf16-mixed steps.

    python bench/profile_train.py [--micro 4] [--precision bf16|32] [--json bench/profile_train.json]

The same work as ``make bench``'s training measurement (``bench/workers.py``: LoRA r32 on QKV, AdamW,
real SQuAD batches): two warm-up steps, then four profiled ones. Prints the operators by their own CPU
time, and the share of the time in matrix multiplies and in attention, with the matrix multiplies'
throughput (the projection FLOPs of the real tokens / the time in ``aten::mm``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workers  # noqa: E402  (bench/workers.py: the benchmark's own model, data and loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--precision", choices=["bf16", "32"], default="bf16")
    parser.add_argument("--json", type=Path, help="also write the summary and the top operators here")
    args = parser.parse_args()
    model, tokenizer = workers.ours_with_lora(args.precision)
    batches = workers.real_batches(tokenizer, args.micro, 6)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)

    def step(batch: dict) -> None:
        workers.ours_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:2]:
        step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[2:]:
            step(batch)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48))
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[2:])
    from lora_tutorial.model import GPTConfig

    flops = tokens * workers.projection_parameters(GPTConfig()) * 4
    print(f"{tokens:,} real tokens in {total / 1e6:.2f} s of operator time: matrix multiplies "
          f"{mm / total:.0%} ({flops / (mm / 1e6) / 1e9:.0f} GFLOP/s while multiplying), attention "
          f"{attention / total:.0%}, everything else {1 - (mm + attention) / total:.0%}")
    if args.json:
        from run import machine

        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
            "command": f"python bench/profile_train.py --micro {args.micro} --precision {args.precision}",
            "real_tokens": tokens, "operator_seconds": total / 1e6, "matmul_share": mm / total,
            "matmul_gflops_while_multiplying": flops / (mm / 1e6) / 1e9, "attention_share": attention / total,
            "operators": [{"name": e.key, "share": e.self_cpu_time_total / total} for e in top]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
