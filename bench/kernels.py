"""The micro-benchmarks behind three choices of the decoding code, recorded instead of quoted from memory.

    python bench/kernels.py      # about a minute on 2 cores; writes bench/kernels.json

All on random weights of SmolLM2's shapes (30 blocks of QKV 960x576, output 576x576, gate-up 3072x576,
down 576x1536, plus the 49,152x576 LM head), each matrix its own memory, so that a pass streams every
weight from RAM as decoding does; times are the best of 3 repeats of 5 passes, in milliseconds:

* ``int8``: one pass over all int8 matrices (scales per row) with the compiled kernel
  (``int8_kernel.int8_matmul``, as it runs by default) and with PyTorch's ``_weight_int8pack_mm``, at 1, 4,
  5, 8 and 16 rows; where the CPU has AMX, also each path of the compiled kernel at every row count:
  ``fma_ms`` (AMX off, ``use_amx(0)``: its AVX-512 FMA loop) and ``amx_ms`` (AMX from one row,
  ``use_amx(1)``), which is where ``int8_kernel.AMX_MIN_ROWS`` comes from;
* ``bf16_prepacked``: the 120 block matrices in bf16 with ``F.linear`` against the same weights packed
  once for oneDNN (``prepack.py``), at 16 rows (a decoding step of a batch of 16) and 3,680 rows (a
  prompt batch of 16 x 230 tokens); plus whether the outputs are bit for bit the same;
* ``greedy``: microseconds per call of ``argmax`` and of ``max(-1).indices`` on bf16 logits of 1 and 16
  rows (``generation.next_tokens``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BLOCK_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LM_HEAD = (49152, 576)


def each(products: Callable[[], object], count: int) -> Callable[[], None]:
    """A pass that computes ``count`` products and keeps none (a list of 120 prompt-sized outputs would
    allocate 1.5 GB per pass and time page faults instead of products)."""
    def run() -> None:
        for i in range(count):
            products(i)
    return run


def best_ms(fn: Callable[[], object], passes: int = 5, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(passes):
            fn()
        best = min(best, (time.perf_counter() - started) / passes)
    return 1000 * best


def int8_products() -> dict:
    from lora_tutorial.int8_kernel import int8_matmul, kernel_name, use_amx

    torch.manual_seed(0)
    shapes = BLOCK_SHAPES * 30 + [LM_HEAD]
    weights = [(torch.randint(-127, 128, shape, dtype=torch.int8), (torch.rand(shape[0]) / 100).to(torch.bfloat16))
               for shape in shapes]
    out = {"kernel": kernel_name(), "weight_bytes": sum(q.numel() for q, _ in weights)}
    amx = use_amx() > 0
    for rows in (1, 4, 5, 8, 16):
        xs = {width: torch.randn(rows, width).to(torch.bfloat16) for width in (576, 1536)}
        compiled = each(lambda i, xs=xs: int8_matmul(xs[weights[i][0].shape[1]], *weights[i]), len(weights))
        ours = best_ms(compiled)
        theirs = best_ms(each(lambda i, xs=xs: torch.ops.aten._weight_int8pack_mm(xs[weights[i][0].shape[1]],
                                                                                  *weights[i]), len(weights)))
        out[f"rows_{rows}"] = {"compiled_ms": ours, "pytorch_ms": theirs,
                               "compiled_gb_per_s": out["weight_bytes"] / ours / 1e6,
                               "pytorch_gb_per_s": out["weight_bytes"] / theirs / 1e6}
        if amx:  # both paths of the compiled kernel at every row count: where AMX starts to pay
            for name, min_rows in (("fma_ms", 0), ("amx_ms", 1)):
                use_amx(min_rows)
                out[f"rows_{rows}"][name] = best_ms(compiled)
            use_amx()
    return out


def bf16_prepacked() -> dict:
    torch.manual_seed(0)
    weights = [torch.randn(shape).to(torch.bfloat16) for shape in BLOCK_SHAPES * 30]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
    out = {}
    for rows in (16, 3680):
        xs = {width: torch.randn(rows, width).to(torch.bfloat16) for width in (576, 1536)}
        passes = 5 if rows == 16 else 2
        plain = best_ms(each(lambda i, xs=xs: F.linear(xs[weights[i].shape[1]], weights[i]), len(weights)), passes)
        fast = best_ms(each(lambda i, xs=xs: torch.ops.mkldnn._linear_pointwise(xs[weights[i].shape[1]], packed[i],
                                                                                None, "none", [], ""),
                            len(weights)), passes)
        same = all(torch.equal(F.linear(xs[w.shape[1]], w),
                               torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], ""))
                   for w, p in zip(weights[:4], packed[:4]))
        out[f"rows_{rows}"] = {"plain_ms": plain, "prepacked_ms": fast, "bit_identical": same}
    return out


def greedy() -> dict:
    out = {}
    for rows in (1, 16):
        logits = torch.randn(rows, LM_HEAD[0]).to(torch.bfloat16)
        out[f"rows_{rows}"] = {"argmax_us": 1000 * best_ms(lambda x=logits: x.argmax(-1), passes=200),
                               "max_indices_us": 1000 * best_ms(lambda x=logits: x.max(-1).indices, passes=200)}
    return out


def main() -> None:
    from run import record_header, write_record

    results = record_header("python bench/kernels.py")
    for name, measure in (("int8", int8_products), ("bf16_prepacked", bf16_prepacked), ("greedy", greedy)):
        results[name] = measure()
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    write_record("kernels", results)


if __name__ == "__main__":
    main()
