"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP inserted after a frozen sub-layer.

Each transformer block gets two adapters: one right after the attention output projection and one right
after the MLP's output projection, before each is added to the residual stream::

    y = attention_dense(...)              y = mlp_fc2(...)
    y = y + adapter(y)                    y = y + adapter(y)

    adapter(y) = dropout(up(act(down(norm(y)))))      norm_position: pre  (NeMo's default here)
    adapter(y) = dropout(norm(up(act(down(y)))))      norm_position: post

``down`` projects d_model -> ``adapter_dim`` (32), ``act`` is SiLU (NeMo's "swish"), ``up`` projects back.
Like LoRA's B, ``up`` starts at zero, so every adapter outputs 0 and the model starts as the base model.
(A zero vector stays zero through LayerNorm with its zero-initialised bias, so "post" also starts at 0.)

Unlike LoRA, an adapter is a *non-linear* extra layer: it cannot be merged into the base weights, so it
costs a little extra compute at inference. With dim 32 on SmolLM2 it has 2 x 30 x (2 x 576 x 32 + 2 x 576)
= 2,280,960 parameters (projections without biases, as in NeMo, plus the LayerNorm's weight and bias).

We implement it by wrapping ``attention_dense`` and ``mlp_fc2`` (``AdapterLinear``): the model code never
changes, and ``disable_adapters`` can switch the adapter off.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..model import GPT
from ..precision import trainable_dtype
from .config import AdapterPEFTConfig, select_layers
from .lora import init_tensor_
from .wrapping import wrap_targets


class BottleneckAdapter(nn.Module):
    """down (dim -> bottleneck) -> SiLU -> up (bottleneck -> dim), with a LayerNorm before or after."""

    def __init__(self, dim: int, bottleneck: int, dropout: float = 0.0, norm_position: str = "pre",
                 column_init_method: str = "xavier", row_init_method: str = "zero",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position={norm_position!r}; expected 'pre' or 'post'")
        factory = dict(device=device, dtype=dtype)
        self.norm_position = norm_position
        self.norm = nn.LayerNorm(dim, **factory)
        self.down = nn.Linear(dim, bottleneck, bias=False, **factory)
        self.up = nn.Linear(bottleneck, dim, bias=False, **factory)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_tensor_(self.down.weight.data, column_init_method)
        init_tensor_(self.up.weight.data, row_init_method)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.norm_position == "pre":
            y = self.norm(y)
        z = self.up(self.act(self.down(y)))
        if self.norm_position == "post":
            z = self.norm(z)
        return self.dropout(z)


class AdapterLinear(nn.Module):
    """``y = base(x); y + adapter(y)``: a frozen layer followed by a residual bottleneck adapter."""

    peft_scheme: ClassVar[str] = "adapter"

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.adapter_enabled = True  # switched off by peft.disable_adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        return y + self.adapter(y)


def apply_adapters(model: GPT, cfg: AdapterPEFTConfig) -> list[str]:
    """Put an adapter after ``attention_dense`` and after ``mlp_fc2`` of the selected blocks."""
    weight = model.wte.weight

    def make(layer: nn.Module) -> AdapterLinear:
        adapter = BottleneckAdapter(model.config.d_model, cfg.adapter_dim, cfg.adapter_dropout, cfg.norm_position,
                                    cfg.column_init_method, cfg.row_init_method, weight.device,
                                    trainable_dtype(weight.dtype))
        return AdapterLinear(layer, adapter)
    layers = select_layers(len(model.blocks), cfg.layer_selection, cfg.section)
    return wrap_targets(model, layers, ("attention_dense", "mlp_fc2"), make)


__all__ = ["BottleneckAdapter", "AdapterLinear", "apply_adapters"]
