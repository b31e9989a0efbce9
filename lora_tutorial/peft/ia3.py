"""IA3: "Infused Adapter by Inhibiting and Amplifying Inner Activations" (Liu et al., 2022).

The smallest of the methods here. IA3 learns three vectors per layer that rescale, element by element,

* the attention **keys**        k = l_k ⊙ (W_k x)          l_k: n_kv_head * head_dim  (192 for SmolLM2)
* the attention **values**      v = l_v ⊙ (W_v x)          l_v: n_kv_head * head_dim  (192)
* the FFN **hidden activation** h = l_ff ⊙ (silu(g) * u)    l_ff: d_ff                 (1536)

and nothing else. All vectors start at 1, so the model starts as the base model. SmolLM2 gets
30 x (192 + 192 + 1536) = 57,600 trainable parameters: 0.04 % of the base.

Implementation by wrapping, with the model code unchanged:

* ``IA3QKV`` wraps the fused ``attention_qkv`` and multiplies the key and value slices of its output.
  (The query slice is multiplied by a constant 1.) This is exactly HF PEFT's IA3 on ``k_proj``/``v_proj``.
* ``IA3FFN`` wraps ``mlp_fc2`` and multiplies its *input*, i.e. the FFN hidden activation: HF PEFT's
  "feed-forward" IA3 on ``down_proj``.

Because a scaling of outputs (or inputs) is a scaling of the weight's rows (or columns), IA3 could be
merged into the base weights too; we keep it as a wrapper so it can be switched off.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..model import GPT
from ..precision import trainable_dtype
from .config import IA3PEFTConfig, select_layers
from .wrapping import wrap_targets


class IA3QKV(nn.Module):
    """Fused QKV projection whose key and value outputs are rescaled by learned vectors."""

    peft_scheme: ClassVar[str] = "ia3"

    def __init__(self, base: nn.Module, qkv_sizes: tuple[int, int, int], device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        q_size, k_size, v_size = qkv_sizes
        self.base = base
        self.q_size = q_size
        self.ia3_k = nn.Parameter(torch.ones(k_size, device=device, dtype=dtype))
        self.ia3_v = nn.Parameter(torch.ones(v_size, device=device, dtype=dtype))
        self.adapter_enabled = True  # switched off by peft.disable_adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        # One scale per output row of the fused matrix: 1 for queries, l_k for keys, l_v for values.
        scale = torch.cat([self.ia3_k.new_ones(self.q_size), self.ia3_k, self.ia3_v])
        return y * scale.to(y.dtype)


class IA3FFN(nn.Module):
    """FFN output projection whose input (the hidden activation) is rescaled by a learned vector."""

    peft_scheme: ClassVar[str] = "ia3"

    def __init__(self, base: nn.Module, d_ff: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base = base
        self.ia3_ff = nn.Parameter(torch.ones(d_ff, device=device, dtype=dtype))
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_enabled:
            x = x * self.ia3_ff.to(x.dtype)
        return self.base(x)


def apply_ia3(model: GPT, cfg: IA3PEFTConfig) -> list[str]:
    """Wrap ``attention_qkv`` and ``mlp_fc2`` of the selected blocks with IA3 scaling vectors."""
    weight, c = model.wte.weight, model.config
    layers = select_layers(len(model.blocks), cfg.layer_selection, cfg.section)
    device, dtype = weight.device, trainable_dtype(weight.dtype)
    return (wrap_targets(model, layers, ("attention_qkv",), lambda m: IA3QKV(m, c.qkv_sizes, device, dtype))
            + wrap_targets(model, layers, ("mlp_fc2",), lambda m: IA3FFN(m, c.d_ff, device, dtype)))


__all__ = ["IA3QKV", "IA3FFN", "apply_ia3"]
