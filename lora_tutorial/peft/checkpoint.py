"""Adapter-only checkpoints, and export of LoRA to the Hugging Face PEFT format.

A fine-tuned adapter is tiny next to its base (LoRA r=32 on QKV: 1.5 M numbers, 5.9 MB, against 135 M),
so we save only the adapter tensors. One ``.safetensors`` file holds everything needed to use them again:

* the tensors, named as in ``model.state_dict()`` (``blocks.0.attention.attention_qkv.lora_A``);
* in the file's metadata (a str -> str map; we store one JSON string under ``"lora_tutorial"``): the PEFT
  config(s), the base model's name, and a *fingerprint* of the base: its ``GPTConfig`` plus a SHA-256 of
  a few of its tensors. Adapters only make sense on the exact weights they were trained on, so loading
  them on another base is refused with a message instead of silently producing nonsense.

``load_adapters`` uses only ``safetensors`` (no pickle, so a checkpoint cannot run code) and checks, in
order: the file exists and is readable, it was written by ``save_adapters``, the base matches, the
methods match, and every tensor is present with the right shape. Each failure raises one
``AdapterCheckpointError`` that names the file and the problem.

``export_hf_peft`` writes a LoRA as ``adapter_config.json`` + ``adapter_model.safetensors`` for HF
``peft.PeftModel.from_pretrained`` on a ``LlamaForCausalLM`` of the same base. Our fused matrices are
split: the QKV update ``B A`` becomes three LoRAs ``B_q A``, ``B_k A``, ``B_v A`` (same A, B cut by rows),
and ``mlp_fc1``'s becomes ``gate_proj`` and ``up_proj``. No rotary permutation is needed: our q/k rows are
already in HF's half-split layout (``checkpoints.unpermute_rope_rows`` fixed them at load time).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..model import GPT
from .config import CONFIG_CLASSES, TARGET_PARENTS, PEFTConfig
from .lora import LoRALinear, lora_modules
from .ptuning import FrozenPrompt, freeze_prompt_encoder

FORMAT = "lora_tutorial.peft/1"
METADATA_KEY = "lora_tutorial"


class AdapterCheckpointError(ValueError):
    """An adapter file that cannot be loaded into this model; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------
# Which tensors are "the adapter", and which base they belong to
# ----------------------------------------------------------------------------------------------

def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The PEFT modules' own parameters by state-dict name (never the wrapped base layers' weights)."""
    params: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if not getattr(module, "peft_scheme", None):
            continue
        for name, p in module.named_parameters():
            if name.startswith("base."):  # the wrapped layer (or an inner wrapper, which we visit itself)
                continue
            params[f"{module_name}.{name}"] = p
    return params


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached adapter tensors, as ``save_adapters`` writes them."""
    return {name: p.detach() for name, p in adapter_parameters(model).items()}


def _base_linear(module: nn.Module) -> nn.Module:
    while hasattr(module, "base"):
        module = module.base
    return module


def base_fingerprint(model: GPT) -> dict[str, Any]:
    """``GPTConfig`` + a SHA-256 of a few base tensors (embedding rows, last norms, last QKV weight).

    Tensors are hashed after rounding to bfloat16, so the same base in fp32 or bf16 gives one fingerprint.
    """
    if any(m.merged for m in lora_modules(model)):
        raise AdapterCheckpointError("LoRA is merged into the base weights; call unmerge_lora(model) first")
    last = model.blocks[-1]
    tensors = [model.wte.weight[:16], model.norm_f.weight, last.norm_1.weight,
               _base_linear(last.attention.attention_qkv).weight]
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return {"config": model.config.to_dict(), "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------

def save_adapters(model: GPT, path: str | Path) -> Path:
    """Write the adapter tensors and their configs + base fingerprint to one ``.safetensors`` file."""
    configs: list[PEFTConfig] = getattr(model, "peft_configs", [])
    if not configs:
        raise ValueError("save_adapters: the model has no adapters (call add_adapter or load_adapters first)")
    path = Path(path)
    tensors = {name: t.to("cpu").contiguous() for name, t in adapter_state_dict(model).items()}
    info = {
        "format": FORMAT,
        "peft_configs": [{"scheme": c.scheme, **c.to_dict()} for c in configs],
        "ptuning_frozen": isinstance(model.virtual_prompt, FrozenPrompt),
        "base_model": model.name_or_path,
        "base_fingerprint": base_fingerprint(model),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(info)})
    os.chmod(path, 0o644)  # safetensors creates files readable by the owner only
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
    stored, ours = info["base_fingerprint"], base_fingerprint(model)
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


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
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


