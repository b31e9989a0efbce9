"""Command line: ``python -m lora_tutorial <command> ...`` (also installed as ``lora-tutorial``).

Commands:
  generate       answer a prompt with the base model (and optionally a trained adapter)
  prepare-data   get SQuAD v1.1 and write the SFT jsonl files into data/SQuAD/
  train          fine-tune with a PEFT method from an OmegaConf YAML (+ key=value overrides)
  evaluate       predict on a dataset and print EM/F1

Each command imports only what it needs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoints import load_base_model
    from .generation import generate

    import torch

    model, tokenizer = load_base_model(args.model, dtype=torch.float32 if args.precision == "32" else torch.bfloat16)
    if args.adapter:
        from .peft import load_adapters

        load_adapters(model, args.adapter)
    if args.precision == "int8":
        from .quantize import quantize_int8

        quantize_int8(model.requires_grad_(False))
    prompt = args.prompt if args.raw else tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    started = time.perf_counter()
    text = generate(model, tokenizer, prompt, tokens_to_generate=args.tokens_to_generate,
                    greedy=args.temperature == 0, temperature=args.temperature or 1.0,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    elapsed = time.perf_counter() - started
    print(text)
    if args.verbose:
        n_new = len(tokenizer.encode(text)) + 1
        print(f"[{n_new} tokens in {elapsed:.2f} s, {n_new / elapsed:.1f} tokens/s]", file=sys.stderr)
    return 0


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    from .data import prepare_squad

    prepare_squad(args.data_dir, source=args.source)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .workflow import train_from_config

    train_from_config(args.config, args.overrides)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .workflow import evaluate_from_config

    evaluate_from_config(args.config, args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_tutorial", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a prompt with the base model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", default="smollm2-135m-instruct", help="model name, .gguf file or HF directory")
    gen.add_argument("--adapter", help="adapter file written by training (adapter.safetensors)")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    gen.add_argument("--tokens-to-generate", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--precision", choices=["32", "bf16", "int8"], default="32",
                     help="weights in float32 (default), bf16, or int8 (fastest on a CPU; see quantize.py)")
    gen.add_argument("-v", "--verbose", action="store_true", help="print tokens/s to stderr")
    gen.set_defaults(func=_cmd_generate)

    prep = sub.add_parser("prepare-data", help="download (or copy) SQuAD v1.1 and write SFT jsonl files")
    prep.add_argument("--source", default=None, help="local directory with train-v1.1.json[.gz] and "
                      "dev-v1.1.json[.gz] (default: $SQUAD_SOURCE_DIR, else download)")
    prep.add_argument("--data-dir", default="data")
    prep.set_defaults(func=_cmd_prepare_data)

    for name, func, default in (("train", _cmd_train, "conf/peft_tuning.yaml"),
                                ("evaluate", _cmd_evaluate, "conf/peft_eval.yaml")):
        cmd = sub.add_parser(name, help=f"{name} from a YAML config")
        cmd.add_argument("--config", default=default)
        cmd.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. trainer.max_steps=20")
        cmd.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # Our own errors name the file/key and what was expected: show them without a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
