"""GPU smoke benchmark: the same config and code on CUDA with bf16-mixed precision.

    python bench/gpu_check.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf [--steps 30]

Trains LoRA for a few steps through the normal workflow (Lightning Trainer, accelerator=gpu,
precision=bf16-mixed), then generates answers for 100 validation questions, and prints training and
decoding tokens/s plus EM/F1. Never part of CI (CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lora_tutorial.config import load_config
from lora_tutorial.generation import generate_ids
from lora_tutorial.evaluation import answer_dataset
from lora_tutorial.training import train

REPO = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of this script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA GPU (or --device cpu for a dry run)")
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    cfg = load_config(REPO / "conf/peft_tuning.yaml", [
        f"model.restore_from_path={args.model}", f"trainer.accelerator={accelerator}", "trainer.devices=1",
        "trainer.precision=bf16-mixed", f"trainer.max_steps={args.steps}", "trainer.val_check_interval=0",
        "trainer.enable_progress_bar=false", "model.micro_batch_size=4", "model.global_batch_size=16",
        f"exp_manager.explicit_log_dir={args.out}"])
    result = train(cfg)
    model = result.model.to(args.device)
    dataset = model.build_dataset(cfg.model.data.train_ds, is_train=True)
    n_tokens = args.steps * 16 * sum(len(dataset[i]["input_ids"]) for i in range(64)) / 64
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"device": device_name, "train_steps": args.steps,
              "train_seconds": result.train_seconds, "train_tokens_per_s_approx": n_tokens / result.train_seconds,
              "final_train_loss": float(result.trainer.callback_metrics.get("train_loss", float("nan")))}
    tokenizer = model.tokenizer
    prompt = tokenizer.encode(json.loads((REPO / "data/SQuAD/splits/validation.jsonl").open().readline())["input"])
    gpt = model.model.eval()
    for batch in (1, 16):
        with torch.autocast(args.device, dtype=torch.bfloat16):
            generate_ids(gpt, [prompt] * batch, tokens_to_generate=30, stop_ids=())  # warm-up
            _sync(args.device)
            started = time.perf_counter()
            generate_ids(gpt, [prompt] * batch, tokens_to_generate=30, stop_ids=())
            _sync(args.device)
        report[f"decode_b{batch}_tokens_per_s"] = batch * 30 / (time.perf_counter() - started)
    with torch.autocast(args.device, dtype=torch.bfloat16):
        scores = answer_dataset(model, cfg.model.data.validation_ds, progress=False).scores
    report["validation100_after_lora"] = str(scores)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
