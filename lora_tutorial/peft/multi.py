"""Several adapters on one base: load them under names, switch per request, combine LoRAs.

A deployed base model often serves several fine-tunes. Their adapters are small, so one copy of the
base can hold all of them, each under a name, and a request picks one::

    load_adapters(model, "squad.safetensors", name="squad")
    load_adapters(model, "other.safetensors", name="other")
    set_adapter(model, "squad")            # only the "squad" adapter is on
    with disable_adapters(model): ...      # the plain base model
    combine_lora(model, {"squad": 0.5, "other": 0.5}, name="mix")   # a new adapter: 0.5 ΔW1 + 0.5 ΔW2

How: an adapter added under another name wraps the layers again (a ``LoRALinear`` whose ``base`` is the
first adapter's ``LoRALinear``), and every wrapper knows its ``adapter_name``. ``set_adapter`` switches
wrappers on and off; the frozen weights are shared and never copied.

``combine_lora`` is exact, not an approximation: for LoRA updates ΔW_i = s_i B_i A_i, the weighted sum
Σ w_i ΔW_i equals one LoRA of rank Σ r_i with A = [A_1; A_2; ...] stacked by rows and
B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] side by side, at scale 1 (HF PEFT's ``add_weighted_adapter`` with
``combination_type="cat"``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import GPT
from .config import TARGET_PARENTS, LoraPEFTConfig
from .inject import adapter_name_of, peft_modules
from .lora import LoRALinear
from .wrapping import replace_module


def adapter_names(model: GPT) -> list[str]:
    """The names of the adapters in ``model``, in the order they were added."""
    return list(dict.fromkeys(c.adapter_name for c in model.peft_configs))


def active_adapters(model: GPT) -> list[str]:
    """The names of the adapters whose wrappers are switched on."""
    return list(dict.fromkeys(adapter_name_of(m) for m in peft_modules(model) if getattr(m, "adapter_enabled", True)))


def set_adapter(model: GPT, name: str) -> None:
    """Switch on the adapter ``name`` and switch off every other one (unmerging a merged LoRA first:
    its update is in the base weight, where switching it off could not reach it)."""
    if name not in adapter_names(model):
        raise ValueError(f"set_adapter: no adapter named {name!r}; the model has "
                         f"{', '.join(adapter_names(model)) or 'none'}")
    for module in peft_modules(model):
        if hasattr(module, "adapter_enabled"):
            enabled = adapter_name_of(module) == name
            if not enabled and isinstance(module, LoRALinear):
                module.unmerge()
            module.adapter_enabled = enabled


def combine_lora(model: GPT, weights: dict[str, float], name: str) -> LoraPEFTConfig:
    """Add the adapter ``name`` = Σ weights[n] · ΔW of the LoRA adapters named in ``weights``, and switch to it.

    The adapters must be plain LoRA (no DoRA, no PiSSA / OLoRA residual). They may adapt different layers,
    as long as together they cover some modules in some blocks completely (every chosen module of every
    chosen block): where one of them is absent its ΔW is zero, written as zero rows of A and zero columns
    of B. Returns the new adapter's config (rank = the sum of the ranks, alpha = rank, so its scale is 1;
    the modules and blocks are the union of theirs), so that the mix saves and loads like any adapter.
    """
    if name in adapter_names(model):
        raise ValueError(f"combine_lora: the model already has an adapter named {name!r}")
    lora_ranks = {c.adapter_name: c.adapter_dim for c in model.peft_configs if c.scheme == "lora"}
    unknown = [n for n in weights if n not in lora_ranks]
    if unknown:
        raise ValueError(f"combine_lora: {unknown[0]!r} is not a LoRA adapter of this model; it has "
                         f"{sorted(lora_ranks)}")
    layers = _lora_layers_by_target(model, list(weights))
    ranks = {n: lora_ranks[n] for n in weights}
    for parts in layers.values():
        some = next(iter(parts.values()))
        d_out, d_in = some.lora_B.shape[0], some.lora_A.shape[1]
        a = torch.cat([parts[n].lora_A.detach() if n in parts else some.lora_A.new_zeros(ranks[n], d_in)
                       for n in weights])
        b = torch.cat([weights[n] * parts[n].scaling * parts[n].lora_B.detach() if n in parts
                       else some.lora_B.new_zeros(d_out, ranks[n]) for n in weights], dim=1)
        outer = max(parts.values(), key=lambda m: _depth(model, m))  # wrap the outermost of them
        combined = LoRALinear(outer, a.shape[0], float(a.shape[0]))
        with torch.no_grad():
            combined.lora_A.copy_(a)
            combined.lora_B.copy_(b)
        combined.adapter_name = name
        combined.requires_grad_(False)
        replace_module(model, _path_of(model, outer), combined)
    modules = {target.rsplit(".", 1)[1] for target in layers}
    blocks = sorted({_block_of(target) for target in layers})
    first = next(c for c in model.peft_configs if c.adapter_name == next(iter(weights)) and c.scheme == "lora")
    rank = sum(ranks.values())
    config = LoraPEFTConfig(None, **{**first.to_dict(), "adapter_dim": rank, "alpha": float(rank),
                                     "target_modules": [m for m in TARGET_PARENTS if m in modules],
                                     "layer_selection": None if len(blocks) == model.config.n_layer else blocks,
                                     "column_init_method": "xavier", "row_init_method": "zero", "rslora": False})
    config.adapter_name = name
    model.peft_configs = [*model.peft_configs, config]
    set_adapter(model, name)
    return config


def _lora_layers_by_target(model: GPT, names: list[str]) -> dict[str, dict[str, LoRALinear]]:
    """For every layer adapted by the named LoRA adapters: {layer path: {adapter name: its LoRALinear}}."""
    by_target: dict[str, dict[str, LoRALinear]] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear) and adapter_name_of(module) in names:
            if module.use_dora or module.lora_A0 is not None:
                raise ValueError(f"combine_lora: adapter {adapter_name_of(module)!r} is DoRA or PiSSA/OLoRA at "
                                 f"{path}; only plain LoRA updates add up to a LoRA")
            target = ".".join(p for p in path.split(".") if p != "base")
            by_target.setdefault(target, {})[adapter_name_of(module)] = module
    if not by_target:
        raise ValueError(f"combine_lora: no LoRA layers of the adapters {names}")
    missing = _uncovered(model, by_target)
    if missing:
        raise ValueError(f"combine_lora: adapters {names} together adapt some modules in some blocks but not "
                         f"all of them in all of those blocks ({missing[0]} is adapted by none); a mix must "
                         "cover every chosen module of every chosen block")
    return by_target


def _block_of(target: str) -> int:
    """The block index of a layer path such as ``blocks.3.attention.attention_qkv``."""
    return int(target.split(".")[1])


def _uncovered(model: GPT, by_target: dict[str, dict]) -> list[str]:
    """Layer paths in (modules adapted anywhere) x (blocks adapted anywhere) that no adapter covers."""
    modules = {target.rsplit(".", 1)[1] for target in by_target}
    blocks = {_block_of(target) for target in by_target}
    every = [path for path, _ in model.named_modules()
             if path.startswith("blocks.") and path.rsplit(".", 1)[-1] in modules and "base" not in path.split(".")
             and path.count(".") >= 2 and _block_of(path) in blocks]
    return [path for path in every if path not in by_target]


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(path for path, m in model.named_modules() if m is module)


def _depth(model: nn.Module, module: nn.Module) -> int:
    """How far out a wrapper sits: the outermost has the shortest path."""
    return -len(_path_of(model, module))


__all__ = ["adapter_names", "active_adapters", "set_adapter", "combine_lora"]
