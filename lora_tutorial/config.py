"""The configuration schema: every key a YAML in ``conf/`` may set, its type, its default and its range.

The layout follows NeMo's ``megatron_gpt_finetuning_config.yaml`` so the tutorial's steps map one to one:
``trainer`` (what PyTorch Lightning needs), ``exp_manager`` (where logs and checkpoints go), ``model``
(base model, batch sizes, data, PEFT method, optimizer) and ``inference`` (decoding knobs).

The schema is a tree of dataclasses that OmegaConf turns into a *structured config*. That one tree is
the single source of truth:

* the defaults are the dataclass defaults (``conf/peft_tuning.yaml`` spells out the same values, with
  comments, and a test checks that they agree);
* OmegaConf checks types when a YAML file or a ``key=value`` override is merged (``lr=abc`` fails);
* a key that is not in the tree is an error, not a silently ignored typo;
* ranges and choices (``max_steps >= 1``, ``precision`` in a list...) live next to each field as a
  ``Rule`` and are checked by ``validate``.

``load_config`` does all of that and raises one ``ConfigError`` whose message names the key, the value
and what was expected -- before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the key, the value and what was expected."""


@dataclass(frozen=True)
class Rule:
    """What a field's value must satisfy (checked by ``validate``; ``None`` always passes an Optional)."""

    expected: str
    ok: Callable[[Any], bool]


