"""The four PEFT configurations, read from the ``model.peft`` section of an OmegaConf config.

The schema follows NeMo's ``megatron_gpt_finetuning_config.yaml``, so a NeMo user recognises it::

    model:
      peft:
        peft_scheme: lora            # lora | adapter | ia3 | ptuning | none, or a combination: "lora,ptuning"
        lora_tuning:   {target_modules: [attention_qkv], adapter_dim: 32, alpha: 32, adapter_dropout: 0.0,
                        column_init_method: xavier, row_init_method: zero, layer_selection: null, rslora: false}
        adapter_tuning: {adapter_dim: 32, adapter_dropout: 0.0, norm_position: pre, layer_selection: null,
                         column_init_method: xavier, row_init_method: zero}
        ia3_tuning:    {layer_selection: null}
        p_tuning:      {virtual_tokens: 10, bottleneck_dim: 1024, embedding_dim: 1024, init_std: 0.023}

As in NeMo, each config class is built from the *whole model config* and picks its own section:
``LoraPEFTConfig(cfg.model)``. A missing section means "all defaults"; a misspelt key is an error
(a silently ignored ``adpter_dim`` would train with the default and nobody would notice).

One deliberate difference: ``layer_selection`` holds 0-based indices into ``model.blocks``
(NeMo counts layers from 1). ``null`` means every layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

INIT_METHODS = ("xavier", "normal", "kaiming", "zero")
LORA_TARGETS = ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2")
# Where each target linear layer lives inside ``model.blocks[i]``: blocks[i].<parent>.<target>.
TARGET_PARENTS = {"attention_qkv": "attention", "attention_dense": "attention", "mlp_fc1": "mlp", "mlp_fc2": "mlp"}
TARGET_SHORTCUTS = {"attention": ("attention_qkv", "attention_dense"), "mlp": ("mlp_fc1", "mlp_fc2"),
                    "all": LORA_TARGETS}


def _to_plain(cfg: Any) -> Any:
    """An OmegaConf DictConfig/ListConfig (or anything else) as plain Python containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # omegaconf is a dependency, but plain dicts work without it
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _peft_section(model_cfg: Any) -> dict:
    """``model_cfg.peft`` as a plain dict ({} when absent)."""
    model_cfg = _to_plain(model_cfg)
    if model_cfg is None:
        return {}
    if not isinstance(model_cfg, Mapping):
        raise TypeError(f"expected the model config as a dict or DictConfig, got {type(model_cfg).__name__}")
    peft = model_cfg.get("peft") or {}
    if not isinstance(peft, Mapping):
        raise ValueError(f"model.peft must be a mapping, got {type(peft).__name__}")
    return dict(peft)


@dataclass(init=False)
class PEFTConfig:
    """Common machinery: read one ``model.peft.<section>``, reject unknown keys, validate values."""

    scheme: ClassVar[str] = ""
    section: ClassVar[str] = ""

    def __init__(self, model_cfg: Any = None, **overrides: Any) -> None:
        """Build from the whole model config (``cfg.model``); ``overrides`` win over the file."""
        values = _to_plain(_peft_section(model_cfg).get(self.section)) or {}
        if not isinstance(values, Mapping):
            raise ValueError(f"model.peft.{self.section} must be a mapping, got {type(values).__name__}")
        values = {**values, **overrides}
        known = {f.name: f for f in dataclasses.fields(self)}
        for key in values:
            if key not in known:
                raise ValueError(f"unknown key model.peft.{self.section}.{key}; "
                                 f"known keys: {', '.join(known)}")
        for name, f in known.items():
            if name in values:
                value = _to_plain(values[name])
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, name, value)
        self.validate()

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> "PEFTConfig":
        """The inverse of ``to_dict``: build from the knobs of this method's section alone."""
        return cls({"peft": {cls.section: dict(section)}})

    def to_dict(self) -> dict:
        """The knobs as a plain dict (what ``model.peft.<section>`` would hold)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check value ranges; subclasses extend this."""

    # Small helpers for the subclasses' validate().
    def _fail(self, key: str, message: str) -> None:
        raise ValueError(f"model.peft.{self.section}.{key}={getattr(self, key)!r}: {message}")

    def _positive_int(self, key: str) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self._fail(key, "expected a positive integer")

    def _probability(self, key: str) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            self._fail(key, "expected a dropout probability in [0, 1)")

    def _choice(self, key: str, allowed: tuple[str, ...]) -> None:
        if getattr(self, key) not in allowed:
            self._fail(key, f"expected one of {', '.join(allowed)}")

    def _layers(self) -> None:
        value = self.layer_selection
        if value is None:
            return
        if isinstance(value, int) and not isinstance(value, bool):
            value = self.layer_selection = [value]
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
            self._fail("layer_selection", "expected null (all layers) or a non-empty list of layer indices")
        if len(set(value)) != len(value):
            self._fail("layer_selection", "contains duplicates")
        self.layer_selection = sorted(value)


