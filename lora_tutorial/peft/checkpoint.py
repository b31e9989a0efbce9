"""Adapter-only files: save the trained PEFT tensors, load them onto a base model again.

A fine-tuned adapter is tiny next to its base (LoRA r=32 on QKV: 1.5 M numbers, 5.9 MB, against 135 M),
so we save only the adapter tensors. One ``.safetensors`` file holds everything needed to use them again:

* the tensors, named as in ``model.state_dict()`` (``blocks.0.attention.attention_qkv.lora_A``);
* in the file's metadata (a str -> str map; we store one JSON string under ``"lora_tutorial"``): the PEFT
  config(s), the base model's name, and a *fingerprint* of the base: its ``GPTConfig`` plus a SHA-256 of
  a few of its tensors. Adapters only make sense on the exact weights they were trained on, so loading
  them on another base is refused with a message instead of silently producing nonsense.

PiSSA / OLoRA adapters (``init_lora_weights: pissa | olora``) change the frozen weight itself: it holds the
residual ``W - s·B0 A0`` of the initial factors. Their files also hold ``lora_A0`` and ``lora_B0``, and
``load_adapters`` rebuilds the residual from them on a fresh base (``LoRALinear.set_initial_factors`` says
why these tensors), so the reloaded model is bit-identical to the saved one.

``load_adapters`` uses only ``safetensors`` (no pickle, so a checkpoint cannot run code) and checks, in
order: the file exists and is readable, it was written by ``save_adapters``, the base matches, the
methods match, and every tensor is present with the right shape. Each failure raises one
``AdapterCheckpointError`` that names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..files import atomic_path
from ..model import GPT
from .config import CONFIG_CLASSES, PEFTConfig
from .inject import add_adapter, adapter_modules, adapter_parameters, is_peft_module, remove_adapters
from .lora import LoRALinear, lora_modules
from .ptuning import FrozenPrompt, freeze_prompt_encoder
from .wrapping import unwrap

FORMAT = "lora_tutorial.peft/1"
METADATA_KEY = "lora_tutorial"


class AdapterCheckpointError(ValueError):
    """An adapter file that cannot be loaded into this model; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------
# Which tensors are "the adapter", and which base they belong to
# ----------------------------------------------------------------------------------------------

