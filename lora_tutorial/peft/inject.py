"""Putting PEFT modules into a model, switching them off, and taking them out again.

Every method works by *composition*. LoRA, adapters and IA3 replace a block's ``nn.Linear``
(``attention_qkv``, ``attention_dense``, ``mlp_fc1``, ``mlp_fc2``) by a wrapper module that keeps the
original layer as ``.base`` and adds its own small trainable tensors; p-tuning fills the model's
``virtual_prompt`` hook. Every wrapper has a ``peft_scheme`` class attribute and an
``adapter_enabled`` switch. The model records which configs were applied in ``model.peft_configs``.

The surgery itself is ``wrapping.replace_module`` and ``wrapping.unwrap``; ``adapter_parameters`` says
which tensors are "the adapter" (the wrappers' own, never the frozen layer inside).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from torch import nn

from ..model import GPT
from .adapter import apply_adapters
from .config import PEFTConfig, select_layers
from .ia3 import apply_ia3
from .lora import LoRALinear, apply_lora
from .ptuning import apply_ptuning
from .wrapping import is_peft_module, replace_module, unwrap

_APPLY: dict[str, Callable[[GPT, PEFTConfig], list[str]]] = {
    "lora": apply_lora, "ia3": apply_ia3, "adapter": apply_adapters, "ptuning": apply_ptuning}
# LoRA must wrap the plain nn.Linear (it merges into base.weight), so it goes first; the others compose
# with whatever they find.
_ORDER = ("lora", "ia3", "adapter", "ptuning")


def peft_modules(model: nn.Module) -> list[nn.Module]:
    """Every PEFT module inside ``model`` (wrappers and the virtual prompt)."""
    return [m for m in model.modules() if is_peft_module(m)]


def adapter_name_of(module: nn.Module) -> str:
    return getattr(module, "adapter_name", "default")


def adapter_modules(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """The PEFT modules of the adapter ``name``, keyed as if it were the model's only adapter: where it
    wraps another adapter's wrapper (or is wrapped by one), the ``.base`` hops through the *other*
    adapter's wrappers are left out of the key, so that an adapter file reads the same whatever else
    shares the model."""
    return {_key_path(model, path, name): m for path, m in model.named_modules()
            if is_peft_module(m) and adapter_name_of(m) == name}


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """The PEFT modules' own parameters by state-dict name (never the wrapped base layers' weights): every
    adapter's, or with ``name`` only that adapter's, keyed as in ``adapter_modules``."""
    modules = ({path: m for path, m in model.named_modules() if is_peft_module(m)} if name is None
               else adapter_modules(model, name))
    return {f"{path}.{param_name}": p for path, module in modules.items()
            for param_name, p in module.named_parameters() if not param_name.startswith("base.")}


def _key_path(model: nn.Module, module_name: str, name: str) -> str:
    """``module_name`` without the ``.base`` steps that go through other adapters' wrappers."""
    node, kept = model, []
    for part in module_name.split("."):
        if not (part == "base" and is_peft_module(node) and adapter_name_of(node) != name):
            kept.append(part)
        node = getattr(node, part)
    return ".".join(kept)


@dataclass
class ParameterSummary:
    """Parameter counts before and after ``add_adapter`` (tied weights counted once).

    Both percentages use the same denominator, the *base* model's parameters (``base``), so that a
    method's share does not shrink just because adding it made the model bigger.
    """

    base: int
    trainable: int
    added: int
    methods: list[str] = field(default_factory=list)

    @property
    def percent_of_base(self) -> float:
        """Trainable parameters as a percentage of the base model's parameters."""
        return 100.0 * self.trainable / self.base

    def __str__(self) -> str:
        rows = [("", "parameters", "trainable", "% of base"),
                ("base model", f"{self.base:,}", "0 (frozen)", ""),
                (f"added by {'+'.join(self.methods) or 'nothing'}", f"{self.added:,}", f"{self.trainable:,}",
                 f"{self.percent_of_base:.2f} %")]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         .rstrip() for r in rows)


def parameter_summary(model: GPT) -> ParameterSummary:
    """How many parameters the PEFT modules add and train, against the base model's count."""
    adapters = adapter_parameters(model)
    added = sum(p.numel() for p in adapters.values())
    trainable = sum(p.numel() for p in adapters.values() if p.requires_grad)
    methods = [c.scheme if c.adapter_name == "default" else f"{c.scheme} ({c.adapter_name})"
               for c in model.peft_configs]
    return ParameterSummary(model.num_parameters() - added, trainable, added, methods)


