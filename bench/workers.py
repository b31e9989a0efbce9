"""Benchmark workers: each call runs in a fresh process so that peak RSS belongs to one implementation.

    python bench/workers.py train  --impl ours|hf --precision 32|bf16 --micro 1 --steps 6
    python bench/workers.py decode --impl ours|hf --precision 32|bf16|int8 --batch 1 --tokens 30
    python bench/workers.py lossparity
    python bench/workers.py evaluate --precision 32|bf16|int8 --n 500

``--precision bf16`` means, for ours, what ``trainer.precision: bf16-mixed`` does (frozen matrices stored
in bf16, adapters float32, see lora_tutorial/precision.py); for HF, the like-for-like recipe: weights
loaded in bf16, PEFT's float32 adapters, the step under ``torch.autocast(bfloat16)``. ``int8`` (ours only,
decoding and evaluation): the weights quantized by ``lora_tutorial.quantize.quantize_int8``.
Each prints one JSON line (the last line of stdout). ``bench/run.py`` orchestrates them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILE = REPO / "data/SQuAD/squad_short_train.jsonl"
RANK, ALPHA = 32, 32


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def real_batches(tokenizer, micro: int, count: int) -> list[dict]:
    """``count`` collated micro-batches of real SQuAD training examples (answer-only labels)."""
    from lora_tutorial.data import SFTDataset

    dataset = SFTDataset([TRAIN_FILE], tokenizer)
    items = [dataset[i] for i in range(micro * count)]
    return [dataset.collate_fn(items[i:i + micro]) for i in range(0, len(items), micro)]


# -- models ------------------------------------------------------------------------------------

def ours_with_lora(precision: str = "32"):
    """Our model with LoRA r32/alpha32 on the fused QKV projection (the same work as PEFT on q, k, v)."""
    from lora_tutorial import load_base_model
    from lora_tutorial.peft import LoraPEFTConfig, add_adapter
    from lora_tutorial.precision import cast_frozen_weights

    model, tokenizer = load_base_model()
    add_adapter(model, LoraPEFTConfig(None, target_modules=["attention_qkv"], adapter_dim=RANK, alpha=ALPHA,
                                      adapter_dropout=0.0), verbose=False)
    if precision == "bf16":
        cast_frozen_weights(model)  # what trainer.precision=bf16-mixed does in SFTModel.setup
    return model.train(), tokenizer


def hf_base(precision: str = "32"):
    import transformers
    from lora_tutorial.checkpoints import resolve_model_path

    transformers.logging.set_verbosity_error()
    path = resolve_model_path("smollm2-135m-instruct")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)


def hf_with_lora(precision: str = "32"):
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    return peft.get_peft_model(hf_base(precision), config).train()  # PEFT keeps adapters float32


def hf_loss(model, batch) -> torch.Tensor:
    """HF's own loss on the same batch: it shifts labels internally and ignores -100."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def ours_loss(model, batch) -> torch.Tensor:
    return model.loss(batch["input_ids"], batch["labels"])


# -- commands ----------------------------------------------------------------------------------

def cmd_train(args) -> dict:
    from lora_tutorial.checkpoints import load_tokenizer

    if args.impl == "ours":
        model, tokenizer = ours_with_lora(args.precision)
        autocast = contextlib.nullcontext()  # a model with bf16 weights autocasts itself
    else:
        model, tokenizer = hf_with_lora(args.precision), load_tokenizer()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    loss_fn = ours_loss if args.impl == "ours" else hf_loss
    batches = real_batches(tokenizer, args.micro, args.warmup + args.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
    tokens = examples = 0
    for i, batch in enumerate(batches):
        if i == args.warmup:
            started = time.perf_counter()
            tokens = examples = 0
        with autocast:
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        examples += batch["input_ids"].shape[0]
    seconds = time.perf_counter() - started
    return {"impl": args.impl, "precision": args.precision, "micro": args.micro, "tokens_per_s": tokens / seconds,
            "examples_per_s": examples / seconds, "seconds": seconds, "tokens": tokens,
            "trainable": sum(p.numel() for p in params), "peak_rss_mb": peak_rss_mb()}


def cmd_decode(args) -> dict:
    from lora_tutorial import load_base_model
    from lora_tutorial.checkpoints import load_tokenizer
    from lora_tutorial.generation import generate_ids

    tokenizer = load_tokenizer()
    prompt = json.loads(TRAIN_FILE.open().readline())["input"]
    ids = tokenizer.encode(prompt)
    batch = [ids] * args.batch
    dtype = torch.float32 if args.precision == "32" else torch.bfloat16
    if args.impl == "ours":
        ours, _ = load_base_model(dtype=dtype)
        if args.precision == "int8":
            from lora_tutorial.quantize import quantize_int8

            quantize_int8(ours.requires_grad_(False))
        run = lambda: generate_ids(ours, batch, tokens_to_generate=args.tokens, stop_ids=())  # noqa: E731
    else:
        hf = hf_base(args.precision).eval()
        x = torch.tensor(batch)

        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.tokens,
                                   min_new_tokens=args.tokens, do_sample=False, pad_token_id=2)
    run()  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return {"impl": args.impl, "precision": args.precision, "batch": args.batch, "prompt_tokens": len(ids), "new_tokens": args.tokens,
            "tokens_per_s": args.batch * args.tokens / best, "seconds": best, "peak_rss_mb": peak_rss_mb()}


