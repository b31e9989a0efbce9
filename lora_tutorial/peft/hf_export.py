"""Export a LoRA adapter to the Hugging Face PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

The directory loads with ``peft.PeftModel.from_pretrained`` on a ``LlamaForCausalLM`` of the same base.
Our fused matrices are split: the QKV update ``B A`` becomes three LoRAs ``B_q A``, ``B_k A``, ``B_v A``
(the same A, B cut by rows), and ``mlp_fc1``'s becomes ``gate_proj`` and ``up_proj``. No rotary
permutation is needed: our q/k rows are already in HF's half-split layout (``pretrained`` fixed them at
load time).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import atomic_path, write_text
from ..model import GPT
from ..checkpoint_names import HF, LLAMA_NAMES
from .lora import LoRALinear
from .wrapping import target_name


def hf_modules_of(target: str) -> tuple[str, ...]:
    """The HF Llama module(s) one of our target layers is split into, in row order
    (``attention_qkv`` -> ``self_attn.q_proj``, ``self_attn.k_proj``, ``self_attn.v_proj``)."""
    hf_names = LLAMA_NAMES[target_name(0, target).replace("blocks.0.", "blocks.{i}.") + ".weight"][HF]
    return tuple(n.removeprefix("layers.{i}.").removesuffix(".weight") for n in hf_names)


def export_hf_peft(model: GPT, directory: str | Path) -> Path:
    """Write a LoRA as an HF PEFT adapter directory for ``LlamaForCausalLM`` (``PeftModel.from_pretrained``)."""
    configs = model.peft_configs
    if not configs or any(c.scheme != "lora" for c in configs):
        raise ValueError(f"export_hf_peft exports LoRA only; this model has "
                         f"{'+'.join(c.scheme for c in configs) or 'no adapters'}")
    c = model.config
    if c.mlp != "swiglu" or c.position != "rope" or c.bias:
        raise ValueError("export_hf_peft supports Llama-style models (SwiGLU, RoPE, no biases) only")
    if len(configs) > 1:
        raise ValueError(f"export_hf_peft exports one LoRA; this model has {len(configs)} "
                         f"({', '.join(c.adapter_name for c in configs)}): remove_adapters until one LoRA is left "
                         "(after combine_lora, to export a mix)")
    (cfg,) = configs
    if cfg.use_dora or cfg.init_lora_weights != "default":
        variant = "DoRA" if cfg.use_dora else f"{cfg.init_lora_weights}-initialised LoRA"
        raise ValueError(f"export_hf_peft exports plain LoRA; this adapter is {variant}, whose tensors would "
                         "mean something else in an HF PEFT LoRA directory")
    sizes = {"attention_qkv": list(c.qkv_sizes), "attention_dense": [c.d_model],
             "mlp_fc1": [c.d_ff, c.d_ff], "mlp_fc2": [c.d_model]}
    tensors: dict[str, torch.Tensor] = {}
    hf_modules: set[str] = set()
    layers: list[int] = []
    for i in range(len(model.blocks)):
        for target in sizes:
            layer = model.get_submodule(target_name(i, target))
            if not isinstance(layer, LoRALinear):
                continue
            if layer.merged:
                raise ValueError(f"export_hf_peft: {target_name(i, target)} has its LoRA merged into the base "
                                 "weight, which a PEFT loader would then add twice; call unmerge_lora first")
            if i not in layers:
                layers.append(i)
            # A is shared by every part; B's rows are split (q | k | v, or gate | up).
            for hf_module, b_part in zip(hf_modules_of(target), layer.lora_B.detach().split(sizes[target], dim=0)):
                prefix = f"base_model.model.model.layers.{i}.{hf_module}"
                tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.detach().cpu().clone()
                tensors[f"{prefix}.lora_B.weight"] = b_part.cpu().contiguous().clone()
                hf_modules.add(hf_module.split(".")[-1])
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
    write_text(json.dumps(adapter_config, indent=2) + "\n", directory / "adapter_config.json")
    with atomic_path(directory / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return directory


__all__ = ["export_hf_peft"]
