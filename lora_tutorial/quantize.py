"""Int8 weight-only quantization, for faster generation on a CPU.

Generating one token at a time multiplies every weight matrix by a single vector: the arithmetic is
trivial and the time goes into *reading the weights from memory* (270 MB per token for this model in
bf16: at 30 GB/s, about what one core of the project's VM reads, ~9 ms per token before anything
else). Storing each matrix as int8 halves those bytes again.

The recipe (per-output-channel symmetric "absmax" quantization, the int8 weight-only scheme of
PyTorch's gpt-fast): for every row ``w`` of a weight matrix keep ``scale = max|w| / 127`` and
``q = round(w / scale)`` in int8, so that ``w ~= q * scale``. The rounding error of each weight is at
most ``scale / 2``, i.e. under 0.4 % of the row's largest weight. A decoding step multiplies by ``q``
directly, the scale applied to the outputs: with the small C kernel of ``int8_kernel.py`` where it can be
built (it streams the weights faster than PyTorch's kernel: ``bench/kernels.json``), else with PyTorch's
``_weight_int8pack_mm``. A prompt of many tokens is compute-bound instead: there ``q`` is converted to
bf16 and multiplied as usual. Whether int8 beats bf16 depends on the CPU and the batch: at batch 1 it
reads half the bytes; at batch 16 the products are bound by arithmetic, and int8 keeps up with bf16 only
where the kernel can widen the weights to bf16 and multiply them on AMX as oneDNN does for bf16 (Intel
Sapphire Rapids and later; with AVX-512 FMAs alone it takes more than twice as long there). The rest of
each step runs in C for both (``decode_step.py``, ``glued_blocks.py``). ``make bench`` measures both,
and the README reports them.

Quantizing reads every bf16 matrix, so the process that does it holds both copies for a moment.
``load_int8_model`` therefore quantizes the pretrained model once and caches the int8 matrices on disk:
later processes map that file and never read the bf16 matrices (the embedding table aside), which keeps
an int8 process's peak memory at what the int8 model needs (``make bench`` reports it).

Only frozen ``nn.Linear`` layers are converted (adapters stay as they are, so a LoRA model can still be
used; for merged LoRA call ``merge_and_unload`` first). The embedding table stays bf16 for the lookup;
the tied LM head gets its own int8 copy. Measure EM/F1 before trusting a quantized model (the README
reports ours).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .files import atomic_path
from .int8_kernel import MAX_ROWS, int8_matmul
from .model import GPT
from .precision import cast_frozen_weights
from .pretrained import DEFAULT_MODEL, CheckpointError, load_base_model, weights_cache_path
from .tokenizer import Tokenizer

# A product with at most this many rows is "decoding" (a step of up to 16 sequences): the int8 kernel.
DECODE_ROWS = MAX_ROWS
# Names the int8 cache file: change it when the quantization recipe changes, so old files are not reused.
INT8_CACHE_TAG = "int8-rowwise-absmax-v1"
# Rows of a weight matrix quantized at once (bounds its float32 temporaries to a few MB at this model's widths).
QUANTIZE_ROWS = 1024


class Int8Linear(nn.Module):
    """A frozen linear layer stored as int8 rows plus one bf16 scale per output feature."""

    weight_is_quantized = True  # GPT.num_parameters counts it as the (out, in) matrix it stands for

    def __init__(self, linear: nn.Linear, stored: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Quantize ``linear``'s weight, or take ``stored`` (int8 matrix, bf16 scales) from an earlier run."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        if stored is not None:
            # The int8 kernel reads with wide vector loads and can crash on a tensor that is not 64-byte
            # aligned, as tensors mapped from a safetensors file may be: give those fresh memory.
            weight_int8, scale = (t if t.data_ptr() % 64 == 0 else t.clone() for t in stored)
            self.register_buffer("weight_int8", weight_int8)
            self.register_buffer("scale", scale)
            return
        weight = linear.weight.detach()
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], dtype=torch.bfloat16, device=weight.device)
        # A few rows at a time: a float32 copy of the whole LM head (113 MB, three temporaries deep) would
        # raise the process's peak memory far above what the int8 model needs.
        for rows in torch.split(torch.arange(weight.shape[0], device=weight.device), QUANTIZE_ROWS):
            w = weight[rows[0]:rows[-1] + 1].float()
            # Round the scale to bf16 (what the kernel takes) *before* quantizing against it.
            s = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).to(torch.bfloat16)
            q[rows[0]:rows[-1] + 1] = torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
            scale[rows[0]:rows[-1] + 1] = s
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) bf16 matrix this layer stands for."""
        return self.weight_int8.to(torch.bfloat16) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        few_rows = x.numel() <= DECODE_ROWS * self.in_features and x.device.type == "cpu"
        if few_rows and not (x.requires_grad and torch.is_grad_enabled()):  # the int8 kernels have no backward
            y = self._decode(x)
        else:
            # Many rows (a prompt) make the product compute-bound: multiply in bf16, and apply the scales
            # to whichever is smaller, the outputs or the matrix. Fewer rows than input features: multiply
            # by the int8 matrix converted to bf16 (exact: every int8 value is a bf16 value) and scale the
            # outputs (by hand, the prompt of ``make bench`` ran 149 -> 124 ms); more (a batch of prompts):
            # build the scaled bf16 matrix (by hand, 3,104 rows through mlp_fc1: 23-27 ms -> 7 ms). The two
            # round differently, so a prompt's int8 numbers depend on how many rows its batch has (as bf16
            # products' blocking does anyway).
            if x.numel() < self.in_features * self.in_features:
                y = F.linear(x, self.weight_int8.to(torch.bfloat16)) * self.scale
            else:
                y = F.linear(x, self.dequantized())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """The product for a few rows: the compiled kernel (int8_kernel.py) where it runs, else PyTorch's."""
        y = int8_matmul(x, self.weight_int8, self.scale)
        if y is None:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight_int8, self.scale)
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_int8(model: nn.Module, stored: Mapping[str, torch.Tensor] | None = None,
                  source: str = "") -> int:
    """Replace every frozen ``nn.Linear`` of ``model`` by an ``Int8Linear``; return how many were replaced.

    ``stored``: the int8 buffers of an earlier ``quantize_int8`` of the same model (its ``state_dict``
    entries ``<layer>.weight_int8`` and ``<layer>.scale``; ``source`` names where they came from, for
    errors), used instead of quantizing. The other frozen matrices (the embedding table) are stored in
    bf16 too, so that the model runs under bf16 autocast (see precision.py); norms and trainable tensors
    are left alone.
    """
    targets = [(f"{prefix}.{name}".lstrip("."), parent, name, child)
               for prefix, parent in model.named_modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and not child.weight.requires_grad]
    # Every stored layer is checked before the first is replaced: a bad file leaves the model as it was.
    layers = [None if stored is None else _stored_layer(stored, full_name, child, source)
              for full_name, _, _, child in targets]
    for (_, parent, name, child), layer in zip(targets, layers):
        setattr(parent, name, Int8Linear(child, layer))
    cast_frozen_weights(model, torch.bfloat16)  # the embedding table (and any other frozen matrix)
    return len(targets)


