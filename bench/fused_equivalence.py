"""Do the C paths of generation (decode_step.py, glued_blocks.py) change any answers? Against the PyTorch blocks.

    python bench/fused_equivalence.py     # about 8 minutes on 2 cores; writes bench/fused_equivalence.json

The base model answers all 500 validation questions zero-shot with its chat template (as ``make bench``
times evaluation), in int8 three times: as ``generate_ids`` runs it (prompts glued, each block of each
decoding step in one C call, decode_block.c); through the model's own PyTorch blocks (the same int8
kernel for the products); and through the PyTorch blocks with PyTorch's int8 kernel; then in bf16
twice: as ``generate_ids`` runs it (prompts and steps glued: C between oneDNN's products) and through
the PyTorch blocks. The paths agree to bf16 rounding, and rounding alone changes some answers, more of
the long ones a base model writes: against the PyTorch blocks of its precision, each other run gets the
count of changed answers and the paired per-question F1 difference with its bootstrap interval, so that
the C paths' changes can be read beside those of a mere change of int8 kernel.
(``bench/precision_equivalence.py`` scores the recipe's adapter, whose short answers the notebooks report.)
The validation split: a check of the implementation, no setting is chosen on the test questions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_tutorial import generation, quantize
from lora_tutorial.config import load_config
from lora_tutorial.decode_step import decoding_path
from lora_tutorial.evaluation import Evaluation, answer_dataset
from lora_tutorial.metrics import bootstrap_interval, per_question_scores
from lora_tutorial.precision import cast_frozen_weights
from lora_tutorial.quantize import quantize_int8
from lora_tutorial.sft_model import SFTModel

REPO = Path(__file__).resolve().parents[1]
SPLIT = REPO / "data/SQuAD/splits/validation.jsonl"


def paired(run: Evaluation, reference: Evaluation) -> dict:
    """How many answers differ, and the mean per-question F1 difference with its bootstrap interval."""
    if run.prompts != reference.prompts:
        raise SystemExit("two runs did not answer the same questions in the same order")
    differences = [a - b for a, b in zip(per_question_scores(run.answers, run.golds)[1],
                                         per_question_scores(reference.answers, reference.golds)[1])]
    changed = sum(a != b for a, b in zip(run.answers, reference.answers))
    return {"questions": len(differences), "answers_changed": changed,
            "f1_difference": sum(differences) / len(differences),
            "f1_difference_interval": list(bootstrap_interval(differences))}


def main() -> None:
    from run import record_header, write_record

    cfg = load_config(REPO / "conf/peft_eval.yaml", [f"model.data.test_ds.file_names=[{SPLIT}]"])
    runner, kernel = generation.block_runner, quantize.int8_matmul

    def pytorch_blocks(model, cache):
        return None

    variants = {"int8": {"fused": (runner, kernel), "pytorch_blocks": (pytorch_blocks, kernel),
                         # the same blocks with PyTorch's int8 kernel: how much another summation order alone moves
                         "pytorch_blocks_pytorch_kernel": (pytorch_blocks, lambda *args: None)},
                "bf16": {"glued": (runner, kernel), "pytorch_blocks": (pytorch_blocks, kernel)}}
    results = {**record_header("python bench/fused_equivalence.py"), "split": str(SPLIT.relative_to(REPO)),
               "model": "the base model, zero-shot with its chat template"}
    for precision, runs_of in variants.items():
        model = SFTModel.restore_from(cfg.model.restore_from_path, cfg)
        model.model.requires_grad_(False)
        if precision == "int8":
            quantize_int8(model.model)
        else:
            cast_frozen_weights(model.model, torch.bfloat16)
        results[precision] = out = {"path": decoding_path(model.model, rows=16)}
        runs = {}
        for name, (choose, products) in runs_of.items():
            generation.block_runner, quantize.int8_matmul = choose, products
            try:
                runs[name] = answer_dataset(model, cfg.model.data.test_ds, use_chat_template=True, progress=False)
            finally:
                generation.block_runner, quantize.int8_matmul = runner, kernel
            print(f"{precision} {name}: F1 {runs[name].scores.f1:.1f} in {runs[name].seconds:.1f} s", flush=True)
            out[name] = {"line": str(runs[name].scores), "em": runs[name].scores.exact_match,
                         "f1": runs[name].scores.f1, "seconds": runs[name].seconds}
        for name, run in runs.items():
            if name != "pytorch_blocks":
                out[f"{name}_vs_pytorch_blocks"] = paired(run, runs["pytorch_blocks"])
                print(f"{precision} {name} - pytorch_blocks: {out[f'{name}_vs_pytorch_blocks']}", flush=True)
    write_record("fused_equivalence", results)


if __name__ == "__main__":
    main()
