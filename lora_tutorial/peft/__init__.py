"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters, IA3 and p-tuning on ``lora_tutorial.GPT``.

Usage, as in NeMo::

    from lora_tutorial.peft import LoraPEFTConfig, add_adapter
    add_adapter(model, LoraPEFTConfig(cfg.model))      # freezes the base, inserts LoRA, prints a summary
    ...train...
    save_adapters(model, "runs/lora/adapter.safetensors")

Every method works by *composition*: the model code never changes. LoRA, adapters and IA3 replace a
block's ``nn.Linear`` (``attention_qkv``, ``attention_dense``, ``mlp_fc1``, ``mlp_fc2``) by a wrapper
module that keeps the original layer as ``.base`` and adds its own small trainable tensors; p-tuning
installs a prompt encoder in the model's ``virtual_prompt`` hook. Every wrapper has a ``peft_scheme``
class attribute and an ``adapter_enabled`` switch, which is all ``disable_adapters`` needs.

==========  ==============================  =====================================  ================
method      where                           what is learned                        SmolLM2 default
==========  ==============================  =====================================  ================
lora        attention_qkv (configurable)    low-rank update B A of the weight      1,474,560
adapter     after attention & MLP outputs   bottleneck MLP added to the output     2,280,960
ia3         keys, values, FFN activation    element-wise scaling vectors           57,600
ptuning     before the input                10 virtual token embeddings (via MLP)  1,650,240
==========  ==============================  =====================================  ================
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from torch import nn

from ..model import GPT
from .adapter import AdapterLinear, BottleneckAdapter, apply_adapters
from .checkpoint import (AdapterCheckpointError, adapter_parameters, adapter_state_dict, base_fingerprint, export_hf_peft,
                         load_adapters, save_adapters)
from .config import (CONFIG_CLASSES, AdapterPEFTConfig, IA3PEFTConfig, LoraPEFTConfig, PEFTConfig,
                     PtuningPEFTConfig, peft_configs_from_scheme)
from .ia3 import IA3FFN, IA3QKV, apply_ia3
from .lora import LoRALinear, apply_lora, merge_and_unload, merge_lora, unmerge_lora
from .ptuning import FrozenPrompt, PromptEncoder, apply_ptuning, freeze_prompt_encoder

_APPLY = {"lora": apply_lora, "ia3": apply_ia3, "adapter": apply_adapters, "ptuning": apply_ptuning}
# LoRA must wrap the plain nn.Linear (it merges into base.weight), so it goes first; the others compose
# with whatever they find.
_ORDER = ("lora", "ia3", "adapter", "ptuning")


@dataclass
class ParameterSummary:
    """Parameter counts before and after ``add_adapter`` (tied weights counted once)."""

    total_before: int
    trainable_before: int
    total_after: int
    trainable_after: int
    methods: list[str] = field(default_factory=list)

    @property
    def percent_trainable(self) -> float:
        return 100.0 * self.trainable_after / self.total_after

    def __str__(self) -> str:
        rows = [("", "total", "trainable", "% trainable"),
                ("before", f"{self.total_before:,}", f"{self.trainable_before:,}",
                 f"{100.0 * self.trainable_before / max(self.total_before, 1):.3f} %"),
                (f"after {'+'.join(self.methods) or 'none'}", f"{self.total_after:,}", f"{self.trainable_after:,}",
                 f"{self.percent_trainable:.3f} %")]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                 for r in rows]
        return "\n".join(lines)


def _as_list(cfg_or_list: PEFTConfig | Sequence[PEFTConfig]) -> list[PEFTConfig]:
    configs = [cfg_or_list] if isinstance(cfg_or_list, PEFTConfig) else list(cfg_or_list)
    for cfg in configs:
        if not isinstance(cfg, PEFTConfig):
            raise TypeError(f"add_adapter expects PEFT config objects (e.g. LoraPEFTConfig(cfg.model)), "
                            f"got {type(cfg).__name__}")
    return configs


def add_adapter(model: GPT, cfg_or_list: PEFTConfig | Sequence[PEFTConfig], verbose: bool = True) -> ParameterSummary:
    """Freeze every base parameter, insert the PEFT modules of one or more configs, report the counts.

    A list combines methods (e.g. ``[LoraPEFTConfig(c), PtuningPEFTConfig(c)]``); they are applied in
    the order lora, ia3, adapter, ptuning whatever the list order. The applied configs are recorded in
    ``model.peft_configs`` (``save_adapters`` stores them).
    """
    configs = sorted(_as_list(cfg_or_list), key=lambda c: _ORDER.index(c.scheme))
    existing = [c.scheme for c in getattr(model, "peft_configs", [])]
    schemes = [c.scheme for c in configs]
    repeated = {s for s in schemes if schemes.count(s) > 1 or s in existing}
    if repeated:
        raise ValueError(f"add_adapter: {', '.join(sorted(repeated))} would be added twice "
                         f"(the model already has: {', '.join(existing) or 'nothing'})")
    before = (model.num_parameters(), model.num_parameters(trainable_only=True))
    adapters = {id(p) for p in adapter_parameters(model).values()}  # from an earlier add_adapter call
    for name, p in model.named_parameters():  # freeze the base; new PEFT modules are created trainable
        if id(p) not in adapters:
            p.requires_grad_(False)
    for cfg in configs:
        _APPLY[cfg.scheme](model, cfg)
    model.peft_configs = [*getattr(model, "peft_configs", []), *configs]
    summary = ParameterSummary(*before, model.num_parameters(), model.num_parameters(trainable_only=True),
                               [c.scheme for c in model.peft_configs])
    if verbose:
        print(summary)
    return summary


def peft_modules(model: nn.Module) -> list[nn.Module]:
    """Every PEFT module inside ``model`` (wrappers and the virtual prompt)."""
    return [m for m in model.modules() if getattr(m, "peft_scheme", None)]


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


__all__ = [
    # configs
    "PEFTConfig", "LoraPEFTConfig", "AdapterPEFTConfig", "IA3PEFTConfig", "PtuningPEFTConfig", "CONFIG_CLASSES",
    "peft_configs_from_scheme",
    # inserting and switching
    "add_adapter", "ParameterSummary", "disable_adapters", "peft_modules",
    # the modules
    "LoRALinear", "BottleneckAdapter", "AdapterLinear", "IA3QKV", "IA3FFN", "PromptEncoder", "FrozenPrompt",
    "freeze_prompt_encoder",
    # merging
    "merge_lora", "unmerge_lora", "merge_and_unload",
    # checkpoints
    "save_adapters", "load_adapters", "export_hf_peft", "AdapterCheckpointError", "adapter_parameters", "adapter_state_dict",
    "base_fingerprint",
]
