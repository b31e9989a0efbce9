"""Reading a Hugging Face model directory (``config.json`` + ``*.safetensors``): Llama-family or GPT-2.

The config keys become a ``GPTConfig`` (a missing key is an error naming it), the tensors are renamed to
ours (Llama through ``checkpoint_names.LLAMA_NAMES``; GPT-2's transposed Conv1D matrices by hand), and
any other tensor left over is an error. What is dropped on purpose: rotary-embedding and causal-mask
buffers (recomputed here), and ``lm_head.weight`` of a model whose config ties it to the embedding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .checkpoint_names import HF, CheckpointError, llama_state_dict
from .model import GPTConfig
from .tokenizer import Tokenizer, tokenizer_from_hf_dir

_HF_LLAMA_TYPES = {"llama", "mistral"}


def read_hf_dir(directory: Path) -> tuple[GPTConfig, dict, Tokenizer]:
    """Config, float32 weights (our names) and tokenizer of a Hugging Face Llama or GPT-2 directory."""
    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{directory}: config.json is missing; expected a Hugging Face model directory")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: invalid JSON at line {err.lineno}: {err.msg}") from None
    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        raise CheckpointError(f"{directory}: no *.safetensors weights found (PyTorch .bin files are not "
                              "loaded, for safety; convert them to safetensors)")
    raw: dict[str, torch.Tensor] = {}
    for f in weight_files:
        try:
            raw.update({k: v.float() for k, v in load_file(str(f)).items()})
        except Exception as err:  # noqa: BLE001 - safetensors raises several error types
            raise CheckpointError(f"{f}: cannot read safetensors file ({err})") from None
    model_type = hf.get("model_type")
    if model_type in _HF_LLAMA_TYPES:
        config, state = _hf_llama(directory, hf, raw)
    elif model_type == "gpt2":
        config, state = _hf_gpt2(directory, hf, raw)
    else:
        hint = " (for T5 directories use lora_tutorial.t5.load_t5)" if model_type in ("t5", "mt5") else ""
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not supported; expected one of "
                              f"{sorted(_HF_LLAMA_TYPES | {'gpt2'})}{hint}")
    return config, state, tokenizer_from_hf_dir(directory)


def _required(hf: dict, directory: Path) -> Callable[[str], Any]:
    """``need(key)``: ``hf[key]``, or a ``CheckpointError`` naming the config file and the missing key."""
    def need(key: str) -> Any:
        if key not in hf:
            raise CheckpointError(f"{directory}/config.json: missing key {key!r}")
        return hf[key]
    return need


def _hf_llama(directory: Path, hf: dict, raw: dict) -> tuple[GPTConfig, dict]:
    need = _required(hf, directory)
    if hf.get("rope_scaling"):
        raise CheckpointError(f"{directory}/config.json: rope_scaling={hf['rope_scaling']!r} is not supported")
    n_head = need("num_attention_heads")
    d_model = need("hidden_size")
    if hf.get("head_dim", d_model // n_head) != d_model // n_head:
        raise CheckpointError(f"{directory}/config.json: head_dim != hidden_size / num_attention_heads "
                              "is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{directory}/config.json: attention/MLP biases are not supported for llama")
    config = GPTConfig(
        vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"), n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=d_model, d_ff=need("intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 4096), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        position="rope", rope_base=float(hf.get("rope_theta", 10000.0)), mlp="swiglu", bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    raw = {k.removeprefix("model."): v for k, v in raw.items()}
    if config.tie_embeddings:
        raw.pop("lm_head.weight", None)
    raw = {k: v for k, v in raw.items() if "rotary_emb" not in k}
    return config, llama_state_dict(raw, config, HF, str(directory))


def _hf_gpt2(directory: Path, hf: dict, raw: dict) -> tuple[GPTConfig, dict]:
    need = _required(hf, directory)
    activation = hf.get("activation_function", "gelu_new")
    if activation not in {"gelu_new", "gelu_pytorch_tanh"}:
        raise CheckpointError(f"{directory}/config.json: activation_function {activation!r} is not supported; "
                              "expected 'gelu_new'")
    d_model = need("n_embd")
    config = GPTConfig.gpt2_style(
        vocab_size=need("vocab_size"), n_layer=need("n_layer"), n_head=need("n_head"), d_model=d_model,
        d_ff=hf.get("n_inner") or 4 * d_model, max_seq_len=need("n_positions"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    raw = {k.removeprefix("transformer."): v for k, v in raw.items()}
    raw = {k: v for k, v in raw.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    take = _taker(directory, raw)
    state = {"wte.weight": take("wte.weight"), "wpe.weight": take("wpe.weight"),
             "norm_f.weight": take("ln_f.weight"), "norm_f.bias": take("ln_f.bias")}
    if not config.tie_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    raw.pop("lm_head.weight", None)
    # GPT-2 stores its linear layers as Conv1D, i.e. transposed (in_features, out_features).
    names = {"attn.c_attn": "attention.attention_qkv", "attn.c_proj": "attention.attention_dense",
             "mlp.c_fc": "mlp.mlp_fc1", "mlp.c_proj": "mlp.mlp_fc2"}
    for i in range(config.n_layer):
        p, q = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
            state[q + ours + ".weight"] = take(p + theirs + ".weight")
            state[q + ours + ".bias"] = take(p + theirs + ".bias")
        for theirs, ours in names.items():
            state[q + ours + ".weight"] = take(p + theirs + ".weight").t().contiguous()
            state[q + ours + ".bias"] = take(p + theirs + ".bias")
    _no_leftovers(directory, raw)
    return config, state


def _taker(directory: Path, raw: dict):
    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise CheckpointError(f"{directory}: weight {name!r} is missing from the safetensors files")
        return raw.pop(name)
    return take


def _no_leftovers(directory: Path, raw: dict) -> None:
    leftover = [k for k in raw if "rotary_emb" not in k]
    if leftover:
        raise CheckpointError(f"{directory}: unexpected weights {leftover[:5]}")


__all__ = ["read_hf_dir"]
