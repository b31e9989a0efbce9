"""Generation's blocks with the small work between the products done in C (``decode_block.c``).

In a bf16 forward pass without gradients, a block's four weight products run at bf16 speed (oneDNN, AMX),
and most of the rest of the time goes into the work between them: the float32 residual add and RMSNorm,
RoPE in float32 and the casts around it, the copy into the KV cache, SwiGLU. Written as PyTorch
operations that is ~40 passes over memory per block, each a kernel of its own; at one token per row, as
many dispatches (``bench/decode_breakdown.json``: an evaluation's prefills took 9.2 s through the PyTorch
blocks and 6.2 s glued, its steps of up to 16 rows 56 and 37 ms). ``GluedBlocks`` keeps the products (the
model's own ``nn.Linear`` modules, so LoRA and other wrappers of them still apply) and PyTorch's attention
for prompts, and does the rest with four C functions:

    x += y; h = rms_norm(x)             add_and_norm   (y: the previous block's output; norm_1, norm_2)
    qkv -> rope(q, k), cache <- k, v    rope_and_cache (a prompt; then PyTorch's scaled_dot_product_attention)
                                        attention_of_step (one token per row: rotation, cache and attention)
    bf16(silu(g)) * u                   swiglu_all

``generate_ids`` puts a runner on its cache (``decode_step.block_runner``); ``GPT`` sends every forward pass
with that cache through it and runs its own blocks where it answers None. It applies where the blocks are
exactly ``Block``/``RMSNorm``/``Attention``/``MLP`` (RoPE, RMSNorm, SwiGLU, no biases) without hooks, the
KV cache is bf16 (``model.attention_dtype``: bf16 autocast on a CPU with AMX, no gradients), and the C
library is built here (``int8_kernel.kernel_name``).

The results agree with the PyTorch blocks to float32 rounding before each bf16 rounding: the norm's mean
of squares is summed in another order and exp is another implementation, so now and then a bf16 value
lands one step apart (tests/test_glued_blocks.py compares the paths; ``bench/fused_equivalence.py`` counts
the answers that change).
"""

from __future__ import annotations

import ctypes
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .int8_kernel import library
from .model import GPT, MLP, Attention, Block, KVCache, RMSNorm

MAX_HEAD_DIM = 512  # decode_block.c keeps a head's query and sums as at most 32 vectors of 16 floats


class GluedBlocks:
    """Runs every block of a bf16 ``model`` for a prompt or a decoding step with ``cache``, with the work
    between the weight products in C."""

    def __init__(self, model: GPT, cache: KVCache) -> None:
        c = model.config
        self.model, self.cache = model, weakref.ref(cache)  # weak: the cache holds this runner
        self.lib = library()
        sizes = (c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_ff, cache.max_len)  # decode_block.c's enum
        self.sizes = (ctypes.c_int64 * len(sizes))(*sizes)
        # float32 norm gains (RMSNorm.forward casts them so too), kept alive while C reads them
        self.norms = [(b.norm_1.weight.detach().float().contiguous(), b.norm_2.weight.detach().float().contiguous())
                      for b in model.blocks]
        self.caches = [(k, v) for k, v in zip(cache.keys, cache.values)]  # alive while C writes them
        self.unfit = ""  # why not, once a layer has returned what C cannot take (then every call declines)

    def __call__(self, model: GPT, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 is_causal: bool) -> torch.Tensor | None:
        """The blocks' output (B, T, d) for ``x`` (float32), the cache filled from column ``cache.length``;
        or None where this runner does not apply (then GPT runs its blocks itself).

        ``model``: the GPT asking; ``positions`` (B, T): each token's rotary position; ``mask``, ``is_causal``:
        what GPT passes its blocks (a boolean SDPA mask over the cache and the new tokens, or None)."""
        B, T = x.shape[:2]
        cache = self.cache()
        if (cache is None or model is not self.model or torch.is_grad_enabled() or x.dtype != torch.float32
                or x.device.type != "cpu" or not torch.is_autocast_enabled("cpu")
                or torch.get_autocast_dtype("cpu") != torch.bfloat16 or cache.keys[0].shape[0] != B
                or cache.length + T > cache.max_len):
            return None  # (a full cache: PyTorch's path raises the error)
        if (mask is not None and mask.dtype != torch.bool) or self.unfit:
            return None
        try:
            return self._forward(x, positions, mask, is_causal, cache.length)
        except _NotBf16 as error:  # nothing is lost: x was copied, and PyTorch rewrites the same cache columns
            self.unfit = f"{error} returns another dtype than bf16"
            return None

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                 start: int) -> torch.Tensor:
        model, (B, T, d) = self.model, x.shape
        c, rows = model.config, B * T
        width = (c.n_head + 2 * c.n_kv_head) * c.head_dim  # the fused QKV output: queries, keys, values
        x = x.reshape(rows, d).clone(memory_format=torch.contiguous_format)  # the residual stream, updated in C
        positions = positions.reshape(rows).contiguous()
        visible = None
        if T == 1 and mask is not None:  # the step's one query row of the mask: which columns it sees
            visible = mask.reshape(B, start + 1).contiguous()
        elif mask is not None:  # as 0 / -inf once, not in every layer's attention call (the same outputs)
            mask = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill_(~mask, float("-inf"))
        h = x.new_empty(rows, d, dtype=torch.bfloat16)
        hidden = x.new_empty(rows, c.d_ff, dtype=torch.bfloat16)
        attended = x.new_empty(rows, c.n_head * c.head_dim, dtype=torch.bfloat16)
        threads = torch.get_num_threads()
        rope = (model.rope_cos.data_ptr(), model.rope_sin_signed.data_ptr())
        previous = None  # the previous block's output, added to x with the next norm
        for i, block in enumerate(model.blocks):
            keys, values = self.caches[i]
            a, m = block.attention, block.mlp
            self.lib.add_and_norm(x.data_ptr(), _address(previous), self.norms[i][0].data_ptr(), block.norm_1.eps,
                                  rows, d, h.data_ptr(), threads)
            qkv = _checked(a.attention_qkv(h.view(B, T, d)), rows, width, f"blocks.{i}.attention.attention_qkv")
            if T == 1:
                if self.lib.attention_of_step(qkv.data_ptr(), keys.data_ptr(), values.data_ptr(), self.sizes, B,
                                              positions.data_ptr(), start, _address(visible), *rope,
                                              attended.data_ptr(), threads):
                    raise MemoryError(f"decode_block.c: no memory for the attention scores of {B} rows")
                y = attended.view(B, T, -1)
            else:
                self.lib.rope_and_cache(qkv.data_ptr(), keys.data_ptr(), values.data_ptr(), self.sizes, B, T,
                                        positions.data_ptr(), start, *rope, threads)
                y = self._prompt_attention(qkv, keys, values, start, mask, is_causal)
            # named: C must read it before it is freed
            dense = _checked(a.attention_dense(y), rows, d, f"blocks.{i}.attention.attention_dense")
            self.lib.add_and_norm(x.data_ptr(), dense.data_ptr(), self.norms[i][1].data_ptr(), block.norm_2.eps,
                                  rows, d, h.data_ptr(), threads)
            gate_up = _checked(m.mlp_fc1(h.view(B, T, d)), rows, 2 * c.d_ff, f"blocks.{i}.mlp.mlp_fc1")
            self.lib.swiglu_all(gate_up.data_ptr(), rows, c.d_ff, hidden.data_ptr(), threads)
            previous = _checked(m.mlp_fc2(hidden.view(B, T, c.d_ff)), rows, d, f"blocks.{i}.mlp.mlp_fc2")
        x += previous.view(rows, d)
        return x.view(B, T, d)

    def _prompt_attention(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                          mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """PyTorch's attention of the (already rotated) queries of qkv over the cache's first columns."""
        c = self.model.config
        B, T, _ = qkv.shape
        q = qkv.view(B, T, c.n_head + 2 * c.n_kv_head, c.head_dim)[:, :, :c.n_head].transpose(1, 2)
        total = start + T
        y = F.scaled_dot_product_attention(q, keys.narrow(2, 0, total), values.narrow(2, 0, total), attn_mask=mask,
                                           is_causal=is_causal, enable_gqa=c.n_kv_head != c.n_head)
        return y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim)


