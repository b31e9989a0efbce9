"""Int8 weight-only quantization, for faster generation on a CPU.

Generating one token at a time multiplies every weight matrix by a single vector: the arithmetic is
trivial and the time goes into *reading the weights from memory* (270 MB per token for this model in
bf16: at 30 GB/s, about what one core of the project's VM reads, ~9 ms per token before anything
else). Storing each matrix as int8 halves those bytes again.

The recipe (per-output-channel symmetric "absmax" quantization, the int8 weight-only scheme of
PyTorch's gpt-fast): for every row ``w`` of a weight matrix keep ``scale = max|w| / 127`` and
``q = round(w / scale)`` in int8, so that ``w ~= q * scale``. The rounding error of each weight is at
most ``scale / 2``, i.e. under 0.4 % of the row's largest weight. A decoding step multiplies by ``q``
directly (PyTorch's ``_weight_int8pack_mm`` kernel, the scale applied to the outputs); a prompt of many
tokens is compute-bound instead, and there the matrix is dequantized to bf16 once and multiplied as
usual. Whether int8 beats bf16 depends on the CPU and the batch (a CPU with AMX multiplies bf16 fast
enough that the int8 kernel rarely wins): ``make bench`` measures both, and the README reports them.

Only frozen ``nn.Linear`` layers are converted (adapters stay as they are, so a LoRA model can still be
used; for merged LoRA call ``merge_and_unload`` first). The embedding table stays bf16 for the lookup;
the tied LM head gets its own int8 copy. Measure EM/F1 before trusting a quantized model (the README
reports ours).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .precision import cast_frozen_weights

# A product with at most this many rows is "decoding" (memory-bound): use the int8 kernel directly.
DECODE_ROWS = 16
# Rows of a weight matrix quantized at once (bounds the float32 temporaries to ~2.4 MB at this model's width).
QUANTIZE_ROWS = 1024


class Int8Linear(nn.Module):
    """A frozen linear layer stored as int8 rows plus one bf16 scale per output feature."""

    weight_is_quantized = True  # GPT.num_parameters counts it as the (out, in) matrix it stands for

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
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
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        """The (out, in) bf16 matrix this layer stands for."""
        return self.weight_int8.to(torch.bfloat16) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if rows.shape[0] <= DECODE_ROWS and rows.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        else:
            y = F.linear(rows, self.dequantized())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_int8(model: nn.Module) -> int:
    """Replace every frozen ``nn.Linear`` of ``model`` by an ``Int8Linear``; return how many were replaced.

    The other frozen matrices (the embedding table) are stored in bf16 too, so that the model runs under
    bf16 autocast (see precision.py); norms and trainable tensors are left alone.
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and not child.weight.requires_grad]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child))
    cast_frozen_weights(model, torch.bfloat16)  # the embedding table (and any other frozen matrix)
    return len(targets)


__all__ = ["Int8Linear", "quantize_int8"]