def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Detached tensors of the adapter ``name``, as ``save_adapters`` writes them (with PiSSA / OLoRA's
    initial factors)."""
    tensors = {key: p.detach() for key, p in adapter_parameters(model, name).items()}
    tensors.update({f"{key}.{buffer}": getattr(m, buffer).detach() for key, m in _residual_layers(model, name).items()
                    for buffer in ("lora_A0", "lora_B0")})
    return tensors


def _last_qkv_is_residual(configs: list[PEFTConfig], n_layer: int) -> bool:
    """Whether PiSSA / OLoRA turned the last block's QKV weight into a residual (it is then not the base's)."""
    return any(c.scheme == "lora" and c.init_lora_weights != "default" and "attention_qkv" in c.target_modules
               and (c.layer_selection is None or n_layer - 1 in c.layer_selection) for c in configs)


def base_fingerprint(model: GPT, configs: list[PEFTConfig] | None = None) -> dict[str, Any]:
    """``GPTConfig`` + a SHA-256 of a few base tensors (embedding rows, last norms, last QKV weight).

    Tensors are hashed after rounding to bfloat16, so the same base in fp32 or bf16 gives one fingerprint.
    When PiSSA / OLoRA (in ``configs``, by default the model's own) holds a residual in the last QKV weight,
    that weight is left out: the base's own cannot be recovered bit-exactly from the residual, and a fresh
    base has no residual yet. ``load_adapters`` passes the file's configs, so both sides leave out the same.
    """
    if any(m.merged for m in lora_modules(model)):
        raise AdapterCheckpointError("LoRA is merged into the base weights; call unmerge_lora(model) first")
    last = model.blocks[-1]
    configs = model.peft_configs if configs is None else configs
    tensors = [model.wte.weight[:16], model.norm_f.weight, last.norm_1.weight]
    if not _last_qkv_is_residual(configs, len(model.blocks)):
        qkv = unwrap(last.attention.attention_qkv)
        if not isinstance(getattr(qkv, "weight", None), torch.Tensor):
            raise AdapterCheckpointError(
                f"cannot fingerprint the base: its last attention_qkv is a {type(qkv).__name__} without a "
                "weight tensor (int8 inference quantization); save or load adapters before quantize_int8")
        tensors.append(qkv.weight)
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return {"config": model.config.to_dict(), "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------

def save_adapters(model: GPT, path: str | Path, name: str = "default") -> Path:
    """Write the tensors of adapter ``name`` and their configs + base fingerprint to one ``.safetensors`` file."""
    configs: list[PEFTConfig] = [c for c in model.peft_configs if c.adapter_name == name]
    if not configs:
        raise ValueError(f"save_adapters: the model has no adapters named {name!r} (call add_adapter or "
                         "load_adapters first)")
    path = Path(path)
    tensors = {key: t.to("cpu").contiguous() for key, t in adapter_state_dict(model, name).items()}
    info = {
        "format": FORMAT,
        "peft_configs": [{"scheme": c.scheme, **c.to_dict()} for c in configs],
        "ptuning_frozen": isinstance(model.virtual_prompt, FrozenPrompt),
        "base_model": model.name_or_path,
        "base_fingerprint": base_fingerprint(model, configs),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(info)})
    return path


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------

def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the metadata of an adapter file, or an ``AdapterCheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise AdapterCheckpointError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several error types
        raise AdapterCheckpointError(f"{path}: not a readable safetensors file, probably truncated or corrupt "
                                     f"({type(err).__name__}: {err})") from None
    if METADATA_KEY not in metadata:
        raise AdapterCheckpointError(f"{path}: no '{METADATA_KEY}' metadata; this is not an adapter file "
                                     "written by lora_tutorial.peft.save_adapters")
    try:
        info = json.loads(metadata[METADATA_KEY])
        configs = [CONFIG_CLASSES[d.pop("scheme")].from_dict(d) for d in info["peft_configs"]]
        fingerprint = info["base_fingerprint"]
        if not isinstance(fingerprint["config"], dict) or not isinstance(fingerprint["sha256"], str):
            raise TypeError("base_fingerprint must hold a config dict and a sha256 string")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise AdapterCheckpointError(f"{path}: corrupt adapter metadata ({type(err).__name__}: {err})") from None
    if info.get("format") != FORMAT:
        raise AdapterCheckpointError(f"{path}: format {info.get('format')!r}; this version reads {FORMAT!r}")
    info["peft_configs"] = configs
    return tensors, info


def _check_base(path: Path, info: dict, model: GPT) -> None:
    stored, ours = info["base_fingerprint"], base_fingerprint(model, info["peft_configs"])
    where = f"{path}: these adapters were trained on another base model ({info.get('base_model') or 'unnamed'}"
    if stored["config"] != ours["config"]:
        diffs = [f"{k}={stored['config'].get(k)!r} in the file, {ours['config'].get(k)!r} in the model"
                 for k in sorted(set(stored["config"]) | set(ours["config"]))
                 if stored["config"].get(k) != ours["config"].get(k)]
        raise AdapterCheckpointError(f"{where}): the model config differs: {'; '.join(diffs)}")
    if stored["sha256"] != ours["sha256"]:
        raise AdapterCheckpointError(f"{where}; this model is {model.name_or_path or 'unnamed'}): same shape but "
                                     f"different weights (base fingerprint {stored['sha256'][:12]}... in the file, "
                                     f"{ours['sha256'][:12]}... for the model). Load the base the adapters were "
                                     "trained on, or pass check_base=False to load them anyway")


def _check_configs(path: Path, stored: list[PEFTConfig], current: list[PEFTConfig]) -> None:
    stored = sorted(stored, key=lambda c: c.scheme)
    current = sorted(current, key=lambda c: c.scheme)
    if [c.scheme for c in stored] != [c.scheme for c in current]:
        raise AdapterCheckpointError(f"{path}: holds {'+'.join(c.scheme for c in stored)} adapters, but the model "
                                     f"already has {'+'.join(c.scheme for c in current)} (another PEFT method); "
                                     "load into a model without adapters")
    for s, c in zip(stored, current):
        if s != c:
            diffs = [f"{k}={v!r} in the file, {c.to_dict()[k]!r} in the model"
                     for k, v in s.to_dict().items() if c.to_dict()[k] != v]
            raise AdapterCheckpointError(f"{path}: the model's {s.scheme} config differs from the file's: "
                                         f"{'; '.join(diffs)}")


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
        raise AdapterCheckpointError(f"{path}: adapter tensors do not fit the model: {'; '.join(parts)}")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise AdapterCheckpointError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                         f"the model expects {tuple(p.shape)}")


def _residual_layers(model: nn.Module, name: str) -> dict[str, LoRALinear]:
    """The LoRA layers of adapter ``name`` whose frozen weight is a PiSSA / OLoRA residual, by key."""
    return {key: m for key, m in adapter_modules(model, name).items()
            if isinstance(m, LoRALinear) and m.lora_A0 is not None}


def _without_data_driven_init(configs: list[PEFTConfig]) -> list[PEFTConfig]:
    """``configs`` with PiSSA / OLoRA replaced by the default init: loading inserts the layers without an
    SVD / QR of this base, and rebuilds the residual from the file's A0, B0 instead."""
    return [type(c).from_dict({**c.to_dict(), "init_lora_weights": "default"})
            if c.scheme == "lora" and c.init_lora_weights != "default" else c for c in configs]


def load_adapters(model: GPT, path: str | Path, check_base: bool = True, name: str = "default") -> list[PEFTConfig]:
    """Load adapters saved by ``save_adapters`` into ``model`` as the adapter ``name``; return their configs.

    When the model has no adapter of that name yet, its modules are first inserted (``add_adapter`` with the
    stored configs); otherwise that adapter's configs must equal the stored ones. Any mismatch raises
    ``AdapterCheckpointError`` and leaves the model as it was.
    """
    path = Path(path)
    tensors, info = read_adapter_file(path)
    if check_base:
        _check_base(path, info, model)
    stored: list[PEFTConfig] = info["peft_configs"]
    for cfg in stored:
        cfg.adapter_name = name
    current: list[PEFTConfig] = [c for c in model.peft_configs if c.adapter_name == name]
    inserted = not current
    if inserted:
        if not model.peft_configs and (model.virtual_prompt is not None or any(map(is_peft_module, model.modules()))):
            raise AdapterCheckpointError(f"{path}: the model has PEFT modules but no peft_configs record")
        requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        add_adapter(model, _without_data_driven_init(stored), verbose=False, name=name)
        others = [c for c in model.peft_configs if c.adapter_name != name]
        model.peft_configs = others + [next(s for s in stored if s.scheme == c.scheme)
                                       for c in model.peft_configs if c.adapter_name == name]
        if info.get("ptuning_frozen"):
            freeze_prompt_encoder(model)
    else:
        _check_configs(path, stored, current)
        if any(m.merged for m in lora_modules(model)):
            raise AdapterCheckpointError(f"{path}: the model's LoRA is merged; call unmerge_lora(model) first")
        frozen_now = isinstance(model.virtual_prompt, FrozenPrompt)
        if bool(info.get("ptuning_frozen")) != frozen_now:
            raise AdapterCheckpointError(f"{path}: the file's p-tuning prompt is "
                                         f"{'a frozen table' if info.get('ptuning_frozen') else 'an encoder'}, "
                                         f"the model's is {'a frozen table' if frozen_now else 'an encoder'}")
    params = adapter_parameters(model, name)
    residual = ({key: m for key, m in adapter_modules(model, name).items() if isinstance(m, LoRALinear)}
                if any(c.scheme == "lora" and c.init_lora_weights != "default" for c in stored) else {})
    expected: dict[str, torch.Tensor] = dict(params)
    for layer_name, layer in residual.items():  # PiSSA / OLoRA: the initial factors, shaped like A and B
        expected[f"{layer_name}.lora_A0"], expected[f"{layer_name}.lora_B0"] = layer.lora_A, layer.lora_B
    try:
        _check_tensors(path, tensors, expected)
    except AdapterCheckpointError:
        if inserted:  # roll back: the model is left as it was
            remove_adapters(model, name)
            for p in model.parameters():
                p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
        raise
    for layer_name, layer in residual.items():  # base.weight = W - s·B0 A0, before A and B get their trained values
        layer.set_initial_factors(next(c for c in stored if c.scheme == "lora").init_lora_weights,
                                  tensors[f"{layer_name}.lora_A0"], tensors[f"{layer_name}.lora_B0"])
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])
    return stored


__all__ = ["AdapterCheckpointError", "adapter_state_dict", "base_fingerprint", "save_adapters", "load_adapters",
           "read_adapter_file"]
