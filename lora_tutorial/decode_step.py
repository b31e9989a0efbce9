"""Decoding steps of an int8 model with one C call per block (``decode_block.c``).

Generating a token runs every block on one new position per sequence. Written as PyTorch operations,
a block is ~40 small operations (norms, rotations, casts, views, the KV-cache copy, attention, SwiGLU)
around its four weight products, each operation costing a few microseconds of dispatch whatever its size:
with SmolLM2's 30 blocks, 5.3 ms of a 16.9 ms step (``bench/decode_breakdown.json``). ``decode_block.c``
does a block's whole step -- the same arithmetic, in the same precisions, with the int8 products of
``int8_matvec.c`` -- in one call.

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
        sizes = (c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_ff, cache.max_len)  # decode_block.c's enum
        self.sizes = (ctypes.c_int64 * len(sizes))(*sizes)
        self.eps = c.norm_eps
        # float32 norm gains (RMSNorm.forward casts them so too), kept alive while C reads them.
        self.norms = [(b.norm_1.weight.detach().float().contiguous(), b.norm_2.weight.detach().float().contiguous())
                      for b in model.blocks]
        # Each block's tensors in decode_block.c's order (its enum), and their addresses for C. The tensors
        # stay referenced here: should a layer be replaced during a generation, C still reads live memory.
        self.tensors = [self._tensors(i, block, cache) for i, block in enumerate(model.blocks)]
        self.addresses = [(ctypes.c_void_p * len(t))(*(x.data_ptr() for x in t)) for t in self.tensors]

    def _tensors(self, i: int, block: Block, cache: KVCache) -> list[torch.Tensor]:
        a, m = block.attention, block.mlp
        return [self.norms[i][0], a.attention_qkv.weight_int8, a.attention_qkv.scale, a.attention_dense.weight_int8,
                a.attention_dense.scale, self.norms[i][1], m.mlp_fc1.weight_int8, m.mlp_fc1.scale,
                m.mlp_fc2.weight_int8, m.mlp_fc2.scale, cache.keys[i], cache.values[i]]

    def __call__(self, model: GPT, x: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor | None:
        """The blocks' output (B, 1, d) for the step's input ``x`` (float32), the cache filled at column
        ``cache.length``; or None for what the C code does not take (then GPT runs its blocks itself).

        ``model``: the GPT asking (another model than this runner's gets None); ``positions`` (B, 1): each
        row's rotary position; ``mask``: None or GPT's boolean SDPA mask (B, 1, 1, cache.length + 1).
        """
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


def block_runner(model: GPT, cache: KVCache) -> BlockRunner | None:
    """A ``BlockRunner`` for decoding ``model`` with ``cache``, or None where decode_block.c cannot
    compute its blocks (``unfused_reason`` says why)."""
    return None if unfused_reason(model, cache) else BlockRunner(model, cache)


FUSED = "every block in one C call"  # the words bench/*.json record


def decoding_path(model: GPT, rows: int = 1) -> str:
    """How ``generate_ids`` would run ``model``'s decoding steps for ``rows`` prompts here: ``FUSED``, or
    why not (for logs and benchmark records; it makes a small cache as ``generate_ids`` does)."""
    with torch.no_grad():  # generate_ids makes its cache without gradients (bf16 where the CPU has AMX)
        cache = model.new_cache(rows, 1)
    if rows > MAX_ROWS:
        return f"more than {MAX_ROWS} rows"
    return unfused_reason(model, cache) or FUSED


def unfused_reason(model: GPT, cache: KVCache) -> str:
    """Why decode_block.c cannot run ``model``'s blocks with ``cache``, or "" when it can."""
    c = model.config
    if (c.position, c.norm, c.mlp, c.bias) != ("rope", "rmsnorm", "swiglu", False):
        return "only RoPE + RMSNorm + SwiGLU blocks without biases"
    if c.head_dim % 32 or c.head_dim > MAX_HEAD_DIM or c.d_model % 16 or c.d_ff % 16 or c.n_head % c.n_kv_head:
        return "head_dim must be a multiple of 32 (at most 512), d_model and d_ff multiples of 16"
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
               for t in (model.rope_cos, model.rope_sin_signed)):
        return "the rotary tables are not contiguous float32 on the CPU"
    if cache.max_len > model.rope_cos.shape[0]:  # C reads the tables unchecked: positions stay below max_len
        return f"the cache ({cache.max_len} positions) is longer than the rotary tables ({model.rope_cos.shape[0]})"
    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
               for t in (*cache.keys, *cache.values)):
        return "the KV cache is not bf16 on the CPU (attention runs in float32 here: model.attention_dtype)"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "a global forward hook is registered"
    for i, block in enumerate(model.blocks):
        reason = _block_reason(block, c.norm_eps)
        if reason:
            return f"blocks.{i}{reason}"
    if library() is None:  # last: the first call builds the library, which only an int8 model needs
        return "no compiled kernel here (int8_kernel.kernel_name() says why)"
    return ""


def _block_reason(block: nn.Module, eps: float) -> str:
    """What in ``block`` differs from a plain Block of ``Int8Linear`` layers ("" when nothing), as
    ".<part> <problem>"."""
    containers = {"": (block, Block)}
    if type(block) is Block:  # only then are its parts where the C code looks for them
        containers |= {"norm_1": (block.norm_1, RMSNorm), "attention": (block.attention, Attention),
                       "norm_2": (block.norm_2, RMSNorm), "mlp": (block.mlp, MLP)}
    for name, (module, expected) in containers.items():
        if type(module) is not expected:
            return f"{'.' + name if name else ''} is a {type(module).__name__}"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{'.' + name if name else ''} has a forward hook"
    if block.norm_1.eps != eps or block.norm_2.eps != eps:
        return " has a norm whose eps is not the config's"
    a, m = block.attention, block.mlp
    for name, layer in {"attention.attention_qkv": a.attention_qkv, "attention.attention_dense": a.attention_dense,
                        "mlp.mlp_fc1": m.mlp_fc1, "mlp.mlp_fc2": m.mlp_fc2}.items():
        if type(layer) is not Int8Linear:
            return f".{name} is a {type(layer).__name__}"
        if layer._forward_hooks or layer._forward_pre_hooks:
            return f".{name} has a forward hook"
        if (layer.bias is not None or layer.weight_int8.dtype != torch.int8 or layer.scale.dtype != torch.bfloat16
                or not layer.weight_int8.is_contiguous() or not layer.scale.is_contiguous()):
            return f".{name} is not a contiguous int8 matrix with bf16 scales and no bias"
    return ""


__all__ = ["FUSED", "BlockRunner", "block_runner", "decoding_path", "unfused_reason"]