class _NotBf16(Exception):
    """A layer returned something other than bf16: the PyTorch blocks must compute this pass."""


def _checked(y: torch.Tensor, rows: int, width: int, name: str) -> torch.Tensor:
    """A layer's output as C reads it, contiguous: rows x width bf16 values (C would read past the end of
    anything smaller). A layer that returns another dtype (a wrapper computing in float32, such as a
    post-norm bottleneck adapter) raises ``_NotBf16``: rounding it here would compute something else."""
    if y.numel() != rows * width:
        raise ValueError(f"{name} returned a {tuple(y.shape)} tensor; {rows} rows of {width} expected")
    if y.dtype != torch.bfloat16:
        raise _NotBf16(name)
    return y.contiguous()


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def glued_blocks(model: GPT, cache: KVCache) -> GluedBlocks | None:
    """A ``GluedBlocks`` for ``model`` with ``cache``, or None where it does not apply (``unglued_reason``)."""
    return None if unglued_reason(model, cache) else GluedBlocks(model, cache)


def unglued_reason(model: GPT, cache: KVCache) -> str:
    """Why ``GluedBlocks`` cannot run ``model``'s blocks with ``cache``, or "" when it can."""
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
    if len(cache.keys) != len(model.blocks):
        return f"the cache has {len(cache.keys)} layers, the model {len(model.blocks)} blocks"
    for i, block in enumerate(model.blocks):
        reason = block_shape_reason(block, c.norm_eps)
        if not reason and block.attention.layer_idx != i:
            reason = f".attention.layer_idx is {block.attention.layer_idx}"  # it would use another cache layer
        if reason:
            return f"blocks.{i}{reason}"
    if library() is None:  # last: the first call builds the library
        return "no compiled kernel here (int8_kernel.kernel_name() says why)"
    return ""


def block_shape_reason(block: nn.Module, eps: float) -> str:
    """What in ``block`` differs from a plain ``Block`` whose norms, attention and MLP C may compute ("" when
    nothing), as ".<part> <problem>". Its linear layers may be anything that maps tensors to tensors (and
    returns bf16 under autocast), without hooks."""
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
    for name, layer in block_products(block).items():
        if layer._forward_hooks or layer._forward_pre_hooks:  # C rotates the QKV output in place, after any hook
            return f".{name} has a forward hook"
    return ""


def block_products(block: Block) -> dict[str, nn.Module]:
    """A block's four weight products by their path in the block."""
    a, m = block.attention, block.mlp
    return {"attention.attention_qkv": a.attention_qkv, "attention.attention_dense": a.attention_dense,
            "mlp.mlp_fc1": m.mlp_fc1, "mlp.mlp_fc2": m.mlp_fc2}


__all__ = ["GluedBlocks", "block_products", "block_shape_reason", "glued_blocks", "unglued_reason"]