@dataclass(init=False)
class LoraPEFTConfig(PEFTConfig):
    """LoRA: a trainable low-rank update ``(alpha/r) B A`` added to frozen linear layers."""

    scheme: ClassVar[str] = "lora"
    section: ClassVar[str] = "lora_tuning"

    target_modules: list[str] = field(default_factory=lambda: ["attention_qkv"])
    adapter_dim: int = 32  # the rank r
    alpha: float = 32  # scale alpha / r (or alpha / sqrt(r) with rslora)
    adapter_dropout: float = 0.0  # dropout on the input of A
    column_init_method: str = "xavier"  # init of A (r, in): the "column-parallel" in-projection
    row_init_method: str = "zero"  # init of B (out, r): zero, so training starts at the base model
    layer_selection: list[int] | None = None
    rslora: bool = False

    def validate(self) -> None:
        self._positive_int("adapter_dim")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            self._fail("alpha", "expected a positive number")
        self._probability("adapter_dropout")
        self._choice("column_init_method", INIT_METHODS)
        self._choice("row_init_method", INIT_METHODS)
        if self.column_init_method == "zero" and self.row_init_method == "zero":
            self._fail("row_init_method", "A and B both zero: every gradient of A and B would be zero "
                                          "and LoRA would never learn")
        if not isinstance(self.rslora, bool):
            self._fail("rslora", "expected true or false")
        self.target_modules = self._expand_targets(self.target_modules)
        self._layers()

    def _expand_targets(self, targets: Any) -> list[str]:
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, (list, tuple)) or not targets:
            self._fail("target_modules", "expected a non-empty list")
        expanded: list[str] = []
        for name in targets:
            names = TARGET_SHORTCUTS.get(name, (name,))
            for n in names:
                if n not in LORA_TARGETS:
                    self._fail("target_modules", f"unknown target {name!r}; expected some of "
                                                 f"{', '.join(LORA_TARGETS + tuple(TARGET_SHORTCUTS))}")
                if n not in expanded:
                    expanded.append(n)
        return [n for n in LORA_TARGETS if n in expanded]  # a canonical order


@dataclass(init=False)
class AdapterPEFTConfig(PEFTConfig):
    """Bottleneck adapters (Houlsby): a small residual MLP after the attention block and after the MLP."""

    scheme: ClassVar[str] = "adapter"
    section: ClassVar[str] = "adapter_tuning"

    adapter_dim: int = 32  # bottleneck width
    adapter_dropout: float = 0.0  # dropout on the adapter's output
    norm_position: str = "pre"  # LayerNorm before the down-projection ("pre") or after the up-projection
    layer_selection: list[int] | None = None
    column_init_method: str = "xavier"  # init of the down-projection
    row_init_method: str = "zero"  # init of the up-projection: zero, so training starts at the base model

    def validate(self) -> None:
        self._positive_int("adapter_dim")
        self._probability("adapter_dropout")
        self._choice("norm_position", ("pre", "post"))
        self._choice("column_init_method", INIT_METHODS)
        self._choice("row_init_method", INIT_METHODS)
        self._layers()


