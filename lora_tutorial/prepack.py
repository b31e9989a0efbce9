"""bf16 weights packed once for oneDNN, for the decoding steps of an evaluation on a CPU with AMX.

On a CPU, ``F.linear`` with a bf16 weight calls oneDNN, whose AMX kernels want the weight in a blocked
layout of their own; given a plain (out, in) matrix they rearrange it on every call. A decoding step
multiplies a few rows by every matrix of the model, so that rearranging is a large part of its time:
on the project's VM, the 120 block matrices multiplied by 16 rows took 30.2 ms from plain weights and
17.3 ms from weights packed beforehand (``bench/kernels.json``). A prompt of thousands of rows gains
little (401 ms plain, 387 ms packed for 3,680 rows; by hand, plain was faster from ~256 rows up), so packed
weights are used only up to ``PACKED_MAX_ROWS`` rows. The results are bit for bit those of
``F.linear`` (tested).

An evaluation generates answers for hundreds of questions, so ``packed_for_evaluation`` packs every
frozen bf16 ``nn.Linear`` of the model once (about 0.1 s, and a packed copy of the weights in memory:
270 MB for SmolLM2, the tied LM head included) and restores the plain layers afterwards. It does
nothing where it would not pay or cannot run: no AMX, no oneDNN, float32 weights, a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .precision import cpu_has_amx

# Products of more rows than this (a prompt) use the plain matrix (measured crossover: 128-256 rows).
PACKED_MAX_ROWS = 128


def packing_pays(model: nn.Module) -> bool:
    """Whether ``packed_for_evaluation`` packs anything for ``model`` here."""
    return (torch.backends.mkldnn.is_available() and cpu_has_amx()
            and any(_packable(m) for m in model.modules()))


def _packable(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
            and module.weight.device.type == "cpu" and not module.weight.requires_grad)


@contextlib.contextmanager
def packed_for_evaluation(model: nn.Module) -> Iterator[int]:
    """Inside the block, frozen bf16 ``nn.Linear`` layers multiply a few rows by a pre-packed copy of their
    weight; afterwards they are plain layers again. Yields how many layers were packed.

    Pack after ``merged_for_inference`` (the merged weights are the ones to pack) and do not change a
    packed layer's weight inside the block: the packed copy would not follow. Inside the block the model
    cannot be pickled or deep-copied (the packed forwards are closures); nested blocks pack nothing more.
    """
    packed: list[nn.Linear] = []
    try:
        for layer in [m for m in model.modules() if _packable(m)] if packing_pays(model) else []:
            if "forward" in vars(layer):  # already packed by an enclosing block (or given a forward of its own)
                continue
            weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 16)  # 16: rows it expects
            # An instance attribute shadows nn.Linear.forward for this module only; deleting it restores the class's.
            layer.forward = _packed_forward(layer, weight)
            packed.append(layer)
        yield len(packed)
    finally:
        for layer in packed:
            del layer.forward


def _packed_forward(layer: nn.Linear, packed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``layer``'s forward, through ``packed`` for up to ``PACKED_MAX_ROWS`` bf16 rows without gradients."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // layer.in_features
        bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                             and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        if rows > PACKED_MAX_ROWS or not bf16 or (x.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, layer.weight, layer.bias)
        # what bf16 autocast hands the layer (the model runs its bf16 weights under bf16 autocast)
        bias = None if layer.bias is None else layer.bias.to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, bias, "none", [], "")
    return forward


__all__ = ["PACKED_MAX_ROWS", "packed_for_evaluation", "packing_pays"]