def _strip_new_adapters(model: GPT, configs_before: list, requires_grad: dict[int, bool]) -> None:
    """Undo an ``add_adapter`` done by a failed ``load_adapters``: unwrap layers, drop the prompt."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if getattr(child, "peft_scheme", None) and hasattr(child, "base"):
                setattr(parent, name, _base_linear(child))
    model.virtual_prompt = None
    model.peft_configs = configs_before
    for p in model.parameters():
        p.requires_grad_(requires_grad.get(id(p), p.requires_grad))


def load_adapters(model: GPT, path: str | Path, check_base: bool = True) -> list[PEFTConfig]:
    """Load adapters saved by ``save_adapters`` into ``model``; return their configs.

    On a plain base model the adapters are first inserted (``add_adapter`` with the stored configs); on a
    model that already has adapters, their configs must equal the stored ones. Any mismatch raises
    ``AdapterCheckpointError`` and leaves the model as it was.
    """
    from . import add_adapter  # the package's entry point; imported here because __init__ imports this module

    path = Path(path)
    tensors, info = read_adapter_file(path)
    if check_base:
        _check_base(path, info, model)
    stored: list[PEFTConfig] = info["peft_configs"]
    current: list[PEFTConfig] = list(getattr(model, "peft_configs", []))
    inserted = not current
    if inserted:
        if model.virtual_prompt is not None or any(getattr(m, "peft_scheme", None) for m in model.modules()):
            raise AdapterCheckpointError(f"{path}: the model has PEFT modules but no peft_configs record")
        requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        add_adapter(model, stored, verbose=False)
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
    params = adapter_parameters(model)
    try:
        _check_tensors(path, tensors, params)
    except AdapterCheckpointError:
        if inserted:
            _strip_new_adapters(model, current, requires_grad)
        raise
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return stored


# ----------------------------------------------------------------------------------------------
# Export to Hugging Face PEFT
# ----------------------------------------------------------------------------------------------

# Our target -> the HF Llama module(s) its rows are split into, in row order.
_HF_TARGETS = {"attention_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
               "attention_dense": ("self_attn", ("o_proj",)),
               "mlp_fc1": ("mlp", ("gate_proj", "up_proj")),
               "mlp_fc2": ("mlp", ("down_proj",))}


def export_hf_peft(model: GPT, directory: str | Path) -> Path:
    """Write a LoRA as an HF PEFT adapter directory for ``LlamaForCausalLM`` (``PeftModel.from_pretrained``)."""
    configs: list[PEFTConfig] = getattr(model, "peft_configs", [])
    if not configs or any(c.scheme != "lora" for c in configs):
        raise ValueError(f"export_hf_peft exports LoRA only; this model has "
                         f"{'+'.join(c.scheme for c in configs) or 'no adapters'}")
    c = model.config
    if c.mlp != "swiglu" or c.position != "rope" or c.bias:
        raise ValueError("export_hf_peft supports Llama-style models (SwiGLU, RoPE, no biases) only")
    (cfg,) = configs
    sizes = {"attention_qkv": list(model.blocks[0].attention.qkv_sizes), "attention_dense": [c.d_model],
             "mlp_fc1": [c.d_ff, c.d_ff], "mlp_fc2": [c.d_model]}
    tensors: dict[str, torch.Tensor] = {}
    hf_modules: set[str] = set()
    layers: list[int] = []
    for i, block in enumerate(model.blocks):
        for target, (hf_parent, hf_names) in _HF_TARGETS.items():
            layer = getattr(getattr(block, TARGET_PARENTS[target]), target)
            if not isinstance(layer, LoRALinear):
                continue
            if i not in layers:
                layers.append(i)
            prefix = f"base_model.model.model.layers.{i}.{hf_parent}"
            # A is shared by every part; B's rows are split (q | k | v, or gate | up).
            for hf_name, b_part in zip(hf_names, layer.lora_B.detach().split(sizes[target], dim=0)):
                tensors[f"{prefix}.{hf_name}.lora_A.weight"] = layer.lora_A.detach().cpu().clone()
                tensors[f"{prefix}.{hf_name}.lora_B.weight"] = b_part.cpu().contiguous().clone()
                hf_modules.add(hf_name)
    if not tensors:
        raise ValueError("export_hf_peft: the model has no LoRA layers (merged and unloaded?)")
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model.name_or_path or None,
        "r": cfg.adapter_dim, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora, "lora_dropout": cfg.adapter_dropout,
        "target_modules": sorted(hf_modules), "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "layers_to_transform": None if len(layers) == len(model.blocks) else layers, "layers_pattern": None,
        "modules_to_save": None, "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


__all__ = ["AdapterCheckpointError", "adapter_parameters", "adapter_state_dict", "base_fingerprint",
           "save_adapters", "load_adapters", "read_adapter_file", "export_hf_peft"]