@dataclass(init=False)
class IA3PEFTConfig(PEFTConfig):
    """IA3: learned vectors that rescale keys, values and the FFN hidden activation (initialised to 1)."""

    scheme: ClassVar[str] = "ia3"
    section: ClassVar[str] = "ia3_tuning"

    layer_selection: list[int] | None = None

    def validate(self) -> None:
        self._layers()


@dataclass(init=False)
class PtuningPEFTConfig(PEFTConfig):
    """P-tuning: an MLP prompt encoder produces ``virtual_tokens`` embeddings put before every input."""

    scheme: ClassVar[str] = "ptuning"
    section: ClassVar[str] = "p_tuning"

    virtual_tokens: int = 10
    bottleneck_dim: int = 1024  # hidden width of the prompt encoder's MLP
    embedding_dim: int = 1024  # width of the virtual-token table fed to the MLP
    init_std: float = 0.023  # std of the MLP's weights

    def validate(self) -> None:
        for key in ("virtual_tokens", "bottleneck_dim", "embedding_dim"):
            self._positive_int(key)
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            self._fail("init_std", "expected a positive number")


def select_layers(n_layer: int, layer_selection: list[int] | None, section: str) -> list[int]:
    """The layer indices a method applies to: all of them, or ``layer_selection`` checked against the model."""
    if layer_selection is None:
        return list(range(n_layer))
    bad = [i for i in layer_selection if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"model.peft.{section}.layer_selection={layer_selection}: indices {bad} are out of "
                         f"range; this model has layers 0..{n_layer - 1} (indices count from 0)")
    return list(layer_selection)


CONFIG_CLASSES: dict[str, type[PEFTConfig]] = {
    cls.scheme: cls for cls in (LoraPEFTConfig, AdapterPEFTConfig, IA3PEFTConfig, PtuningPEFTConfig)}
_ALIASES = {"p_tuning": "ptuning", "p-tuning": "ptuning", "adapters": "adapter"}


def peft_configs_from_scheme(model_cfg: Any) -> list[PEFTConfig]:
    """The configs named by ``model_cfg.peft.peft_scheme``: ``"lora"``, ``"lora,ptuning"``, ``"none"``...

    Returns an empty list for ``none``/``null``/``""`` (full fine-tuning is not offered, but a caller
    may evaluate the plain base model).
    """
    scheme = _peft_section(model_cfg).get("peft_scheme")
    if scheme is None:
        return []
    if not isinstance(scheme, str):
        raise ValueError(f"model.peft.peft_scheme={scheme!r}: expected a string such as 'lora' or 'lora,ptuning'")
    configs: list[PEFTConfig] = []
    seen: set[str] = set()
    for part in scheme.split(","):
        name = _ALIASES.get(part.strip().lower(), part.strip().lower())
        if name in ("", "none"):
            continue
        if name not in CONFIG_CLASSES:
            raise ValueError(f"model.peft.peft_scheme={scheme!r}: unknown method {part.strip()!r}; "
                             f"expected {', '.join(CONFIG_CLASSES)} or a comma-separated combination")
        if name in seen:
            raise ValueError(f"model.peft.peft_scheme={scheme!r}: {name} is listed twice")
        seen.add(name)
        configs.append(CONFIG_CLASSES[name](model_cfg))
    return configs


__all__ = ["PEFTConfig", "LoraPEFTConfig", "AdapterPEFTConfig", "IA3PEFTConfig", "PtuningPEFTConfig",
           "CONFIG_CLASSES", "INIT_METHODS", "LORA_TARGETS", "TARGET_PARENTS", "peft_configs_from_scheme", "select_layers"]
