"""Taking the tuned model home: the base model with its LoRA merged in, as one GGUF file.

A GGUF file is what llama.cpp (and the tools built on it: Ollama, LM Studio, llamafile...) runs. Our base
model came from one (``pretrained.py``), so the way home is the way in, backwards::

    model, tokenizer = load_base_model()                       # SmolLM2 from its GGUF file
    load_adapters(model, "runs/lora/adapter.safetensors")      # + the trained LoRA
    export_gguf(model, "smollm2-135m-instruct", "smollm2-squad.gguf")     # one file, no Python needed
    # $ llama-cli -m smollm2-squad.gguf -cnv

What happens, step by step:

1. **Merge.** A llama GGUF holds plain weight matrices, so every PEFT method must be folded into them.
   LoRA is ``W + (alpha/r) B A`` (DoRA then rescales each row to its learned magnitude); IA3 scales
   rows (keys, values) or columns (the FFN's ``down`` projection) of a weight, which is a matrix too.
   The merge is done on *new* float32 tensors: the caller's model is never touched (no
   ``merge_and_unload``). P-tuning (extra input embeddings in front of every sequence) and bottleneck
   adapters (extra non-linear layers) have no place in a llama GGUF and are refused with a ``ValueError``
   naming the method.
2. **Rename and split.** Our fused matrices go back to llama.cpp's separate tensors: ``attention_qkv``
   (rows Q | K | V) to ``attn_q``, ``attn_k``, ``attn_v``, and ``mlp_fc1`` (rows gate | up) to
   ``ffn_gate``, ``ffn_up``. The names come from ``checkpoint_names.LLAMA_NAMES``, the one table that the
   readers use too.
3. **Permute.** llama.cpp rotates *interleaved* pairs of query/key dimensions (0&1, 2&3, ...) where we
   rotate the halves (i and i + head_dim/2). ``checkpoint_names.unpermute_rope_rows`` reordered the rows when
   the model was read; ``permute_rope_rows`` here is its inverse.
4. **Store.** Norm gains stay float32 (576 numbers each, and the precision matters), every matrix,
   the token embedding included, becomes F16 (``dtype="f16"``: 2 bytes a weight, rounding error at most
   2^-11 relative) or Q8_0 (``dtype="q8_0"``: blocks of 32 int8 values sharing one f16 scale, 8.5 bits a
   weight). With tied embeddings (SmolLM2) there is no ``output.weight``: llama.cpp reuses the embedding.
5. **Metadata.** Hyperparameters (``llama.*``), the tokenizer and its chat template (``tokenizer.*``) are
   copied from the base GGUF, so the exported model tokenizes and chats exactly as the base did;
   ``general.name`` gets a new name and ``general.base_model.0.*`` records where it came from.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .files import atomic_path
from .model import GPT
from .peft.adapter import AdapterLinear
from .peft.ia3 import IA3FFN, IA3QKV
from .peft.lora import LoRALinear
from .peft.wrapping import is_peft_module
from .checkpoint_names import GGUF, llama_names
from .pretrained import gguf_config, gguf_fields, resolve_model_path

# dtype -> (GGML tensor type of the matrices, general.file_type)
DTYPES = {"f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}

# Methods whose wrappers ``_merged_weight`` can fold into a weight matrix (LoRA includes its variants:
# DoRA and PiSSA/OLoRA-initialised LoRA).
MERGEABLE = ("lora", "ia3")
# Why the others cannot be merged (the refusal's message). A new method that can be merged needs a branch in
# ``_merged_weight`` and its scheme in MERGEABLE; until then it is refused here as "an unknown PEFT method".
UNMERGEABLE_WHY = {
    "ptuning": "p-tuning's virtual prompt is extra input embeddings in front of every sequence, which no "
               "weight of a llama GGUF can hold",
    "adapter": "bottleneck adapters are extra non-linear layers (down, SiLU, up) after attention and MLP, "
               "which no weight of a llama GGUF can express",
}

# Base-GGUF metadata that is not copied as it is: the writer sets general.architecture itself, the rest
# describes the base file (its name, its quantization) rather than ours.
_REPLACED_KEYS = {"general.architecture", "general.name", "general.finetune", "general.file_type",
                  "general.quantization_version"}


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from the half-split (HF) layout to llama.cpp's interleaved rotary layout.

    The inverse of ``checkpoint_names.unpermute_rope_rows`` (and what llama.cpp's ``convert_hf_to_gguf.py`` does):
    within each head, row i of the first half and row i of the second half become rows 2i and 2i + 1.
    """
    d_out, d_in = w.shape
    head_dim = d_out // n_head
    return w.reshape(n_head, 2, head_dim // 2, d_in).transpose(1, 2).reshape(d_out, d_in)


# ----------------------------------------------------------------------------------------------
# Merging (on copies: the caller's model is never modified)
# ----------------------------------------------------------------------------------------------

def check_mergeable(model: GPT) -> None:
    """Raise one ``ValueError`` naming every PEFT method of ``model`` that cannot be merged into its weights."""
    found: dict[str, None] = {}  # ordered set
    if model.virtual_prompt is not None:
        found["ptuning"] = None
    for module in model.modules():
        if isinstance(module, AdapterLinear):
            found["adapter"] = None
        elif is_peft_module(module) and not isinstance(module, (LoRALinear, IA3QKV, IA3FFN)):
            found[module.peft_scheme] = None
    for cfg in model.peft_configs:
        if cfg.scheme not in MERGEABLE:
            found[cfg.scheme] = None
    if found:
        reasons = "; ".join(f"{m}: {UNMERGEABLE_WHY.get(m, 'an unknown PEFT method')}" for m in found)
        raise ValueError(f"export_gguf: cannot merge {' and '.join(found)} into the base weights ({reasons}). "
                         f"Only {' and '.join(MERGEABLE)} can be exported as a GGUF model.")


def _merged_weight(module: nn.Module) -> torch.Tensor:
    """The float32 (out, in) matrix that ``module`` (a linear layer under any PEFT wrappers) multiplies by.

    Returns a new tensor whenever a wrapper changes the weight; a plain layer's own weight is returned
    detached and must only be read.
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    if isinstance(module, LoRALinear):  # the same cases as LoRALinear.forward
        w = _merged_weight(module.base)  # W; for PiSSA / OLoRA the residual W - s B0 A0
        if module.merged:  # base.weight already holds the adapted weight (LoRA or DoRA)
            return w
        if not module.adapter_enabled:  # the base model's W
            a0, b0 = getattr(module, "lora_A0", None), getattr(module, "lora_B0", None)
            return w if a0 is None else w + module.scaling * (b0.float() @ a0.float()).to(w.device)
        adapted = w + module.delta_weight().to(w.device)  # W + s B A
        if getattr(module, "use_dora", False):  # DoRA: every row rescaled to its learned magnitude m
            norm = torch.linalg.vector_norm(adapted, dim=1)
            adapted = (module.lora_magnitude.detach().float().to(w.device) / norm)[:, None] * adapted
        return adapted
    if isinstance(module, IA3QKV):  # y = scale * (W x): scale the rows (1 for Q, l_k for K, l_v for V)
        w = _merged_weight(module.base)
        if not module.adapter_enabled:
            return w
        scale = torch.cat([module.ia3_k.new_ones(module.q_size), module.ia3_k, module.ia3_v]).float()
        return w * scale.to(w.device)[:, None]
    if isinstance(module, IA3FFN):  # y = W (l_ff * x): scale the columns
        w = _merged_weight(module.base)
        if not module.adapter_enabled:
            return w
        return w * module.ia3_ff.detach().float().to(w.device)[None, :]
    if is_peft_module(module):
        raise ValueError(f"export_gguf: cannot merge {module.peft_scheme} ({type(module).__name__}) into a weight")
    raise ValueError(f"export_gguf: a {type(module).__name__} layer has no plain weight to export (an int8 model? "
                     "export the float32 model instead)")


@torch.no_grad()
def merged_tensor(model: GPT, name: str) -> torch.Tensor:
    """Our state-dict tensor ``name`` (``blocks.3.mlp.mlp_fc1.weight``) with every PEFT method merged, float32.

    A new tensor when a PEFT method changes it; otherwise the model's own (detached) tensor: read it only.
    """
    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name)
    if is_peft_module(module) or (param == "weight" and isinstance(module, nn.Linear)):
        return _merged_weight(module)
    return getattr(module, param).detach().float()  # embedding table, norm gains


# ----------------------------------------------------------------------------------------------
# GGUF tensors
# ----------------------------------------------------------------------------------------------

def _fused_rows(model: GPT, name: str) -> list[int]:
    """Row counts of the parts of a fused matrix, in the order ``LLAMA_NAMES`` lists them."""
    c = model.config
    if name.endswith("attention_qkv.weight"):
        return list(c.qkv_sizes)
    if name.endswith("mlp_fc1.weight"):
        return [c.d_ff, c.d_ff]
    raise AssertionError(f"{name}: no row split known for this fused matrix")


def gguf_tensors(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in llama.cpp's layout) for every tensor of the merged model, in file order."""
    c = model.config
    names = llama_names(c, GGUF)
    for ours in sorted(names, key=lambda n: _file_order(names[n][0])):
        w = merged_tensor(model, ours).cpu()
        theirs = names[ours]
        parts = [w] if len(theirs) == 1 else w.split(_fused_rows(model, ours), dim=0)
        for gguf_name, part in zip(theirs, parts):
            if gguf_name.endswith(".attn_q.weight"):
                part = permute_rope_rows(part, c.n_head)
            elif gguf_name.endswith(".attn_k.weight"):
                part = permute_rope_rows(part, c.n_kv_head)
            yield gguf_name, part


def _file_order(gguf_name: str) -> tuple[int, int, str]:
    """token_embd first, then the blocks in order, then output_norm / output (llama.cpp's own order)."""
    if gguf_name.startswith("blk."):
        return 1, int(gguf_name.split(".")[1]), gguf_name
    return (0 if gguf_name.startswith("token_embd") else 2), 0, gguf_name


def _encode(w: torch.Tensor, matrix_type: Any) -> tuple[np.ndarray, Any]:
    """A tensor as the numpy array ``GGUFWriter.add_tensor`` takes, and its GGML type.

    1-D tensors (norm gains) stay F32. A matrix whose rows do not split into Q8_0 blocks of 32 is stored
    as F16 instead (as llama.cpp's converter does); never for SmolLM2, whose rows are 576 or 1536 long.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    array = w.numpy()
    if array.ndim == 1:
        return array.astype(np.float32), GGMLQuantizationType.F32
    if not np.isfinite(array).all() or np.abs(array).max() > np.finfo(np.float16).max:
        raise ValueError("export_gguf: a merged weight is not finite or does not fit in float16 "
                         f"(max |w| = {np.abs(array).max():g}); check the adapter")
    if matrix_type != GGMLQuantizationType.F16 and array.shape[-1] % GGML_QUANT_SIZES[matrix_type][0] == 0:
        return quantize(array, matrix_type), matrix_type
    return array.astype(np.float16), GGMLQuantizationType.F16


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------

def _check_config(model: GPT, base_path: Path, fields: dict, tensor_names: set[str]) -> None:
    """The model must be a llama-style model with exactly the base GGUF's hyperparameters."""
    c = model.config
    if (c.norm, c.position, c.mlp, c.bias) != ("rmsnorm", "rope", "swiglu", False):
        raise ValueError("export_gguf writes llama-architecture files: the model must be Llama-style "
                         f"(RMSNorm, RoPE, SwiGLU, no biases), not norm={c.norm}, position={c.position}, "
                         f"mlp={c.mlp}, bias={c.bias}")
    base = gguf_config(base_path, fields, tensor_names).to_dict()
    ours = c.to_dict()
    differ = [k for k in ours if not (math.isclose(ours[k], base[k], rel_tol=1e-6)
                                      if isinstance(ours[k], float) else ours[k] == base[k])]
    if differ:
        raise ValueError(f"export_gguf: the model does not match the base GGUF {base_path} whose metadata "
                         "would be copied: " + ", ".join(f"{k} {ours[k]} vs {base[k]}" for k in differ))


def _metadata(reader, name: str | None, file_type: int) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, GGUF value type, array element type) to write: the base's fields, renamed as ours."""
    from gguf import GGML_QUANT_VERSION, GGUFValueType

    fields = gguf_fields(reader)
    base_name = str(fields.get("general.name") or "base model")
    out = [("general.name", name or f"{base_name} (LoRA merged)", GGUFValueType.STRING, None),
           ("general.file_type", file_type, GGUFValueType.UINT32, None),
           ("general.quantization_version", GGML_QUANT_VERSION, GGUFValueType.UINT32, None)]
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _REPLACED_KEYS or key.startswith("general.base_model."):
            continue
        if key not in fields:
            raise ValueError(f"export_gguf: cannot read the base GGUF's metadata field {key!r}")
        vtype, sub = field.types[0], (field.types[1] if len(field.types) > 1 else None)
        if sub == GGUFValueType.ARRAY:
            raise ValueError(f"export_gguf: cannot copy the nested array metadata field {key!r}")
        out.append((key, fields[key], vtype, sub))
    out.append(("general.base_model.count", 1, GGUFValueType.UINT32, None))
    out.append(("general.base_model.0.name", base_name, GGUFValueType.STRING, None))
    if fields.get("general.organization"):
        out.append(("general.base_model.0.organization", str(fields["general.organization"]),
                    GGUFValueType.STRING, None))
    return out


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------

