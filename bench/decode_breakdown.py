"""Where generation time goes: the figures behind the README's "what bounds decoding and evaluation".

    python bench/decode_breakdown.py      # about 2 minutes on 2 cores; writes bench/decode_breakdown.json

Three measurements, each in this one process (run nothing else meanwhile):

* start-up: seconds and peak RSS of ``import lora_tutorial`` in a fresh interpreter;
* batch-1 int8 decoding of the 194-token SQuAD prompt that ``make bench`` uses: the prefill, one
  decoding step (mean of 30, best of 3 runs) with each block in one C call (decode_step.py, as
  ``generate_ids`` runs it) and through the model's PyTorch blocks (the prefill: PyTorch's blocks); then, through the PyTorch blocks,
  the step with PyTorch's int8 kernel instead of the compiled one (int8_kernel.py), and with every int8
  matrix product replaced by a zero tensor of the right shape -- what is left is the cost of everything
  else in a step;
* the EM/F1 evaluation ``make bench`` times (the base model, chat template, first 100 test questions,
  bf16, batches of 16): the time spent in prefills and in decoding steps, and how many of each; then the
  same evaluation without the pre-packed weights (prepack.py), alternating, best of 2 each; then through
  the PyTorch blocks instead of the glued ones (glued_blocks.py), alternating, best of 2 each, with each
  best run's prefill / step split and the number of answers that rounding changed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPT_FILE = REPO / "data/SQuAD/squad_short_train.jsonl"
TEST_FILE = REPO / "data/SQuAD/splits/test.jsonl"


def start_up() -> dict:
    code = ("import resource, time; t = time.perf_counter(); import lora_tutorial; "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, rss = map(float, out.stdout.split())
    return {"import_seconds": seconds, "import_peak_rss_mib": rss}


def int8_decoding(steps: int = 30) -> dict:
    from lora_tutorial import quantize
    from lora_tutorial.decode_step import block_runner, decoding_path
    from lora_tutorial.int8_kernel import int8_matmul, kernel_name
    from lora_tutorial.quantize import Int8Linear, load_int8_model

    model, tokenizer = load_int8_model()
    ids = torch.tensor([tokenizer.encode(json.loads(PROMPT_FILE.open().readline())["input"])])

    @torch.no_grad()
    def run(fused: bool = False) -> tuple[float, float]:
        cache = model.new_cache(1, ids.shape[1] + steps + 1)
        if fused:  # as generate_ids does: the prompt glued, each step's blocks in decode_block.c
            cache.run_blocks = block_runner(model, cache)
        started = time.perf_counter()
        token = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1)
        prefilled = time.perf_counter()
        for _ in range(steps):
            token = model(token[:, None], cache=cache, last_only=True)[:, -1].argmax(-1)
        return prefilled - started, (time.perf_counter() - prefilled) / steps

    run()  # warm-up
    prefill, step = min(run() for _ in range(3))
    run(fused=True)
    _, step_fused = min(run(fused=True) for _ in range(3))
    quantize.int8_matmul = lambda *args: None  # what Int8Linear does where the kernel cannot be built
    try:
        _, step_pytorch_kernel = min(run() for _ in range(3))
    finally:
        quantize.int8_matmul = int8_matmul
    forward = Int8Linear.forward
    Int8Linear.forward = lambda self, x: x.new_zeros(*x.shape[:-1], self.out_features, dtype=torch.bfloat16)
    try:
        _, step_without_products = min(run() for _ in range(3))
    finally:
        Int8Linear.forward = forward
    return {"kernel": kernel_name(), "prompt_tokens": ids.shape[1], "prefill_ms": 1000 * prefill,
            "step_fused_ms": 1000 * step_fused, "fused": decoding_path(model),
            "step_ms": 1000 * step, "step_with_pytorch_int8_kernel_ms": 1000 * step_pytorch_kernel,
            "step_without_matrix_products_ms": 1000 * step_without_products,
            "weight_bytes_per_step": sum(m.weight_int8.numel() + 2 * m.scale.numel()
                                         for m in model.modules() if isinstance(m, Int8Linear))}


def evaluation(n: int = 100) -> dict:
    from lora_tutorial import generation, prepack
    from lora_tutorial.config import load_config
    from lora_tutorial.decode_step import decoding_path
    from lora_tutorial.evaluation import answer_dataset
    from lora_tutorial.model import GPT
    from lora_tutorial.precision import cast_frozen_weights
    from lora_tutorial.sft_model import SFTModel

    cfg = load_config(REPO / "conf/peft_eval.yaml", [f"model.data.test_ds.file_names=[{TEST_FILE}]",
                                                     f"model.data.test_ds.limit={n}"])
    model = SFTModel.restore_from(cfg.model.restore_from_path, cfg)
    cast_frozen_weights(model.model.requires_grad_(False), torch.bfloat16)
    forward = GPT.forward

    def split_evaluation():
        """One evaluation, and the time it spent in prefills and in decoding steps (calls, seconds, tokens
        with padding), measured around GPT.forward."""
        totals: dict[str, list] = defaultdict(lambda: [0, 0.0, 0])

        def timed(self, input_ids, *args, **kwargs):
            started = time.perf_counter()
            out = forward(self, input_ids, *args, **kwargs)
            total = totals["prefill" if input_ids.shape[1] > 1 else "step"]
            total[0] += 1
            total[1] += time.perf_counter() - started
            total[2] += input_ids.numel()
            return out

        GPT.forward = timed
        try:
            result = answer_dataset(model, cfg.model.data.test_ds, use_chat_template=True, progress=False)
        finally:
            GPT.forward = forward
        return result, {kind: {"calls": c, "seconds": t, "tokens": k} for kind, (c, t, k) in totals.items()}

    result, split = split_evaluation()
    out = {"questions": n, "seconds": result.seconds, "f1": result.scores.f1, **split}
    # The pre-packed weights, one lever at a time: with and without, alternating (this VM's speed drifts).
    packs = prepack.packing_pays
    times: dict[str, list[float]] = {"packed": [], "plain": []}
    for _ in range(2):
        for name, durations in times.items():
            prepack.packing_pays = packs if name == "packed" else (lambda model: False)
            try:
                again = answer_dataset(model, cfg.model.data.test_ds, use_chat_template=True, progress=False)
            finally:
                prepack.packing_pays = packs
            if again.answers != result.answers:
                raise AssertionError(f"evaluation with {name} weights gave other answers")
            durations.append(again.seconds)
    out["seconds_packed_weights"], out["seconds_plain_weights"] = min(times["packed"]), min(times["plain"])
    # The glued blocks (glued_blocks.py), one lever at a time: with and without, alternating. Rounding may
    # change a few answers, so they are counted, not required equal.
    # Each run's prefill / step split too, kept for the faster run of each.
    runner = generation.block_runner
    best: dict[str, tuple] = {}
    changed = 0
    for _ in range(2):
        for name in ("glued", "pytorch_blocks"):
            generation.block_runner = runner if name == "glued" else (lambda model, cache: None)
            try:
                again, split = split_evaluation()
            finally:
                generation.block_runner = runner
            if name not in best or again.seconds < best[name][0]:
                best[name] = (again.seconds, split)
            if name == "pytorch_blocks":
                changed = sum(a != b for a, b in zip(again.answers, result.answers))
    out["path"] = decoding_path(model.model, rows=16)
    out["seconds_glued_blocks"], out["seconds_pytorch_blocks"] = best["glued"][0], best["pytorch_blocks"][0]
    out["split_glued_blocks"], out["split_pytorch_blocks"] = best["glued"][1], best["pytorch_blocks"][1]
    out["answers_changed_by_glued_blocks"] = changed
    return out


def main() -> None:
    from run import record_header, write_record

    results = {**record_header("python bench/decode_breakdown.py"), "start_up": start_up()}
    print("start-up:", results["start_up"], flush=True)
    results["int8_batch1"] = int8_decoding()
    print("int8 batch 1:", results["int8_batch1"], flush=True)
    results["evaluation_100"] = evaluation()
    print("evaluation:", results["evaluation_100"], flush=True)
    write_record("decode_breakdown", results)


if __name__ == "__main__":
    main()