def knob(default: Any = dataclasses.MISSING, rule: Rule | None = None, factory: Callable[[], Any] | None = None):
    """A dataclass field with an optional ``Rule``."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def one_of(*choices: Any) -> Rule:
    return Rule(f"one of {', '.join(map(str, choices))}", lambda v: v in choices)


POSITIVE_INT = Rule("an integer >= 1", lambda v: v >= 1)
NON_NEGATIVE = Rule("a number >= 0", lambda v: v >= 0)
POSITIVE = Rule("a number > 0", lambda v: v > 0)
PROBABILITY = Rule("a probability in [0, 1)", lambda v: 0 <= v < 1)
INIT_METHODS = ("xavier", "normal", "kaiming", "zero")

# ----------------------------------------------------------------------------------------------
# trainer, exp_manager
# ----------------------------------------------------------------------------------------------

# (Lightning's bf16-true would cast the adapters to bf16 too, and AdamW's small updates would round away.)
PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed")


@dataclass
class TrainerConfig:
    accelerator: str = knob("auto", one_of("auto", "cpu", "gpu", "cuda"))
    devices: Any = 1  # processes per node: an int, a list of GPU ids, or "auto"
    num_nodes: int = knob(1, POSITIVE_INT)
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp ...
    precision: str = knob("auto", one_of(*PRECISIONS))  # auto: bf16-mixed where bf16 is native, else 32
    max_steps: int = knob(64, Rule("an integer >= 1 (or -1 with max_epochs)", lambda v: v >= 1 or v == -1))
    max_epochs: Optional[int] = knob(None, POSITIVE_INT)
    val_check_interval: Optional[int] = knob(32, NON_NEGATIVE)  # optimizer steps; 0 or null: no validation
    limit_val_batches: Optional[int] = knob(None, NON_NEGATIVE)
    num_sanity_val_steps: int = knob(0, NON_NEGATIVE)
    gradient_clip_val: Optional[float] = knob(1.0, NON_NEGATIVE)
    log_every_n_steps: int = knob(1, POSITIVE_INT)
    enable_progress_bar: bool = True
    enable_model_summary: bool = False


@dataclass
class CheckpointCallbackParams:
    monitor: str = "val_loss"
    mode: str = knob("min", one_of("min", "max"))
    save_top_k: int = knob(1, Rule("an integer >= -1", lambda v: v >= -1))
    save_last: bool = True
    every_n_train_steps: Optional[int] = knob(None, POSITIVE_INT)


@dataclass
class ExpManagerConfig:
    exp_dir: str = "experiments"
    name: str = "${name}"
    explicit_log_dir: Optional[str] = None
    resume_if_exists: bool = False
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointCallbackParams = field(default_factory=CheckpointCallbackParams)
    adapter_file: str = "${name}.safetensors"


# ----------------------------------------------------------------------------------------------
# model.data
# ----------------------------------------------------------------------------------------------

@dataclass
class DatasetConfig:
    file_names: List[str] = field(default_factory=list)
    concat_sampling_probabilities: Optional[List[float]] = None
    num_samples: Optional[int] = knob(None, POSITIVE_INT)
    prompt_template: str = "{input} {output}"
    max_seq_length: int = knob(1024, POSITIVE_INT)
    truncation_field: Optional[str] = "input"
    add_bos: bool = False
    add_eos: bool = True
    answer_only_loss: bool = True
    num_workers: int = knob(0, NON_NEGATIVE)
    shuffle: bool = False
    length_grouping: bool = True  # training: micro-batches of similar length (less padding; sampler.py)
    # put each prompt into the base model's chat template (squad.chat_format); use it with
    # prompt_template '{input}{output}', since the template's reply header already ends the prompt
    chat_template: bool = False
    micro_batch_size: Optional[int] = knob(None, POSITIVE_INT)
    tokens_to_generate: int = knob(30, POSITIVE_INT)
    metric: Optional[str] = knob(None, one_of("squad"))
    limit: Optional[int] = knob(None, POSITIVE_INT)


def _dataset(files: str, **kwargs: Any) -> Callable[[], DatasetConfig]:
    return lambda: DatasetConfig(file_names=[files], **kwargs)


@dataclass
class DataConfig:
    train_ds: DatasetConfig = field(default_factory=_dataset("data/SQuAD/splits/train.jsonl", shuffle=True))
    validation_ds: DatasetConfig = field(default_factory=_dataset(
        "data/SQuAD/splits/validation.jsonl", micro_batch_size=16, metric="squad", limit=100))
    test_ds: DatasetConfig = field(default_factory=_dataset(
        "data/SQuAD/splits/test.jsonl", micro_batch_size=16, metric="squad"))


# ----------------------------------------------------------------------------------------------
# model.peft: one section per method (lora_tutorial.peft builds its configs from these)
# ----------------------------------------------------------------------------------------------

LORA_TARGETS = ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2")
TARGET_SHORTCUTS = {"attention": ("attention_qkv", "attention_dense"), "mlp": ("mlp_fc1", "mlp_fc2"),
                    "all": LORA_TARGETS}
LAYERS = Rule("null (every layer) or a non-empty list of distinct layer indices (from 0)",
              lambda v: len(v) > 0 and len(set(v)) == len(v) and min(v) >= 0)


@dataclass
class LoraTuning:
    target_modules: List[str] = knob(factory=lambda: ["all"], rule=Rule(
        f"a non-empty list of {', '.join(LORA_TARGETS + tuple(TARGET_SHORTCUTS))}",
        lambda v: len(v) > 0 and all(t in LORA_TARGETS or t in TARGET_SHORTCUTS for t in v)))
    adapter_dim: int = knob(32, POSITIVE_INT)  # the rank r
    alpha: float = knob(32.0, POSITIVE)  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    adapter_dropout: float = knob(0.0, PROBABILITY)
    column_init_method: str = knob("xavier", one_of(*INIT_METHODS))  # A (r x d_in)
    row_init_method: str = knob("zero", one_of(*INIT_METHODS))  # B (d_out x r)
    layer_selection: Optional[List[int]] = knob(None, LAYERS)
    rslora: bool = False
    use_dora: bool = False  # DoRA: a learned magnitude per output row times the direction of W + BA
    # default: A and B from the two init methods above; pissa / olora: from W's SVD / QR, W keeps the residual
    init_lora_weights: str = knob("default", one_of("default", "pissa", "olora"))


@dataclass
class AdapterTuning:
    adapter_dim: int = knob(32, POSITIVE_INT)
    adapter_dropout: float = knob(0.0, PROBABILITY)
    norm_position: str = knob("pre", one_of("pre", "post"))
    layer_selection: Optional[List[int]] = knob(None, LAYERS)
    column_init_method: str = knob("xavier", one_of(*INIT_METHODS))
    row_init_method: str = knob("zero", one_of(*INIT_METHODS))


@dataclass
class IA3Tuning:
    layer_selection: Optional[List[int]] = knob(None, LAYERS)


@dataclass
class PTuning:
    virtual_tokens: int = knob(10, POSITIVE_INT)
    bottleneck_dim: int = knob(1024, POSITIVE_INT)
    embedding_dim: int = knob(1024, POSITIVE_INT)
    init_std: float = knob(0.023, POSITIVE)


PEFT_SCHEMES = ("lora", "adapter", "ia3", "ptuning")
SCHEME_ALIASES = {"p_tuning": "ptuning", "p-tuning": "ptuning", "adapters": "adapter", "": "none"}


def scheme_parts(scheme: str) -> list[str]:
    """``"LoRA, p-tuning"`` -> ``["lora", "ptuning"]`` (aliases resolved; "none" and blanks dropped)."""
    parts = [SCHEME_ALIASES.get(p.strip().lower(), p.strip().lower()) for p in str(scheme).split(",")]
    return [p for p in parts if p != "none"]


def valid_scheme(scheme: str) -> bool:
    """Whether ``scheme`` names known PEFT methods (or none), each at most once."""
    parts = scheme_parts(scheme)
    return all(p in PEFT_SCHEMES for p in parts) and len(set(parts)) == len(parts)


SCHEME_EXPECTED = f"one of {', '.join(PEFT_SCHEMES)}, none, or a comma-separated combination without repeats"


@dataclass
class PeftSection:
    # lora | adapter | ia3 | ptuning | none, or a combination such as "lora,ptuning"
    peft_scheme: Optional[str] = knob("lora", Rule(SCHEME_EXPECTED, valid_scheme))
    restore_from_path: Optional[str] = None
    lora_tuning: LoraTuning = field(default_factory=LoraTuning)
    adapter_tuning: AdapterTuning = field(default_factory=AdapterTuning)
    ia3_tuning: IA3Tuning = field(default_factory=IA3Tuning)
    p_tuning: PTuning = field(default_factory=PTuning)


# ----------------------------------------------------------------------------------------------
# model.optim, model, inference, the root
# ----------------------------------------------------------------------------------------------

@dataclass
class SchedConfig:
    warmup_steps: int = knob(0, NON_NEGATIVE)
    min_lr: float = knob(0.0, NON_NEGATIVE)


@dataclass
class OptimConfig:
    name: str = knob("adamw", one_of("adamw", "adam"))
    lr: float = knob(5e-4, Rule("a learning rate > 0 and < 1", lambda v: 0 < v < 1))
    weight_decay: float = knob(0.01, NON_NEGATIVE)
    betas: List[float] = knob(factory=lambda: [0.9, 0.98], rule=Rule(
        "two numbers in [0, 1)", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)))
    sched: SchedConfig = field(default_factory=SchedConfig)


@dataclass
class ModelConfig:
    restore_from_path: str = "smollm2-135m-instruct"
    seed: int = 1234
    micro_batch_size: int = knob(4, POSITIVE_INT)
    global_batch_size: int = knob(8, POSITIVE_INT)
    quantized_base: Optional[str] = knob(None, one_of("int8", "q4_1"))  # QLoRA: keep the frozen matrices quantized
    activations_checkpointing: bool = False  # recompute each block in the backward pass: less memory, more time
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class InferenceConfig:
    greedy: bool = True
    top_k: int = knob(0, NON_NEGATIVE)
    top_p: float = knob(0.9, Rule("a number in (0, 1]", lambda v: 0 < v <= 1))
    temperature: float = knob(1.0, POSITIVE)
    repetition_penalty: float = knob(1.0, POSITIVE)
    tokens_to_generate: int = knob(30, POSITIVE_INT)
    use_chat_template: bool = False
    output_file: Optional[str] = None
    quantize_int8: bool = False


@dataclass
class Config:
    name: str = "smollm2_lora_squad"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


# ----------------------------------------------------------------------------------------------
# Loading and checking
# ----------------------------------------------------------------------------------------------

# How OmegaConf words a failed conversion -> what the message should say was expected.
_TYPE_WORDS = {"to Integer": "an integer", "to Float": "a number", "valid bool": "true or false",
               "to String": "a string"}


def default_config() -> DictConfig:
    """A fresh copy of the schema with its defaults (unknown keys are errors)."""
    return OmegaConf.structured(Config)


def merge_checked(base: DictConfig, layer: Any, source: str, prefix: str = "") -> DictConfig:
    """``OmegaConf.merge(base, layer)`` with every OmegaConf error turned into one ``ConfigError``.

    ``prefix`` is the path of ``base`` inside the whole config (``model.peft.lora_tuning``), so that the
    message names the full key.
    """
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as err:
        key = ".".join(filter(None, (prefix, str(err.full_key))))
        raise ConfigError(f"{source}: unknown config key {key!r}; see conf/peft_tuning.yaml for the keys "
                          "that exist") from None
    except OmegaConfBaseException as err:
        key = ".".join(filter(None, (prefix, str(getattr(err, "full_key", "") or ""))))
        words = next((w for t, w in _TYPE_WORDS.items() if t in str(err.msg)), None)
        expected = f"expected {words}" if words else str(err.msg).splitlines()[0]
        raise ConfigError(f"{source}: {key}={getattr(err, 'value', '?')!r}: {expected}") from None


def validate(cfg: DictConfig, prefix: str = "") -> DictConfig:
    """Check every field's ``Rule`` (ranges and choices), recursively; return ``cfg`` unchanged."""
    schema = OmegaConf.get_type(cfg)
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = cfg[f.name]
        if isinstance(value, DictConfig):
            validate(value, key)
            continue
        rule: Rule | None = f.metadata.get("rule")
        if rule is None or value is None:
            continue
        plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        try:
            ok = rule.ok(plain)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{key}={plain!r}: expected {rule.expected}")
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, checked; or a ``ConfigError``."""
    cfg = default_config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layer = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 - yaml and omegaconf raise several kinds
            raise ConfigError(f"{path}: cannot parse YAML ({err})") from None
        cfg = merge_checked(cfg, layer, str(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} must look like key=value (e.g. trainer.max_steps=20)")
    for override in overrides:  # one at a time, so that a value YAML cannot read is named
        try:
            layer = OmegaConf.from_dotlist([override])
        except Exception as err:  # noqa: BLE001 - yaml's parser errors
            raise ConfigError(f"override {override!r}: the value is not valid YAML ({str(err).splitlines()[0]}); "
                              "quote it, e.g. key='{input} {output}'") from None
        cfg = merge_checked(cfg, layer, "command-line overrides")
    validate(cfg)
    train_micro = cfg.model.data.train_ds.micro_batch_size
    if train_micro is not None and train_micro != cfg.model.micro_batch_size:
        raise ConfigError(f"model.data.train_ds.micro_batch_size={train_micro}: expected null or "
                          f"model.micro_batch_size={cfg.model.micro_batch_size} "
                          "(training batches are model.micro_batch_size)")
    if cfg.trainer.max_steps == -1 and cfg.trainer.max_epochs is None:
        raise ConfigError("trainer.max_steps=-1: expected an integer >= 1, or set trainer.max_epochs too")
    return cfg


def flat_items(cfg: DictConfig) -> dict[str, Any]:
    """Every leaf of ``cfg`` (resolved) as ``{"trainer.max_steps": 100, ...}``."""
    def walk(node: Any, prefix: str) -> Any:
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    return dict(walk(OmegaConf.to_container(cfg, resolve=True), ""))


def config_diff(a: DictConfig, b: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every leaf where two configs differ, in schema order."""
    flat_a, flat_b = flat_items(a), flat_items(b)
    return [(key, flat_a[key], flat_b[key]) for key in flat_a if flat_a[key] != flat_b[key]]


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what a notebook prints as "the final config")."""
    return OmegaConf.to_yaml(cfg, resolve=True)


__all__ = ["Config", "ConfigError", "load_config", "default_config", "validate", "to_yaml", "flat_items", "config_diff"]
