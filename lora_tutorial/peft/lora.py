r"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al., 2021).

A pretrained linear layer computes ``h = W x`` with ``W`` of shape (out, in). Full fine-tuning learns a
change ``ΔW`` of the same shape: for SmolLM2's fused QKV projection that is 960 x 576 = 552,960 numbers
per layer. LoRA bets that the useful change has a *low rank* r and learns it as a product of two thin
matrices, while ``W`` stays frozen::

    h = W x + (alpha / r) · B A x        A: (r, in)   B: (out, r)   r << min(in, out)

            x
            ├──────────────────┐
            │                  │ dropout
      ┌─────┴─────┐      ┌─────┴─────┐
      │  W        │      │  A  r×in  │  "column" init (xavier)
      │  frozen   │      └─────┬─────┘
      │  out×in   │      ┌─────┴─────┐
      └─────┬─────┘      │  B  out×r │  "row" init (zero)
            │            └─────┬─────┘
            │                  │ × alpha/r
            └─────── + ────────┘
                     h

Why these choices:

* **B starts at zero**, so ``B A x = 0`` and the adapted model *is* the base model at step 0; training
  moves away from a known-good point. A must then be random: the gradient of B is proportional to A x,
  and with both at zero neither would ever move.
* **The scale alpha/r** decouples the learning rate from the rank: with ``alpha`` fixed, doubling r halves
  the scale, roughly compensating the larger sum over r terms. rsLoRA (Kalajdzievski, 2023) argues that
  ``alpha / sqrt(r)`` keeps updates well-scaled at large ranks; ``rslora: true`` selects it.
* **The fused QKV matrix gets one LoRA** (as NeMo does): A (r, 576) is shared and B (960, r) stacks the
  query (576 rows), key (192) and value (192) parts. That equals three LoRAs on q, k, v with a shared A,
  which is how ``checkpoint.export_hf_peft`` writes it for HF PEFT. With r = 32 on all 30 layers:
  30 x 32 x (576 + 960) = 1,474,560 trainable parameters, 1.1 % of the 134.5 M base.
* **Merging**: after training, ``W + (alpha/r) B A`` is an ordinary (out, in) matrix. ``merge()`` folds it into
  the base weight so inference costs exactly what the base costs; ``unmerge()`` subtracts it again.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..model import GPT
from .config import TARGET_PARENTS, LoraPEFTConfig, select_layers


def init_tensor_(tensor: torch.Tensor, method: str) -> torch.Tensor:
    """Initialise in place with one of NeMo's adapter init methods: xavier | normal | kaiming | zero."""
    if method == "xavier":
        return nn.init.xavier_normal_(tensor)
    if method == "normal":
        return nn.init.normal_(tensor, mean=0.0, std=0.2)  # NeMo's init_method_normal(0.2)
    if method == "kaiming":
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))  # what nn.Linear uses by default
    if method == "zero":
        return nn.init.zeros_(tensor)
    raise ValueError(f"unknown init method {method!r}; expected xavier, normal, kaiming or zero")


class LoRALinear(nn.Module):
    """``base(x) + scaling * B(A(dropout(x)))`` around a frozen ``nn.Linear`` kept as ``self.base``.

    The base layer's parameters keep their names under ``.base`` (``attention_qkv.base.weight``), and the
    two new matrices are ``lora_A`` (rank, in) and ``lora_B`` (out, rank), as in HF PEFT.
    """

    peft_scheme: ClassVar[str] = "lora"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 column_init_method: str = "xavier", row_init_method: str = "zero") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(init_tensor_(torch.empty(rank, base.in_features, **factory), column_init_method))
        self.lora_B = nn.Parameter(init_tensor_(torch.empty(base.out_features, rank, **factory), row_init_method))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while the update lives inside base.weight
        self.adapter_enabled = True  # switched off by peft.disable_adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or not self.adapter_enabled:
            return out  # merged: base.weight already holds W + scaling * B A
        # Two thin matmuls, x -> (.., r) -> (.., out): never materialise the (out, in) product here.
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return out + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        """The full-size update ``scaling * B @ A`` (out, in), computed in float32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base.weight`` (for inference). Merging twice is a no-op.

        The sum is taken in float32 and rounded once to the weight's dtype: exact to ~1e-7 in fp32, but a
        bf16 weight cannot hold small updates precisely, so merge fp32 weights when precision matters.
        """
        if self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to float rounding). A no-op when not merged."""
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def apply_lora(model: GPT, cfg: LoraPEFTConfig) -> list[str]:
    """Wrap the configured linear layers of the selected blocks in ``LoRALinear``; return their names."""
    wrapped = []
    for i in select_layers(len(model.blocks), cfg.layer_selection, cfg.section):
        for target in cfg.target_modules:
            parent = getattr(model.blocks[i], TARGET_PARENTS[target])
            layer = getattr(parent, target)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"blocks.{i}.{TARGET_PARENTS[target]}.{target} is already wrapped by "
                                 f"{type(layer).__name__}; add LoRA first (or pass all configs to one "
                                 "add_adapter call, which orders them)")
            setattr(parent, target, LoRALinear(layer, cfg.adapter_dim, cfg.alpha, cfg.adapter_dropout, cfg.rslora,
                                               cfg.column_init_method, cfg.row_init_method))
            wrapped.append(f"blocks.{i}.{TARGET_PARENTS[target]}.{target}")
    return wrapped


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer of ``model`` into its base weight; return how many were merged."""
    layers = lora_modules(model)
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo ``merge_lora``; return how many LoRA layers there are."""
    layers = lora_modules(model)
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and put the plain ``nn.Linear`` back in its place (no LoRA code left).

    The result is an ordinary model with the fine-tuned weights: it can be saved and shared like a base
    model. Other PEFT methods (adapters, IA3, p-tuning) stay as they are.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(parent, name, child.base)
    configs = getattr(model, "peft_configs", None)
    if configs is not None:
        model.peft_configs = [c for c in configs if c.scheme != "lora"]
    return model


__all__ = ["LoRALinear", "apply_lora", "init_tensor_", "lora_modules", "merge_lora", "unmerge_lora",
           "merge_and_unload"]
