"""Learning-rate sweep of the default LoRA run on a GPU (fp32, same config otherwise), EM/F1 on dev[:N].

    python bench/gpu_sweep.py --model path/to/model.gguf --dev data/SQuAD/squad_val500.jsonl --lrs 1e-4 3e-4

Used to choose the default learning rate without spending hours of CPU time; the CPU results in the
README come from the CPU runs themselves.
"""

from __future__ import annotations

import argparse
import json

import torch

from lora_tutorial.config import load_config
from lora_tutorial.sft_model import SFTModel
from lora_tutorial.workflow import evaluate_quick, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dev", required=True)
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4])
    parser.add_argument("--extra", nargs="*", default=[], help="more config overrides for every run")
    args = parser.parse_args()
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    common = [f"model.restore_from_path={args.model}", f"trainer.accelerator={accelerator}",
              "trainer.val_check_interval=0", "trainer.enable_progress_bar=false",
              f"model.data.test_ds.file_names=[{args.dev}]", "model.data.test_ds.micro_batch_size=64", *args.extra]
    report = {}
    cfg = load_config("conf/peft_tuning.yaml", common)
    base = SFTModel.restore_from(cfg.model.restore_from_path, cfg).to(accelerator if accelerator == "cpu" else "cuda")
    report["zero_shot_chat"] = evaluate_quick(base, cfg.model.data.test_ds, use_chat_template=True, batch_size=64,
                                              progress=False)["scores"]
    print(json.dumps(report), flush=True)
    for lr in args.lrs:
        cfg = load_config("conf/peft_tuning.yaml", common + [f"model.optim.lr={lr}",
                                                             f"exp_manager.explicit_log_dir=/tmp/sweep_{lr}"])
        result = train(cfg)
        model = result["model"].to("cuda" if accelerator == "gpu" else "cpu")
        scores = evaluate_quick(model, cfg.model.data.test_ds, batch_size=64, progress=False)["scores"]
        report[f"lr={lr}"] = {"train_seconds": result["train_seconds"], **scores}
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
