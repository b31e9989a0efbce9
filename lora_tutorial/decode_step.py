"""Decoding steps of an int8 model with one C call per block (``decode_block.c``).

Generating a token runs every block on one new position per sequence. Written as PyTorch operations,
a block is ~40 small operations (norms, rotations, casts, views, the KV-cache copy, attention, SwiGLU)
around its four weight products, each operation costing a few microseconds of dispatch whatever its size:
with SmolLM2's 30 blocks, about as long as the int8 products take to read the weights
(``bench/decode_breakdown.json``). ``decode_block.c`` does a block's whole step -- the same arithmetic,
in the same precisions, with the int8 products of ``int8_matvec.c`` -- in one call.

``generate_ids`` asks ``block_runner(model, cache)`` once per call and puts the answer on the cache;
``GPT`` then sends each decoding step through it. It answers None -- and the blocks run as PyTorch
modules -- unless every block is exactly what the C code computes: ``quantize.Int8Linear`` layers
without bias and no PEFT wrapper or hook, RoPE + RMSNorm + SwiGLU, a bf16 cache (``model.attention_dtype``:
CPUs with AMX), at most ``MAX_ROWS`` rows, and a compiled kernel here (``int8_kernel.kernel_name``;
``LORA_TUTORIAL_INT8_KERNEL=torch`` turns both off).

The two paths agree to float32 rounding before each bf16 rounding: sums run in another order and exp is
another implementation, so now and then one bf16 value lands one step apart, as between PyTorch's int8
kernel and ours (tests/test_decode_step.py compares the paths; ``bench/fused_equivalence.json``
counts the answers that change on 500 validation questions). bf16 models keep PyTorch's path: the same
C pieces between oneDNN's products would change their answers, which the README's and the notebooks'
scores come from.
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import nn

from .int8_kernel import MAX_ROWS, library
from .model import GPT, MLP, Attention, Block, KVCache, RMSNorm
from .quantize import Int8Linear

MAX_HEAD_DIM = 512  # decode_block.c keeps a head's query and sums as at most 32 vectors of 16 floats


class BlockRunner:
    """Runs every block of an int8 ``model`` for one decoding step with ``cache``, through decode_block.c."""

    def __init__(self, model: GPT, cache: KVCache) -> None:
        c = model.config
        # A weak reference: the cache holds this runner, and a cycle would keep every finished generation's
        # cache (47 MB at batch 16) alive until the garbage collector ran (peak RSS grew call by call).
        self.model, self.cache = model, weakref.ref(cache)
        self.lib = library()
        self.sizes = (ctypes.c_int64 * 6)(c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_ff, cache.max_len)
        self.eps = c.norm_eps
        # float32 norm gains (RMSNorm.forward casts them so too), kept alive while C reads them.
        self.norms = [(b.norm_1.weight.detach().float().contiguous(), b.norm_2.weight.detach().float().contiguous())
                      for b in model.blocks]
        self.tensors = [self._pointers(i, block, cache) for i, block in enumerate(model.blocks)]

    def _pointers(self, i: int, block: Block, cache: KVCache) -> ctypes.Array:
        """Addresses of block ``i``'s tensors in decode_block.c's order (its ``enum``)."""
        a, m = block.attention, block.mlp
        tensors = [self.norms[i][0], a.attention_qkv.weight_int8, a.attention_qkv.scale, a.attention_dense.weight_int8,
                   a.attention_dense.scale, self.norms[i][1], m.mlp_fc1.weight_int8, m.mlp_fc1.scale,
                   m.mlp_fc2.weight_int8, m.mlp_fc2.scale, cache.keys[i], cache.values[i]]
        return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The blocks' output (B, 1, d) for the step's input ``x`` (float32), the cache filled at column
        ``cache.length``; or None for what the C code does not take (then GPT runs its blocks itself).

        ``positions`` (B, 1): each row's rotary position; ``mask``: None or GPT's boolean SDPA mask
        (B, 1, 1, cache.length + 1).
        """
        rows, cache = x.shape[0], self.cache()
        if (cache is None or x.shape[1] != 1 or x.dtype != torch.float32 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and x.requires_grad) or rows > MAX_ROWS
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
        for tensors in self.tensors:
            if self.lib.decode_block(tensors, self.sizes, self.eps, x.data_ptr(), rows, *step, threads):
                raise MemoryError(f"decode_block.c: no memory for the scratch space of a {rows}-row decoding step")
        return x.reshape(rows, 1, -1)


def block_runner(model: GPT, cache: KVCache) -> BlockRunner | None:
    """A ``BlockRunner`` for decoding ``model`` with ``cache``, or None where decode_block.c cannot
    compute its blocks (``unfused_reason`` says why)."""
    return None if unfused_reason(model, cache) else BlockRunner(model, cache)


def unfused_reason(model: GPT, cache: KVCache) -> str:
    """Why decode_block.c cannot run ``model``'s blocks with ``cache``, or "" when it can."""
    c = model.config
    if library() is None:
        return "no compiled kernel here (int8_kernel.kernel_name() says why)"
    if (c.position, c.norm, c.mlp, c.bias) != ("rope", "rmsnorm", "swiglu", False):
        return "only RoPE + RMSNorm + SwiGLU blocks without biases"
    if c.head_dim % 32 or c.head_dim > MAX_HEAD_DIM or c.d_model % 16 or c.d_ff % 16 or c.n_head % c.n_kv_head:
        return "head_dim must be a multiple of 32 (at most 512), d_model and d_ff multiples of 16"
    if model.rope_cos.dtype != torch.float32 or model.rope_cos.device.type != "cpu":
        return "the rotary tables are not float32 on the CPU"
    if cache.max_len > model.rope_cos.shape[0]:  # C reads the tables unchecked: positions stay below max_len
        return f"the cache ({cache.max_len} positions) is longer than the rotary tables ({model.rope_cos.shape[0]})"
    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
               for t in (*cache.keys, *cache.values)):
        return "the KV cache is not bf16 on the CPU (attention runs in float32 here: model.attention_dtype)"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "a global forward hook is registered"
    for i, block in enumerate(model.blocks):
        reason = _block_reason(block)
        if reason:
            return f"blocks.{i}{reason}"
    return ""


def _block_reason(block: nn.Module) -> str:
    """What in ``block`` differs from a plain Block of ``Int8Linear`` layers ("" when nothing)."""
    if type(block) is not Block:
        return f" is a {type(block).__name__}"
    a, m = block.attention, block.mlp
    parts = {"norm_1": (block.norm_1, RMSNorm), "attention": (a, Attention), "norm_2": (block.norm_2, RMSNorm),
             "mlp": (m, MLP), "attention.attention_qkv": (a.attention_qkv, Int8Linear),
             "attention.attention_dense": (a.attention_dense, Int8Linear), "mlp.mlp_fc1": (m.mlp_fc1, Int8Linear),
             "mlp.mlp_fc2": (m.mlp_fc2, Int8Linear)}
    for name, (module, expected) in {"": (block, Block), **parts}.items():
        where = f".{name}" if name else ""
        if type(module) is not expected:
            return f"{where} is a {type(module).__name__}"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{where} has a forward hook"
        if expected is Int8Linear and (module.bias is not None or not module.weight_int8.is_contiguous()
                                       or not module.scale.is_contiguous()):
            return f"{where} has a bias or non-contiguous int8 tensors"
    return ""


__all__ = ["BlockRunner", "block_runner", "unfused_reason"]