def cmd_lossparity(args) -> dict:
    """Our LoRA and PEFT's LoRA with the same A/B tensors give the same loss on the same real batches
    (float32 both); then how much our bf16-mixed model's loss differs from our float32 one."""
    from lora_tutorial.precision import cast_frozen_weights

    ours, tokenizer = ours_with_lora()
    hf = hf_with_lora()
    torch.manual_seed(0)
    c = ours.config
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    with torch.no_grad():
        for i, block in enumerate(ours.blocks):
            lora = block.attention.attention_qkv
            lora.lora_B.normal_(0, 0.02)  # non-zero, so the adapters matter
            attn = hf.base_model.model.model.layers[i].self_attn
            for name, rows in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))):
                getattr(attn, name).lora_A["default"].weight.copy_(lora.lora_A)
                getattr(attn, name).lora_B["default"].weight.copy_(lora.lora_B[rows])
    diffs, bf16_diffs = [], []
    batches = real_batches(tokenizer, 1, 4)
    with torch.no_grad():
        for batch in batches:
            diffs.append(abs(float(ours_loss(ours, batch)) - float(hf_loss(hf, batch))))
        fp32_losses = [float(ours_loss(ours, batch)) for batch in batches]
        cast_frozen_weights(ours)  # the same model under bf16-mixed: how far does the loss move?
        for batch, reference in zip(batches, fp32_losses):
            bf16_diffs.append(abs(float(ours_loss(ours, batch)) - reference))
    return {"max_abs_loss_diff": max(diffs), "batches": len(diffs), "bf16_max_abs_loss_diff": max(bf16_diffs),
            "mean_loss": sum(fp32_losses) / len(fp32_losses)}


def cmd_evaluate(args) -> dict:
    from lora_tutorial.config import load_config
    from lora_tutorial.precision import cast_frozen_weights
    from lora_tutorial.sft_model import SFTModel
    from lora_tutorial.workflow import evaluate_quick

    cfg = load_config(REPO / "conf/peft_eval.yaml", [f"model.data.test_ds.file_names=[{REPO}/data/SQuAD/squad_val.jsonl]",
                                                     f"model.data.test_ds.limit={args.n}"])
    model = SFTModel.restore_from(cfg.model.restore_from_path, cfg)
    if args.precision == "bf16":
        cast_frozen_weights(model.model.requires_grad_(False))
    elif args.precision == "int8":
        from lora_tutorial.quantize import quantize_int8

        quantize_int8(model.model.requires_grad_(False))
    started = time.perf_counter()
    result = evaluate_quick(model, cfg.model.data.test_ds, use_chat_template=True, progress=False)
    return {"n": args.n, "precision": args.precision, "seconds": time.perf_counter() - started, **result["scores"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    train = sub.add_parser("train")
    train.add_argument("--impl", choices=["ours", "hf"], required=True)
    train.add_argument("--precision", choices=["32", "bf16"], default="32")
    train.add_argument("--micro", type=int, default=1)
    train.add_argument("--steps", type=int, default=8)
    train.add_argument("--warmup", type=int, default=2)
    decode = sub.add_parser("decode")
    decode.add_argument("--impl", choices=["ours", "hf"], required=True)
    decode.add_argument("--precision", choices=["32", "bf16", "int8"], default="32")  # int8: ours only
    decode.add_argument("--batch", type=int, default=1)
    decode.add_argument("--tokens", type=int, default=30)
    decode.add_argument("--repeats", type=int, default=3)
    sub.add_parser("lossparity")
    evaluate = sub.add_parser("evaluate")
    evaluate.add_argument("--precision", choices=["32", "bf16", "int8"], default="32")
    evaluate.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    result = {"train": cmd_train, "decode": cmd_decode, "lossparity": cmd_lossparity, "evaluate": cmd_evaluate}[args.cmd](args)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
