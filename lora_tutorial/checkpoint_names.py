"""How checkpoints name a Llama model's tensors: ours, Hugging Face's and GGUF's, in one table.

Every reader (``pretrained.py``, ``hf_checkpoint.py``) and writer (``gguf_export.py``) of Llama weights
goes through ``LLAMA_NAMES``, so a tensor can never be renamed in one place and not the other.
"""

from __future__ import annotations

import torch

from .model import GPTConfig


class CheckpointError(ValueError):
    """A model file or directory that cannot be loaded; the message says which and why."""


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from llama.cpp's interleaved rotary layout to the half-split (HF) layout."""
    d_out, d_in = w.shape
    head_dim = d_out // n_head
    return w.reshape(n_head, head_dim // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


HF, GGUF = 0, 1
# Our name -> (HF names, GGUF names). Where we fuse matrices (Q|K|V, gate|up) the parts are stacked by
# rows in the order listed. "{i}" is the layer index.
LLAMA_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "wte.weight": (("embed_tokens.weight",), ("token_embd.weight",)),
    "norm_f.weight": (("norm.weight",), ("output_norm.weight",)),
    "lm_head.weight": (("lm_head.weight",), ("output.weight",)),
    "blocks.{i}.norm_1.weight": (("layers.{i}.input_layernorm.weight",), ("blk.{i}.attn_norm.weight",)),
    "blocks.{i}.attention.attention_qkv.weight": (
        ("layers.{i}.self_attn.q_proj.weight", "layers.{i}.self_attn.k_proj.weight",
         "layers.{i}.self_attn.v_proj.weight"),
        ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight")),
    "blocks.{i}.attention.attention_dense.weight": (("layers.{i}.self_attn.o_proj.weight",),
                                                    ("blk.{i}.attn_output.weight",)),
    "blocks.{i}.norm_2.weight": (("layers.{i}.post_attention_layernorm.weight",), ("blk.{i}.ffn_norm.weight",)),
    "blocks.{i}.mlp.mlp_fc1.weight": (("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
                                      ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight")),
    "blocks.{i}.mlp.mlp_fc2.weight": (("layers.{i}.mlp.down_proj.weight",), ("blk.{i}.ffn_down.weight",)),
}


def llama_names(config: GPTConfig, naming: int) -> dict[str, tuple[str, ...]]:
    """Every tensor of a Llama-style ``config``: our name -> its source name(s) under ``naming`` (HF or GGUF)."""
    names = {}
    for ours, theirs in LLAMA_NAMES.items():
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        for i in range(config.n_layer) if "{i}" in ours else (None,):
            names[ours.format(i=i)] = tuple(t.format(i=i) for t in theirs[naming])
    return names


def llama_state_dict(raw: dict[str, torch.Tensor], config: GPTConfig, naming: int,
                     source: str) -> dict[str, torch.Tensor]:
    """Our state dict from tensors named the HF or GGUF way (fused parts concatenated by rows).

    Every expected tensor must be in ``raw`` and nothing else may be: a missing or unexpected name is a
    ``CheckpointError`` naming it, never a silently random or ignored weight.
    """
    raw = dict(raw)
    state = {}
    for ours, theirs in llama_names(config, naming).items():
        missing = [t for t in theirs if t not in raw]
        if missing:
            raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing")
        parts = [raw.pop(t) for t in theirs]
        state[ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
    if raw:
        raise CheckpointError(f"{source}: unexpected tensors {sorted(raw)[:5]} (not a plain llama model?)")
    return state


__all__ = ["GGUF", "HF", "LLAMA_NAMES", "CheckpointError", "llama_names", "llama_state_dict", "unpermute_rope_rows"]