def export_gguf(model: GPT, base_gguf: str | Path, out_path: str | Path, dtype: str = "f16",
                name: str | None = None, verbose: bool = False) -> Path:
    """Write ``model`` (a llama-style ``GPT``; LoRA, DoRA, IA3 merged in) as a llama.cpp GGUF file; return its path.

    ``base_gguf`` is the GGUF file the model was loaded from (a path, or a known model name such as
    ``"smollm2-135m-instruct"``): its hyperparameters, tokenizer and chat template are copied. ``dtype``
    is ``"f16"`` or ``"q8_0"`` for the matrices (norms stay F32); ``name`` sets ``general.name``. The
    model itself is not modified. The file is written atomically: on error nothing is left behind.
    """
    from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType, LlamaFileType

    if dtype not in DTYPES:
        raise ValueError(f"export_gguf: dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
    out_path = Path(out_path)
    if out_path.suffix != ".gguf":
        raise ValueError(f"export_gguf: {out_path}: the output file name must end in .gguf")
    check_mergeable(model)
    base_path = resolve_model_path(base_gguf)
    if base_path.is_dir() or base_path.suffix != ".gguf":
        raise ValueError(f"export_gguf: {base_path} is not a GGUF file; the tokenizer and hyperparameters "
                         "are copied from the base model's GGUF file")
    if out_path.exists() and out_path.resolve() == base_path.resolve():
        raise ValueError(f"export_gguf: {out_path} is the base GGUF file itself; choose another output path")
    started = time.perf_counter()
    reader = GGUFReader(str(base_path))
    _check_config(model, base_path, gguf_fields(reader), {t.name for t in reader.tensors})
    matrix_type = GGMLQuantizationType[DTYPES[dtype][0]]
    metadata = _metadata(reader, name, int(LlamaFileType[DTYPES[dtype][1]]))

    with atomic_path(out_path) as tmp:
        writer = GGUFWriter(tmp, "llama")
        try:
            for key, value, vtype, sub in metadata:
                writer.add_key_value(key, value, vtype, sub)
            for gguf_name, tensor in gguf_tensors(model):
                array, ggml_type = _encode(tensor, matrix_type)
                writer.add_tensor(gguf_name, array, raw_dtype=ggml_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    if verbose:
        print(f"Wrote {out_path} ({dtype}, {out_path.stat().st_size / 1e6:.1f} MB) in "
              f"{time.perf_counter() - started:.1f} s")
    return out_path


__all__ = ["export_gguf", "check_mergeable", "merged_tensor", "gguf_tensors", "permute_rope_rows", "DTYPES"]