def add_adapter(model: GPT, cfg_or_list: PEFTConfig | Sequence[PEFTConfig], verbose: bool = True,
                name: str = "default") -> ParameterSummary:
    """Freeze every base parameter, insert the PEFT modules of one or more configs, report the counts.

    A list combines methods (e.g. ``[LoraPEFTConfig(c), PtuningPEFTConfig(c)]``); they are applied in
    the order lora, ia3, adapter, ptuning whatever the list order. The applied configs are appended to
    ``model.peft_configs`` (``save_adapters`` stores them). ``name`` adds a *named* adapter next to the
    ones already there (``peft/multi.py``): only the new adapter's tensors are left trainable.
    """
    configs = [copy.copy(c) for c in ([cfg_or_list] if isinstance(cfg_or_list, PEFTConfig) else cfg_or_list)]
    for cfg in configs:
        if not isinstance(cfg, PEFTConfig):
            raise TypeError(f"add_adapter expects PEFT config objects (e.g. LoraPEFTConfig(cfg.model)), "
                            f"got {type(cfg).__name__}")
        cfg.adapter_name = name
    configs.sort(key=lambda c: _ORDER.index(c.scheme))
    existing = [(c.scheme, c.adapter_name) for c in model.peft_configs]
    schemes = [c.scheme for c in configs]
    repeated = {s for s in schemes if schemes.count(s) > 1 or (s, name) in existing}
    if repeated:
        raise ValueError(f"add_adapter: {', '.join(sorted(repeated))} would be added twice to adapter {name!r} "
                         f"(the model already has: {', '.join(s for s, _ in existing) or 'nothing'})")
    if "ptuning" in schemes and any(s == "ptuning" for s, _ in existing):
        raise ValueError("add_adapter: the model has one virtual-prompt slot, already taken by p-tuning")
    for cfg in configs:  # every layer selection checked before any surgery
        if getattr(cfg, "layer_selection", None) is not None:
            select_layers(len(model.blocks), cfg.layer_selection, cfg.section)
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    keep = set() if any(n != name for _, n in existing) else {id(p) for p in adapter_parameters(model).values()}
    for p in model.parameters():  # freeze the base (and other adapters); new PEFT modules are created trainable
        if id(p) not in keep:
            p.requires_grad_(False)
    before = {id(m) for m in peft_modules(model)}
    try:
        for cfg in configs:
            _APPLY[cfg.scheme](model, cfg)
    except Exception:  # all or nothing: take out what this call put in, unfreeze what it froze
        _remove_new_modules(model, before)
        for p in model.parameters():
            p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
        raise
    for module in peft_modules(model):
        if id(module) not in before:
            module.adapter_name = name
    model.peft_configs = [*model.peft_configs, *configs]
    summary = parameter_summary(model)
    if verbose:
        print(summary)
    return summary


def _remove_new_modules(model: GPT, before: set[int]) -> None:
    """Undo a half-done ``add_adapter``: every PEFT module not in ``before`` (ids) goes, innermost last."""
    while True:
        new = [n for n, m in model.named_modules() if is_peft_module(m) and id(m) not in before and hasattr(m, "base")]
        if not new:
            break
        target = min(new, key=len)
        replace_module(model, target, model.get_submodule(target).base)
    if model.virtual_prompt is not None and id(model.virtual_prompt) not in before:
        model.virtual_prompt = None


def remove_adapters(model: GPT, name: str | None = None) -> GPT:
    """Take PEFT modules out again: every adapter's, or only those of the adapter ``name``. Each wrapped
    layer goes back in its place (and the virtual prompt goes, with its adapter); ``model.peft_configs``
    forgets them. (LoRA merged into a weight stays merged; unmerge first.)
    """
    while True:  # outermost first; names are looked up again after every replacement
        names = [n for n, m in model.named_modules() if is_peft_module(m) and hasattr(m, "base")
                 and (name is None or adapter_name_of(m) == name)]
        if not names:
            break
        target = min(names, key=len)
        wrapper = model.get_submodule(target)
        replace_module(model, target, unwrap(wrapper) if name is None else wrapper.base)
    if model.virtual_prompt is not None and (name is None or adapter_name_of(model.virtual_prompt) == name):
        model.virtual_prompt = None
    model.peft_configs = [c for c in model.peft_configs if name is not None and c.adapter_name != name]
    return model


@contextmanager
def disable_adapters(model: GPT) -> Iterator[GPT]:
    """Run the base model inside the block: every LoRA/adapter/IA3 wrapper and the virtual prompt are off.

    ::

        with disable_adapters(model):
            base_logits = model(ids)
        tuned_logits = model(ids)

    Merged LoRA layers are unmerged for the duration and merged again afterwards (exact up to rounding).
    """
    wrappers = [m for m in peft_modules(model) if hasattr(m, "adapter_enabled")]
    states = [m.adapter_enabled for m in wrappers]
    merged = [m for m in wrappers if isinstance(m, LoRALinear) and m.merged]
    prompt = model.virtual_prompt
    try:
        for m in merged:
            m.unmerge()
        for m in wrappers:
            m.adapter_enabled = False
        model.virtual_prompt = None
        yield model
    finally:
        model.virtual_prompt = prompt
        for m, state in zip(wrappers, states):
            m.adapter_enabled = state
        for m in merged:
            m.merge()


__all__ = ["add_adapter", "remove_adapters", "disable_adapters", "adapter_parameters", "parameter_summary",
           "ParameterSummary", "peft_modules", "adapter_name_of", "adapter_modules"]
