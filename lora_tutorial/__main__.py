"""Command line: ``python -m lora_tutorial <command> ...`` (also installed as ``lora-tutorial``).

Commands:
  generate       answer a prompt with the base model (and optionally a trained adapter)
  prepare-data   get SQuAD v1.1 and write the SFT jsonl files into data/SQuAD/
  train          fine-tune with a PEFT method from an OmegaConf YAML (+ key=value overrides)
  evaluate       predict on a dataset and print EM/F1
  export         merge an adapter into the base model and write a GGUF file
  tutorial       execute the notebooks in order, print the time of each and the results table

Each command imports only what it needs, so ``--help`` is instant. A bad value (a config key, a file,
an adapter) ends with one line naming it and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generation import generate
    from .pretrained import load_base_model

    if args.precision == "int8" and not args.adapter:  # the int8 matrices from the weight cache
        from .quantize import load_int8_model

        model, tokenizer = load_int8_model(args.model)
    else:
        dtype = torch.float32 if args.precision == "32" else torch.bfloat16
        model, tokenizer = load_base_model(args.model, dtype=dtype)
    if args.adapter:
        from .peft import load_adapters

        load_adapters(model, args.adapter)
        if args.precision == "int8":  # quantize the base under the adapter (adapters stay float32)
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
    from .squad import prepare_squad

    prepare_squad(args.data_dir, source=args.source)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import resource

    from .config import load_config
    from .files import write_json
    from .peft import parameter_summary
    from .training import train

    result = train(load_config(args.config, args.overrides))
    if result.trainer.is_global_zero:
        print(f"Training took {result.train_seconds:.0f} s; adapter: {result.adapter}")
        if args.report:  # what notebook 07 compares: time, memory and size of each variant
            write_json({"train_seconds": result.train_seconds, "steps": result.trainer.global_step,
                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "trainable_params": parameter_summary(result.model.model).trainable,
                        "adapter": str(result.adapter)}, args.report)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omegaconf import OmegaConf

    from .config import load_config
    from .evaluation import evaluate

    cfg = load_config(args.config, args.overrides)
    if not cfg.inference.output_file:  # default: next to the adapter (or here, for the bare base model)
        adapter = cfg.model.peft.restore_from_path
        OmegaConf.update(cfg, "inference.output_file", str(Path(adapter).parent if adapter else Path(".")) +
                         "/predictions.jsonl")
    result = evaluate(cfg)
    print(f"{result.scores}  ({result.seconds:.0f} s); predictions: {cfg.inference.output_file}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .gguf_export import export_gguf
    from .peft import load_adapters
    from .pretrained import load_base_model, resolve_model_path

    model, _ = load_base_model(args.model)  # float32: the merge must not round twice
    load_adapters(model, args.adapter)
    export_gguf(model, resolve_model_path(args.model), args.out, dtype=args.dtype, verbose=True)
    return 0


def _cmd_tutorial(args: argparse.Namespace) -> int:
    import os
    import tempfile
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    from .files import write_text
    from .notebook import MODE_ENV, find_repo_root, print_results_table

    os.environ[MODE_ENV] = args.mode
    root = find_repo_root()
    notebooks = [Path(n) for n in args.notebooks] or sorted((root / "notebooks").glob("0*.ipynb"))
    times = []
    started_all = time.perf_counter()
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        started = time.perf_counter()
        print(f"== {path.name} ...", flush=True)
        client = NotebookClient(nb, timeout=-1, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        # The kernel's own stderr (start-up chatter) goes to a file, shown only if the kernel dies.
        with tempfile.TemporaryFile("w+") as kernel_log:
            try:
                client.execute(stderr=kernel_log)
            except DeadKernelError:
                kernel_log.seek(0)
                print(kernel_log.read()[-3000:], file=sys.stderr)
                raise
        times.append((path.name, time.perf_counter() - started))
        write_text(nbformat.writes(nb) + "\n", path)  # atomic: an interrupted run never leaves half a notebook
        print(f"   {times[-1][1]:.0f} s", flush=True)
    print("\nTime per notebook:")
    for name, seconds in times:
        print(f"  {name:40s} {seconds:6.0f} s")
    print(f"  {'total':40s} {time.perf_counter() - started_all:6.0f} s\n")
    print_results_table(args.mode)
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

    exp = sub.add_parser("export", help="merge an adapter into the base and write a GGUF (llama.cpp, Ollama...)")
    exp.add_argument("--adapter", required=True, help="adapter file written by training (LoRA, DoRA, IA3)")
    exp.add_argument("--out", required=True, help="the .gguf file to write")
    exp.add_argument("--dtype", choices=["f16", "q8_0"], default="f16", help="tensor type of the matrices")
    exp.add_argument("--model", default="smollm2-135m-instruct", help="the base model (name or .gguf file)")
    exp.set_defaults(func=_cmd_export)

    tut = sub.add_parser("tutorial", help="execute the notebooks in place; print the time of each and the results")
    tut.add_argument("--mode", choices=["fast", "nemo"], default="fast", help="LORA_TUTORIAL_MODE for the notebooks")
    tut.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/0*.ipynb, in order)")
    tut.set_defaults(func=_cmd_tutorial)

    for name, func, default in (("train", _cmd_train, "conf/peft_tuning.yaml"),
                                ("evaluate", _cmd_evaluate, "conf/peft_eval.yaml")):
        cmd = sub.add_parser(name, help=f"{name} from a YAML config")
        cmd.add_argument("--config", default=default)
        cmd.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. trainer.max_steps=20")
        if name == "train":
            cmd.add_argument("--report", help="also write train time, peak memory and trainable parameters (JSON)")
        cmd.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        # Our own errors name the file/key and what was expected, and an OSError names the file it
        # could not read or write (missing, permissions, disk full): show them without a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
