"""Mixed precision: bf16 matrix multiplies, float32 for everything that accumulates.

Why bother on a CPU? Recent x86 CPUs (AVX512-BF16, AMX) multiply bf16 matrices two to three times
faster than float32 ones: on this project's 2-core Intel Sapphire Rapids VM (AMX) a 4096 x 4096 x 4096
product runs at about 2.5 TFLOP/s in bf16 and 0.34 TFLOP/s in float32. A transformer spends most of its time in such
products, so ``trainer.precision: bf16-mixed`` is the single largest speed lever, on CPUs as on GPUs.

The rules, as in every mixed-precision recipe:

1. ``torch.autocast(device, torch.bfloat16)`` runs each ``linear`` in bf16; the residual stream, the
   norms and the loss stay in float32 (``GPT`` keeps its residual stream float32 under autocast).
   Attention on a CPU uses whichever dtype is fastest there (``model.attention_dtype`` says which).
2. *Frozen* matrices are only ever read by matmuls, and autocast rounds them to bf16 at every use
   anyway. Storing them in bf16 (``cast_frozen_weights``) therefore gives the same products (the
   embedding lookup aside), halves the memory they take, and saves re-rounding 135M numbers at every
   forward pass.
3. *Trainable* tensors (the adapters) stay float32: AdamW's updates are often smaller than bf16's
   resolution (8 bits of mantissa) and would be rounded away.

``GPT`` switches autocast on by itself when its weights are bf16 (``autocast_like``), so that a model
with bf16 weights follows rule 1 without the caller having to remember it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every frozen matrix (weights with 2+ dimensions, ``requires_grad=False``) in ``dtype``.

    Norm gains and biases (1-D) keep their dtype; so do trainable tensors. Tied weights are cast once.
    The small tensors that stay are copied too, so that nothing refers to the (memory-mapped) float32
    checkpoint any more and its pages can leave memory. Returns the number of parameters cast.
    """
    cast, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen or p.requires_grad or not p.is_floating_point():
            continue
        seen.add(id(p))
        if p.dim() >= 2 and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast += p.numel()
        else:
            p.data = p.data.clone()
    return cast


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): bf16-mixed pays off there."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512 F, BW, VL and DQ (what PyTorch's own AVX512 kernels need, and the int8
    decoding kernel of ``int8_kernel.py``)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), where bf16 attention is the fast one."""
    return bool(torch.cpu._is_amx_tile_supported())


def trainable_dtype(frozen_dtype: torch.dtype) -> torch.dtype:
    """The dtype new trainable tensors get next to frozen ones of ``frozen_dtype``: at least float32 (rule 3),
    so that an adapter added to a bf16 base still trains in float32."""
    return torch.promote_types(frozen_dtype, torch.float32)


def matmul_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype matrix multiplies run in here: autocast's inside an autocast region, else ``default``.

    Layers that prepare an input for matmuls (a norm, LoRA's cached factors, a dequantized weight) cast
    to this once, instead of letting autocast round the same tensor again at every use."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


@contextlib.contextmanager
def autocast_like(weight: torch.Tensor) -> Iterator[None]:
    """Autocast to ``weight``'s dtype if it is bf16 or fp16 (a model's embedding table tells, since
    ``cast_frozen_weights``, ``load_base_model(dtype=...)`` and ``quantize_int8`` all store it so);
    otherwise do nothing. Already inside an autocast region (Lightning's ``bf16-mixed``), the caller's
    setting is kept. Cheap enough for every forward pass: it looks at one tensor, not the whole model.
    """
    device = weight.device.type
    if weight.dtype not in LOW_PRECISION or torch.is_autocast_enabled(device):
        yield
        return
    with torch.autocast(device, dtype=weight.dtype):
        yield


__all__ = ["cast_frozen_weights", "autocast_like", "matmul_dtype", "trainable_dtype", "cpu_has_native_bf16",
           "cpu_has_amx", "cpu_has_avx512"]
