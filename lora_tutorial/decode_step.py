"""Decoding steps of an int8 model with one C call per block (``decode_block.c``).

Generating a token runs every block on one new position per sequence. Written as PyTorch operations,
a block is ~40 small operations (norms, rotations, casts, views, the KV-cache copy, attention, SwiGLU)
around its four weight products, each operation costing a few microseconds of dispatch whatever its size:
with SmolLM2's 30 blocks, 8.4 ms of a 23.0 ms step (``bench/decode_breakdown.json``). ``decode_block.c``
does a block's whole step -- the same arithmetic, in the same precisions, with the int8 products of
``int8_matvec.c`` -- in one call.

``generate_ids`` asks ``block_runner(model, cache)`` once per call and puts the answer on the cache;
``GPT`` then sends each forward pass with that cache through it. A ``BlockRunner`` takes the decoding steps
where every block is exactly what the C code computes: ``quantize.Int8Linear`` layers without bias and no
PEFT wrapper or hook, RoPE + RMSNorm + SwiGLU, a bf16 cache (``model.attention_dtype``: CPUs with AMX), at
most ``MAX_ROWS`` rows, and a compiled kernel here (``int8_kernel.kernel_name``;
``LORA_TUTORIAL_INT8_KERNEL=torch`` turns it off). Prompts, wider steps and every other bf16 model (LoRA
included) go through ``glued_blocks.GluedBlocks``: the same C pieces around the model's own products.
Where neither applies the answer is None, and the blocks run as PyTorch modules.

The paths agree to float32 rounding before each bf16 rounding: sums run in another order and exp is
another implementation, so now and then one bf16 value lands one step apart, as between PyTorch's int8
kernel and ours (tests/test_decode_step.py and tests/test_glued_blocks.py compare the paths;
``bench/fused_equivalence.json`` counts the answers that change on 500 validation questions).
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import nn

from .glued_blocks import GluedBlocks, block_products, glued_blocks, unglued_reason
from .int8_kernel import MAX_ROWS
from .model import GPT, Block, KVCache
from .quantize import Int8Linear


class BlockRunner:
    """Runs every block of an int8 ``model`` for one decoding step with ``cache``, through decode_block.c."""

    def __init__(self, model: GPT, cache: KVCache, fallback: GluedBlocks | None = None) -> None:
        self.fallback = fallback  # for prompts and wide steps: the same C pieces around PyTorch's products
        # A weak reference: the cache holds this runner, and a cycle would keep every finished generation's
        # cache (47 MB at batch 16) alive until the garbage collector ran (peak RSS grew call by call).
        self.model, self.cache = model, weakref.ref(cache)
        # The library, decode_block.c's sizes and the float32 norm gains: as the glued blocks hold them.
        pieces = fallback if fallback is not None else GluedBlocks(model, cache)
        self.lib, self.sizes, self.norms, self.eps = pieces.lib, pieces.sizes, pieces.norms, model.config.norm_eps
        # Each block's tensors in decode_block.c's order (its enum), and their addresses for C. The tensors
        # stay referenced here: should a layer be replaced during a generation, C still reads live memory.
        self.tensors = [self._tensors(i, block, cache) for i, block in enumerate(model.blocks)]
        self.addresses = [(ctypes.c_void_p * len(t))(*(x.data_ptr() for x in t)) for t in self.tensors]

    def _tensors(self, i: int, block: Block, cache: KVCache) -> list[torch.Tensor]:
        a, m = block.attention, block.mlp
        return [self.norms[i][0], a.attention_qkv.weight_int8, a.attention_qkv.scale, a.attention_dense.weight_int8,
                a.attention_dense.scale, self.norms[i][1], m.mlp_fc1.weight_int8, m.mlp_fc1.scale,
                m.mlp_fc2.weight_int8, m.mlp_fc2.scale, cache.keys[i], cache.values[i]]

    def __call__(self, model: GPT, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 is_causal: bool = False) -> torch.Tensor | None:
        """The blocks' output (B, 1, d) for the step's input ``x`` (float32), the cache filled at column
        ``cache.length``; for what the C code does not take (a prompt, more than ``MAX_ROWS`` rows), what
        ``fallback`` answers; else None (then GPT runs its blocks itself).

        ``model``: the GPT asking (another model than this runner's gets None); ``positions`` (B, 1): each
        row's rotary position; ``mask``: None or GPT's boolean SDPA mask (B, 1, 1, cache.length + 1).
        """
        fused = self._step(model, x, positions, mask)
        if fused is None and self.fallback is not None:
            return self.fallback(model, x, positions, mask, is_causal)
        return fused

    def _step(self, model: GPT, x: torch.Tensor, positions: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor | None:
        rows, cache = x.shape[0], self.cache()
        # With gradients on, the PyTorch blocks would take other paths (bf16 products, float32 attention)
        # and keep a graph; C keeps none.
        if (cache is None or model is not self.model or torch.is_grad_enabled() or x.shape[1] != 1
                or x.dtype != torch.float32 or x.device.type != "cpu" or rows > MAX_ROWS
                or cache.keys[0].shape[0] != rows or cache.length >= cache.max_len):
            return None  # (a full cache: PyTorch's path raises the error)
        if mask is not None and (mask.dtype != torch.bool or mask.numel() != rows * (cache.length + 1)):
            return None
        x = x.reshape(rows, -1).clone(memory_format=torch.contiguous_format)  # the residual stream, updated by C
        positions = positions.reshape(rows).contiguous()
        visible = None if mask is None else mask.reshape(rows, cache.length + 1).contiguous()
        step = (positions.data_ptr(), cache.length, None if visible is None else visible.data_ptr(),
                self.model.rope_cos.data_ptr(), self.model.rope_sin_signed.data_ptr())
        threads = torch.get_num_threads()
        for addresses in self.addresses:
            if self.lib.decode_block(addresses, self.sizes, self.eps, x.data_ptr(), rows, *step, threads):
                raise MemoryError(f"decode_block.c: no memory for the scratch space of a {rows}-row decoding step")
        return x.reshape(rows, 1, -1)


def block_runner(model: GPT, cache: KVCache) -> BlockRunner | GluedBlocks | None:
    """The fastest way through ``model``'s blocks with ``cache`` that computes what they compute: a
    ``BlockRunner`` (int8 decoding steps, falling back to ``GluedBlocks`` for prompts), ``GluedBlocks``
    (``unfused_reason`` says why not fused), or None (``glued_blocks.unglued_reason`` says why)."""
    glued = glued_blocks(model, cache)
    if glued is None or _int8_blocks_reason(model):
        return glued
    return BlockRunner(model, cache, fallback=glued)


FUSED = "every block in one C call"  # the words bench/*.json record
GLUED = "C between PyTorch's products"


def decoding_path(model: GPT, rows: int = 1) -> str:
    """How ``generate_ids`` would run ``model``'s decoding steps for ``rows`` prompts here: ``FUSED``;
    ``GLUED`` (glued_blocks.py), with why not fused; or why neither (for logs and benchmark records; it
    makes a small cache as ``generate_ids`` does)."""
    with torch.no_grad():  # generate_ids makes its cache without gradients (bf16 where the CPU has AMX)
        cache = model.new_cache(rows, 1)
    unglued = unglued_reason(model, cache)
    if unglued:
        return unglued
    unfused = f"more than {MAX_ROWS} rows" if rows > MAX_ROWS else unfused_reason(model, cache)
    return f"{GLUED} (not fused: {unfused})" if unfused else FUSED


def unfused_reason(model: GPT, cache: KVCache) -> str:
    """Why decode_block.c cannot run ``model``'s blocks with ``cache`` in one call each, or "" when it can."""
    return unglued_reason(model, cache) or _int8_blocks_reason(model)  # the C pieces, and int8 products


def _int8_blocks_reason(model: GPT) -> str:
    """The first of ``model``'s block products that decode_block.c cannot multiply by itself ("" if none)."""
    for i, block in enumerate(model.blocks):
        for name, layer in block_products(block).items():
            reason = _int8_reason(layer)
            if reason:
                return f"blocks.{i}.{name} {reason}"
    return ""


def _int8_reason(layer: nn.Module) -> str:
    """What keeps decode_block.c from multiplying by ``layer`` itself ("" when nothing)."""
    if type(layer) is not Int8Linear:
        return f"is a {type(layer).__name__}"
    if (layer.bias is not None or layer.weight_int8.dtype != torch.int8 or layer.scale.dtype != torch.bfloat16
            or not layer.weight_int8.is_contiguous() or not layer.scale.is_contiguous()):
        return "is not a contiguous int8 matrix with bf16 scales and no bias"
    return ""


__all__ = ["FUSED", "GLUED", "BlockRunner", "block_runner", "decoding_path", "unfused_reason"]
