"""Benchmark workers: each call runs in a fresh process so that peak RSS belongs to one implementation.

    python bench/workers.py limits
    python bench/workers.py train  --impl ours|hf --precision 32|bf16 --micro 1 --steps 6
    python bench/workers.py decode --impl ours|hf --precision 32|bf16|int8 --batch 1 --tokens 30
    python bench/workers.py lossparity
    python bench/workers.py evaluate --impl ours|hf --n 100

``--precision bf16`` means, for ours, what ``trainer.precision: bf16-mixed`` does (frozen matrices stored
in bf16, adapters float32, see lora_tutorial/precision.py); for HF, the like-for-like recipe: weights
loaded in bf16, PEFT's float32 adapters, the step under ``torch.autocast(bfloat16)``. ``int8`` (ours only,
decoding and evaluation): the weights quantized by ``lora_tutorial.quantize.quantize_int8``, for decoding
loaded from the int8 weight cache by ``load_int8_model`` (the process never holds the bf16 matrices).
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
TEST_FILE = REPO / "data/SQuAD/splits/test.jsonl"
RANK, ALPHA = 32, 32


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def real_batches(tokenizer, micro: int, count: int) -> list[dict]:
    """``count`` collated micro-batches of real SQuAD training examples (answer-only labels)."""
    from lora_tutorial.sft_data import SFTCollator, SFTDataset

    dataset = SFTDataset([TRAIN_FILE], tokenizer)
    items = [dataset[i] for i in range(micro * count)]
    collate = SFTCollator(tokenizer.pad_id)
    return [collate(items[i:i + micro]) for i in range(0, len(items), micro)]


def projection_parameters(config) -> int:
    """Numbers in the four projection matrices of every block: what a token multiplies through."""
    q, k, v = config.qkv_sizes
    ff = 2 * config.d_ff if config.mlp == "swiglu" else config.d_ff
    per_layer = config.d_model * (q + k + v + config.n_head * config.head_dim + ff) + config.d_ff * config.d_model
    return config.n_layer * per_layer


def weight_bytes(model) -> int:
    """Bytes of every matrix a decoding step reads: the linear layers (int8 and its scales, bf16 or fp32)
    and the LM head; not the embedding table, of which one row per token is read."""
    from lora_tutorial.quantize import Int8Linear

    total, seen = 0, set()
    for module in model.modules():
        tensors = ([module.weight_int8, module.scale] if isinstance(module, Int8Linear)
                   else [module.weight] if isinstance(module, torch.nn.Linear) else [])
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


# -- models ------------------------------------------------------------------------------------

def ours_with_lora(precision: str = "32"):
    """Our model with LoRA r32/alpha32 on the fused QKV projection (the same work as PEFT on q, k, v).
    With bf16, loaded the way a bf16-mixed trainer loads it: frozen matrices in bf16 from the start."""
    from lora_tutorial import load_base_model
    from lora_tutorial.peft import LoraPEFTConfig, add_adapter

    model, tokenizer = load_base_model(dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    add_adapter(model, LoraPEFTConfig(None, target_modules=["attention_qkv"], adapter_dim=RANK, alpha=ALPHA,
                                      adapter_dropout=0.0), verbose=False)
    return model.train(), tokenizer


def hf_base(precision: str = "32"):
    import transformers
    from lora_tutorial.pretrained import resolve_model_path

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

def cmd_limits(args) -> dict:
    """The machine's matmul throughput on this model's shapes (a micro-batch of 4 x 230 tokens through each
    projection, forward) in fp32 and bf16, and its memory read bandwidth (summing a 256 MB tensor)."""
    from lora_tutorial.model import GPTConfig

    c = GPTConfig()
    q, k, v = c.qkv_sizes
    shapes = [(sum((q, k, v)), c.d_model), (c.d_model, c.d_model), (2 * c.d_ff, c.d_model), (c.d_model, c.d_ff)]
    rows = 4 * 230
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        pairs = [(torch.randn(rows, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype))
                 for d_out, d_in in shapes]
        flops = sum(2 * rows * w.shape[0] * w.shape[1] for _, w in pairs)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(10):
                for x, w in pairs:
                    torch.nn.functional.linear(x, w)
            best = min(best, (time.perf_counter() - started) / 10)
        out[f"{name}_gemm_gflops"] = flops / best / 1e9
    data = torch.ones(64 * 2**20)  # 256 MB of float32
    best = float("inf")
    for _ in range(8):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    out["read_gb_per_s"] = data.numel() * 4 / best / 1e9
    return out


def cmd_train(args) -> dict:
    from lora_tutorial.pretrained import load_tokenizer

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
    from lora_tutorial.model import GPTConfig

    trainable = sum(p.numel() for p in params)
    # forward (2 FLOPs per multiply-add) and the input gradient (2 more) through every projection, plus the
    # LoRA matrices' forward, input and weight gradients (6 per number); the LM head runs at answer tokens only.
    flops_per_token = 4 * projection_parameters(GPTConfig()) + 6 * RANK * (576 + 960) * 30
    return {"impl": args.impl, "precision": args.precision, "micro": args.micro, "tokens_per_s": tokens / seconds,
            "examples_per_s": examples / seconds, "seconds": seconds, "tokens": tokens, "trainable": trainable,
            "flops_per_token": flops_per_token, "peak_rss_mb": peak_rss_mb()}


def cmd_decode(args) -> dict:
    from lora_tutorial import load_base_model
    from lora_tutorial.generation import generate_ids
    from lora_tutorial.pretrained import load_tokenizer

    tokenizer = load_tokenizer()
    prompt = json.loads(TRAIN_FILE.open().readline())["input"]
    ids = tokenizer.encode(prompt)
    batch = [ids] * args.batch
    dtype = torch.float32 if args.precision == "32" else torch.bfloat16
    if args.impl == "ours":
        if args.precision == "int8":  # the int8 matrices from the weight cache (written by the first run)
            from lora_tutorial.quantize import load_int8_model

            ours, _ = load_int8_model()
        else:
            ours, _ = load_base_model(dtype=dtype)
        run = lambda: generate_ids(ours, batch, tokens_to_generate=args.tokens, stop_ids=())  # noqa: E731
        read = weight_bytes(ours)
    else:
        hf = hf_base(args.precision).eval()
        x = torch.tensor(batch)

        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.tokens,
                                   min_new_tokens=args.tokens, do_sample=False, pad_token_id=2)
        read = weight_bytes(hf)
    run()  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    result = {"impl": args.impl, "precision": args.precision, "batch": args.batch, "prompt_tokens": len(ids),
              "new_tokens": args.tokens,
              "tokens_per_s": args.batch * args.tokens / best, "seconds": best, "weight_bytes": read,
              "peak_rss_mb": peak_rss_mb()}
    if args.impl == "ours" and args.precision in ("int8", "bf16"):
        from lora_tutorial.decode_step import decoding_path
        from lora_tutorial.int8_kernel import kernel_name

        if args.precision == "int8":
            result["int8_kernel"] = kernel_name()
        result["decoding_steps"] = decoding_path(ours, args.batch)
    return result


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
            parts = (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv)))
            for name, rows in parts:
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
    """Zero-shot EM/F1 of the base model (chat template) on the first ``n`` test questions, timed.

    ours: as the notebooks evaluate (``evaluation.answer_dataset``: bf16 weights where the CPU multiplies
    bf16 natively, batches of 16 prompts of similar length); hf: transformers ``generate`` on the same
    prompt ids, also in batches of 16 in the same order, left-padded, in ``--precision`` (float32, the
    issue's reference, or bf16: the same dtype as ours). Ours stops a row
    at a newline once it has text; ``generate`` has no such rule, so it gets EOS *and* every newline token
    as stop ids -- the same or fewer generated tokens than ours, never more (HF is not slowed down by it).
    """
    from lora_tutorial.config import load_config
    from lora_tutorial.evaluation import answer_dataset
    from lora_tutorial.generation import stop_token_ids
    from lora_tutorial.metrics import clean_prediction, score_predictions
    from lora_tutorial.precision import cpu_has_native_bf16
    from lora_tutorial.sft_model import SFTModel

    cfg = load_config(REPO / "conf/peft_eval.yaml", [f"model.data.test_ds.file_names=[{TEST_FILE}]",
                                                     f"model.data.test_ds.limit={args.n}"])
    model = SFTModel.restore_from(cfg.model.restore_from_path, cfg)
    model.model.requires_grad_(False)
    if args.impl == "ours":
        if cpu_has_native_bf16():
            from lora_tutorial.precision import cast_frozen_weights

            cast_frozen_weights(model.model, torch.bfloat16)
        result = answer_dataset(model, cfg.model.data.test_ds, use_chat_template=True, progress=False)
        scores, seconds = result.scores, result.seconds
    else:
        hf = hf_base(args.precision).eval()
        dataset = model.build_dataset(cfg.model.data.test_ds)
        order = dataset.indices_by_length()
        items = [dataset[i] for i in order]
        prompts = model.prompt_ids({"prompts": [item["prompt"] for item in items]}, use_chat_template=True)
        newlines, _ = model.newline_and_blank_ids()
        stops = sorted(set(stop_token_ids(model.tokenizer)) | set(newlines))
        answers = []
        started = time.perf_counter()
        for b in range(0, len(prompts), 16):
            batch = prompts[b:b + 16]
            width = max(map(len, batch))
            ids = torch.tensor([[2] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=2,
                                  eos_token_id=stops)
            answers += [clean_prediction(model.tokenizer.decode(row[width:].tolist())) for row in out]
        seconds = time.perf_counter() - started
        scores = score_predictions(answers, [item["answers"] for item in items])
    ours_precision = "bf16" if cpu_has_native_bf16() else "32"  # what the notebooks use on this CPU
    return {"impl": args.impl, "precision": args.precision if args.impl == "hf" else ours_precision,
            "n": args.n, "seconds": seconds, "questions_per_s": args.n / seconds,
            "exact_match": scores.exact_match, "f1": scores.f1, "peak_rss_mb": peak_rss_mb()}


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
    sub.add_parser("limits")
    evaluate = sub.add_parser("evaluate")
    evaluate.add_argument("--impl", choices=["ours", "hf"], required=True)
    evaluate.add_argument("--n", type=int, default=100)
    evaluate.add_argument("--precision", choices=["32", "bf16"], default="32")  # hf only
    args = parser.parse_args()
    commands = {"train": cmd_train, "decode": cmd_decode, "lossparity": cmd_lossparity, "evaluate": cmd_evaluate,
                "limits": cmd_limits}
    result = commands[args.cmd](args)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
