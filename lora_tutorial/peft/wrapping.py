"""The wrapper protocol every PEFT method follows, and the two tools that do all the model surgery.

A PEFT *wrapper* is an ``nn.Module`` with

* a class attribute ``peft_scheme`` ("lora", "adapter", "ia3", "ptuning"),
* the layer it wraps as ``.base`` (p-tuning's prompt modules wrap nothing),
* an ``adapter_enabled`` switch (``disable_adapters`` turns it off).

``replace_module`` swaps one submodule, named by its dotted path (``blocks.3.attention.attention_qkv``),
and ``unwrap`` finds the plain layer under any number of wrappers. Inserting a method, merging LoRA
away and rolling back a failed load are all made of these two.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from .config import TARGET_PARENTS


def is_peft_module(module: nn.Module) -> bool:
    return bool(getattr(module, "peft_scheme", None))


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost layer under any number of PEFT wrappers (``wrapper.base.base...``)."""
    while is_peft_module(module) and hasattr(module, "base"):
        module = module.base
    return module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` is; return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def target_name(layer: int, target: str) -> str:
    """``blocks.<layer>.<attention|mlp>.<target>``: where a target linear layer lives in ``GPT``."""
    return f"blocks.{layer}.{TARGET_PARENTS[target]}.{target}"


def wrap_targets(model: nn.Module, layers: Iterable[int], targets: Iterable[str],
                 make: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace each target layer of each selected block by ``make(layer)``; return the names wrapped."""
    names = [target_name(i, t) for i in layers for t in targets]
    for name in names:
        replace_module(model, name, make(model.get_submodule(name)))
    return names


__all__ = ["is_peft_module", "unwrap", "replace_module", "target_name", "wrap_targets"]
