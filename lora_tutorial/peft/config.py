"""The PEFT method configs, built as in NeMo from the *whole model config*: ``LoraPEFTConfig(cfg.model)``.

Each class reads its own section of ``model.peft`` (``lora_tuning``, ``adapter_tuning``, ``ia3_tuning``,
``p_tuning``). The section's keys, types, defaults and ranges are the dataclasses of
``lora_tutorial.config`` (the one schema); a config object holds the validated values as attributes::

    cfg = load_config("conf/peft_tuning.yaml")
    lora = LoraPEFTConfig(cfg.model)                  # model.peft.lora_tuning, checked
    lora = LoraPEFTConfig(cfg.model, adapter_dim=8)   # keyword overrides win over the file
    lora.target_modules                               # shortcuts expanded: ["attention_qkv", ...]

A missing section means "all defaults"; a misspelt or out-of-range key is a ``ConfigError`` naming it.
One deliberate difference from NeMo: ``layer_selection`` holds 0-based indices into ``model.blocks``
(NeMo counts layers from 1); ``null`` means every layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from ..config import (LORA_TARGETS, SCHEME_EXPECTED, TARGET_SHORTCUTS, AdapterTuning, ConfigError, IA3Tuning,
                      LoraTuning, PTuning, merge_checked, scheme_parts, valid_scheme, validate)

# Where each target linear layer lives inside ``model.blocks[i]``: blocks[i].<parent>.<target>.
TARGET_PARENTS = {"attention_qkv": "attention", "attention_dense": "attention", "mlp_fc1": "mlp", "mlp_fc2": "mlp"}


def _section(model_cfg: Any, name: str) -> Any:
    """``model_cfg.peft.<name>`` (an empty dict when any level is missing)."""
    if model_cfg is None:
        return {}
    if not isinstance(model_cfg, (dict, DictConfig)):
        raise TypeError(f"expected the model config (cfg.model) as a dict or DictConfig, got "
                        f"{type(model_cfg).__name__}")
    peft = model_cfg.get("peft") or {}
    return peft.get(name) or {}


class PEFTConfig:
    """The validated knobs of one method; subclasses name their section and schema."""

    scheme: ClassVar[str] = ""
    section: ClassVar[str] = ""
    schema: ClassVar[type] = object

    def __init__(self, model_cfg: Any = None, **overrides: Any) -> None:
        where = f"model.peft.{self.section}"
        node = merge_checked(OmegaConf.structured(self.schema), _section(model_cfg, self.section), where, where)
        node = merge_checked(node, overrides, "keyword arguments", where)
        values = OmegaConf.to_container(validate(node, where), resolve=True)
        for name in self.field_names():
            setattr(self, name, values[name])
        self.adapter_name = "default"  # which named adapter of a model it belongs to (add_adapter sets it)
        self._normalize()

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.schema)]

    @classmethod
    def from_dict(cls, section: dict) -> "PEFTConfig":
        """The inverse of ``to_dict``: build from the knobs of this method's section alone."""
        return cls({"peft": {cls.section: dict(section)}})

    def to_dict(self) -> dict:
        """The knobs as a plain dict (what ``model.peft.<section>`` would hold)."""
        return {name: getattr(self, name) for name in self.field_names()}

    def _normalize(self) -> None:
        """Bring equivalent spellings to one form (subclasses)."""
        if getattr(self, "layer_selection", None) is not None:
            self.layer_selection = sorted(self.layer_selection)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


class LoraPEFTConfig(PEFTConfig):
    """LoRA: a trainable low-rank update ``(alpha/r) B A`` added to frozen linear layers."""

    scheme, section, schema = "lora", "lora_tuning", LoraTuning

    def _normalize(self) -> None:
        super()._normalize()
        if self.init_lora_weights == "default" and self.column_init_method == "zero" and self.row_init_method == "zero":
            raise ConfigError("model.peft.lora_tuning.row_init_method='zero': A and B both zero would make "
                              "every gradient of A and B zero, and LoRA would never learn")
        expanded = {t for name in self.target_modules for t in TARGET_SHORTCUTS.get(name, (name,))}
        self.target_modules = [t for t in LORA_TARGETS if t in expanded]  # one canonical order


class AdapterPEFTConfig(PEFTConfig):
    """Bottleneck adapters (Houlsby): a small residual MLP after the attention block and after the MLP."""

    scheme, section, schema = "adapter", "adapter_tuning", AdapterTuning


class IA3PEFTConfig(PEFTConfig):
    """IA3: learned vectors that rescale keys, values and the FFN hidden activation (initialised to 1)."""

    scheme, section, schema = "ia3", "ia3_tuning", IA3Tuning


class PtuningPEFTConfig(PEFTConfig):
    """P-tuning: an MLP prompt encoder produces ``virtual_tokens`` embeddings put before every input."""

    scheme, section, schema = "ptuning", "p_tuning", PTuning


def select_layers(n_layer: int, layer_selection: list[int] | None, section: str) -> list[int]:
    """The layer indices a method applies to: all of them, or ``layer_selection`` checked against the model."""
    if layer_selection is None:
        return list(range(n_layer))
    bad = [i for i in layer_selection if not 0 <= i < n_layer]
    if bad:
        raise ConfigError(f"model.peft.{section}.layer_selection={layer_selection}: indices {bad} are out of "
                          f"range; this model has layers 0..{n_layer - 1} (indices count from 0)")
    return list(layer_selection)


CONFIG_CLASSES: dict[str, type[PEFTConfig]] = {
    cls.scheme: cls for cls in (LoraPEFTConfig, AdapterPEFTConfig, IA3PEFTConfig, PtuningPEFTConfig)}


def peft_configs_from_scheme(model_cfg: Any) -> list[PEFTConfig]:
    """The configs named by ``model_cfg.peft.peft_scheme``: ``"lora"``, ``"lora,ptuning"``, ``"none"``...

    Returns an empty list for ``none``/``null`` (the plain base model, e.g. for a zero-shot run).
    """
    scheme = (model_cfg.get("peft") or {}).get("peft_scheme") if model_cfg is not None else None
    if scheme is None:
        return []
    if not valid_scheme(scheme):  # configs from load_config are checked already; hand-made ones are not
        raise ConfigError(f"model.peft.peft_scheme={scheme!r}: expected {SCHEME_EXPECTED}")
    return [CONFIG_CLASSES[name](model_cfg) for name in scheme_parts(scheme)]


__all__ = ["PEFTConfig", "LoraPEFTConfig", "AdapterPEFTConfig", "IA3PEFTConfig", "PtuningPEFTConfig",
           "CONFIG_CLASSES", "TARGET_PARENTS", "peft_configs_from_scheme", "select_layers"]