def _stored_layer(stored: Mapping[str, torch.Tensor], name: str, linear: nn.Linear,
                  source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``name``'s int8 matrix and scales from ``stored``, checked against the layer they replace."""
    keys = (f"{name}.weight_int8", f"{name}.scale")
    expected = ((tuple(linear.weight.shape), torch.int8), ((linear.out_features,), torch.bfloat16))
    for key, (shape, dtype) in zip(keys, expected):
        tensor = stored.get(key)
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            found = "missing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise CheckpointError(f"{source or 'stored int8 weights'}: {key} is {found}; expected {shape} {dtype} "
                                  "(delete the file to quantize again)")
    return stored[keys[0]], stored[keys[1]]


def load_int8_model(name_or_path: str | Path = DEFAULT_MODEL, use_cache: bool | None = None) -> tuple[GPT, Tokenizer]:
    """The pretrained model with int8 weights, frozen, for generation: ``load_base_model`` + ``quantize_int8``.

    For a cached model (``use_cache`` as in ``load_base_model``) the int8 matrices are written to the cache
    the first time and read from it afterwards: such a load never reads the bf16 matrices it replaces.
    """
    model, tokenizer = load_base_model(name_or_path, dtype=torch.bfloat16, use_cache=use_cache)
    model.requires_grad_(False)
    cached = weights_cache_path(name_or_path, INT8_CACHE_TAG, use_cache)
    if cached is not None and cached.exists():
        quantize_int8(model, load_file(str(cached)), source=str(cached))
        return model, tokenizer
    quantize_int8(model)
    if cached is not None:
        _save_aligned({k: v for k, v in model.state_dict().items() if k.endswith((".weight_int8", ".scale"))}, cached)
    return model, tokenizer


def _save_aligned(state: dict[str, torch.Tensor], path: Path, alignment: int = 64) -> None:
    """Save ``state`` as safetensors whose data section starts at a multiple of ``alignment`` bytes.

    The format is 8 bytes of header length, a JSON header (padded with spaces to a multiple of 8), then
    the tensors back to back. A metadata entry of spaces lengthens the JSON so that the data starts
    aligned; then every tensor whose size is a multiple of ``alignment`` (all of SmolLM2's) is mapped
    aligned and ``Int8Linear`` need not copy it (it copies any tensor that is not).
    """
    data = safetensors_bytes(state, metadata={"padding": ""})
    json_length = len(data[8:8 + int.from_bytes(data[:8], "little")].rstrip(b" "))
    data = safetensors_bytes(state, metadata={"padding": " " * ((alignment - 8 - json_length) % alignment)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


__all__ = ["Int8Linear", "load_int8_model", "quantize_int8"]
