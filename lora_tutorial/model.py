"""A small decoder-only transformer that can be a Llama-style or a GPT-2-style model.

This is the whole language model the tutorial fine-tunes, in one file you can read in one sitting.
One ``GPT`` class covers two families through switches in ``GPTConfig``:

=================  ===============================  ===============================
switch             Llama style (SmolLM2, default)   GPT-2 style
=================  ===============================  ===============================
``norm``           RMSNorm                          LayerNorm
``position``       rotary embeddings (RoPE)         learned absolute positions
``mlp``            SwiGLU: fc2(silu(g) * u)         GELU: fc2(gelu(fc1(x)))
``bias``           no biases                        biases everywhere
``n_kv_head``      fewer than ``n_head`` (GQA)      equal to ``n_head``
=================  ===============================  ===============================

Each block is the usual pre-norm residual pair::

    x = x + attention_dense(attend(rope(attention_qkv(norm_1(x)))))
    x = x + mlp_fc2(act(mlp_fc1(norm_2(x))))

The four linear layers that PEFT methods target have the same names in both styles, as in
NeMo/Megatron: ``attention_qkv`` (Q, K and V *fused* into one matrix, also for the Llama style),
``attention_dense`` (attention output), ``mlp_fc1`` (gate and up fused for SwiGLU) and ``mlp_fc2``.
LoRA, adapters and IA3 (see ``lora_tutorial.peft``) wrap these modules; nothing in this file needs
to know about them. P-tuning needs one hook, ``GPT.virtual_prompt``: a module that returns extra
"virtual token" embeddings which the model puts in front of every sequence.

Padding and caching. Batches for generation are *left*-padded (``attention_mask`` has 0 on pads), so
that every prompt ends at the last column and new tokens are appended in step. Positions are counted
from the first real token of each row, so a padded prompt is computed exactly like the same prompt
alone. ``KVCache`` preallocates keys and values for a fixed length, so decoding one token only runs
the new token through the network.

Precision. A model whose matrices are stored in bf16 (``load_base_model(dtype=torch.bfloat16)``, or
``trainer.precision: bf16-mixed``) runs each forward pass under autocast: bf16 matrix multiplies, a
float32 residual stream and float32 norms; attention runs in whichever dtype is fastest on the device
(``attention_dtype``; see also ``precision.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .precision import autocast_like, cpu_has_amx, matmul_dtype


@dataclass
class GPTConfig:
    """Shape and flavour of the model. The defaults are SmolLM2-135M (Llama style)."""

    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    d_model: int = 576
    d_ff: int = 1536
    max_seq_len: int = 8192
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    position: str = "rope"  # "rope" | "learned"
    rope_base: float = 100000.0
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    bias: bool = False
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        choices = {"norm": ("rmsnorm", "layernorm"), "position": ("rope", "learned"), "mlp": ("swiglu", "gelu")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"GPTConfig.{key}={getattr(self, key)!r}; expected one of {allowed}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Rows of the fused ``attention_qkv`` matrix: the query heads, then the key heads, then the value heads."""
        return self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def gpt2_style(cls, **overrides) -> "GPTConfig":
        """A GPT-2-shaped config (the 124M model's sizes unless overridden)."""
        base = dict(vocab_size=50257, n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=3072,
                    max_seq_len=1024, norm="layernorm", position="learned", mlp="gelu", bias=True,
                    tie_embeddings=True)
        base.update(overrides)
        if "n_head" in overrides and "n_kv_head" not in overrides:
            base["n_kv_head"] = base["n_head"]
        return cls(**base)


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even under bf16 autocast: the mean of squares loses precision otherwise.
        # Only matrix multiplies read the result, and autocast would round it to bf16 for each of them
        # (twice where LoRA reads it too): round it once here.
        dtype = matmul_dtype(x.device.type, x.dtype)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings
# ----------------------------------------------------------------------------------------------

def rope_cache(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin tables of shape (max_len, head_dim), in the "half-split" layout of HF Llama.

    Dimension i of the first half and dimension i of the second half form one rotating pair, turning
    at frequency base^(-2i/head_dim) radians per position. Rotating the pair (a, b) by an angle t gives
    (a cos t - b sin t, b cos t + a sin t); with x rolled by half its width (b in a's place and a in b's)
    that is ``x * cos + roll(x) * sin_signed`` where the first half of ``sin_signed`` is -sin t.
    """
    # Always computed on the CPU, also inside ``torch.device("meta")`` (how ``pretrained.build_model``
    # builds a model): real tables are needed anyway, and math on "meta" tensors imports torch._dynamo
    # and sympy (about 75 MiB that a decoding process would keep).
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin_signed = torch.cat([-angles.sin(), angles.sin()], dim=-1)
    return cos.float(), sin_signed.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate query/key vectors x (..., D) by per-position angles (``rope_cache`` tables, broadcast to x).

    Three kernels (roll, multiply, multiply-add) instead of the textbook five (slice, negate,
    concatenate, two multiplies and an add): it runs on every layer, forward and backward.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys and values for every layer, filled left to right.

    ``length`` is how many columns are filled. A static buffer (instead of ``torch.cat`` per step) keeps
    decoding free of reallocations; attention then reads ``[:, :, :length]``.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0
        # A faster way through every block with this cache, or None (decode_step.py, glued_blocks.py):
        # ``run_blocks(model, x, positions, mask, is_causal)`` returns the blocks' output, or None where it
        # does not apply (then the model runs its blocks itself).
        self.run_blocks: Callable[..., torch.Tensor | None] | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v (B, H_kv, T, D) after what is cached; return everything cached so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {end} positions needed, {self.max_len} allocated")
        self.keys[layer].narrow(2, start, end - start).copy_(k)  # narrow: one view op, no indexing to parse
        self.values[layer].narrow(2, start, end - start).copy_(v)
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)


# ----------------------------------------------------------------------------------------------
# The transformer block
# ----------------------------------------------------------------------------------------------

def attention_dtype(device_type: str, weight_dtype: torch.dtype, needs_grad: bool | None = None) -> torch.dtype:
    """The dtype attention (and so the KV cache) works in.

    On GPUs it is the autocast dtype; without autocast, the weights' dtype. Under autocast on a CPU it
    is whatever is fastest there (measured at this model's sizes on 2 cores): on CPUs with AMX, bf16
    when no gradient is needed (0.15 vs 0.30 ms per decoding step and layer; the frozen lower layers of a
    top-layers LoRA too) but float32 for forward + backward (8.4 vs 10.3 ms at 4 x 230 tokens); without
    AMX, float32 always (an AVX512-BF16 EPYC: 20 vs 120 us per decoding step).
    """
    if not torch.is_autocast_enabled(device_type):
        return weight_dtype
    if device_type != "cpu":
        return torch.get_autocast_dtype(device_type)
    needs_grad = torch.is_grad_enabled() if needs_grad is None else needs_grad
    autocast_dtype = torch.get_autocast_dtype(device_type)
    if autocast_dtype == torch.bfloat16 and cpu_has_amx() and not needs_grad:
        return torch.bfloat16
    return torch.float32


class Attention(nn.Module):
    """Multi-head causal self-attention with grouped-query heads and one fused QKV projection."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.qkv_sizes = config.qkv_sizes
        self.attention_qkv = nn.Linear(config.d_model, sum(self.qkv_sizes), bias=config.bias)
        self.attention_dense = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, is_causal: bool, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        c = self.config
        heads = self.attention_qkv(x).view(B, T, c.n_head + 2 * c.n_kv_head, c.head_dim)
        qk, v = heads.split([c.n_head + c.n_kv_head, c.n_kv_head], dim=2)
        dtype = attention_dtype(x.device.type, x.dtype, torch.is_grad_enabled() and heads.requires_grad)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotated together, (B, T, H + H_kv, D)
        qk = qk.to(dtype)  # and cast together: one copy instead of two
        q, k = qk.split([c.n_head, c.n_kv_head], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).to(dtype)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            if k.dtype != dtype:  # a cache made in another grad mode (see attention_dtype)
                k, v = k.to(dtype), v.to(dtype)
        # Autocast would put the float32 attention of a CPU back into bf16: switch it off around the kernel.
        keep_fp32 = dtype == torch.float32 and torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if keep_fp32 else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=c.n_kv_head != c.n_head)
        y = y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim)
        return self.attention_dense(y)


class MLP(nn.Module):
    """Feed-forward layer: SwiGLU (gate and up fused in ``mlp_fc1``) or GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        fc1_out = 2 * config.d_ff if self.swiglu else config.d_ff
        self.mlp_fc1 = nn.Linear(config.d_model, fc1_out, bias=config.bias)
        self.mlp_fc2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp_fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.mlp_fc2(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attention = Attention(config, layer_idx)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, is_causal, cache):
        x = x + self.attention(self.norm_1(x), rope, mask, is_causal, cache)
        return x + self.mlp(self.norm_2(x))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class GPT(nn.Module):
    """Decoder-only language model: embeddings, ``n_layer`` blocks, final norm, LM head."""

    def __init__(self, config: GPTConfig, name_or_path: str = "") -> None:
        super().__init__()
        self.config = config
        self.name_or_path = name_or_path  # where the pretrained weights came from (adapter files record it)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # The PEFT record. ``virtual_prompt`` is p-tuning's hook: a module whose forward(batch_size) returns
        # (B, n_virtual, d_model) embeddings. ``peft_configs`` lists the PEFT configs applied to this model
        # (``lora_tutorial.peft.add_adapter`` appends to it; ``save_adapters`` stores it).
        self.virtual_prompt: nn.Module | None = None
        self.peft_configs: list = []
        # Training memory: keep only each block's input and recompute the block in the backward pass.
        self.activations_checkpointing = False
        if config.position == "rope":
            cos, sin = rope_cache(config.head_dim, config.max_seq_len, config.rope_base)
            device = torch.empty(0).device  # the default device: where the parameters were just made
            if device.type != "meta":
                cos, sin = cos.to(device), sin.to(device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin_signed", sin, persistent=False)

    @property
    def n_virtual_tokens(self) -> int:
        return 0 if self.virtual_prompt is None else self.virtual_prompt.n_virtual_tokens

    # -- the pieces of forward ------------------------------------------------------------------

    def _embed(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Token embeddings, with the virtual prompt in front on the first call of a sequence."""
        x = self.wte(input_ids)
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()  # mixed precision: matmuls in bf16, the residual stream in float32
        first_call = cache is None or cache.length == 0
        if self.virtual_prompt is not None and first_call:
            prefix = self.virtual_prompt(x.shape[0]).to(x.dtype)
            x = torch.cat([prefix, x], dim=1)
        return x

    def _with_virtual(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Extend a (B, T) pad mask over the virtual prompt: virtual tokens are always visible."""
        n_virtual = self.n_virtual_tokens
        if not n_virtual:
            return attention_mask
        ones = attention_mask.new_ones(attention_mask.shape[0], n_virtual)
        return torch.cat([ones, attention_mask], dim=1)

    @staticmethod
    def _positions(pad_mask: torch.Tensor | None, batch: int, start: int, length: int,
                   device: torch.device) -> torch.Tensor:
        """Position of each new token: the number of real tokens before it (left padding is invisible)."""
        if pad_mask is None:
            return torch.arange(start, start + length, device=device).expand(batch, length)
        positions = pad_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, start:start + length]

    @staticmethod
    def _sdpa_mask(pad_mask: torch.Tensor, start: int, length: int) -> torch.Tensor:
        """Boolean (B, 1, T_new, T_all) mask: causal, no pads, and every query may see itself.

        The last rule only matters for pad queries, which would otherwise see nothing (a NaN row);
        their outputs are never used.
        """
        total = start + length
        q_pos = torch.arange(start, total, device=pad_mask.device)[:, None]
        k_pos = torch.arange(total, device=pad_mask.device)[None, :]
        visible = pad_mask[:, None, :].bool() & (k_pos <= q_pos)[None]
        visible = visible | (k_pos == q_pos)[None]
        return visible[:, None]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model) of the given (real, non-virtual) tokens.

        ``attention_mask`` (B, T_seen) marks real tokens with 1 and pads with 0 over every token seen
        so far (the prompt and the tokens generated since), as in HF transformers. ``None`` means no pads.
        """
        with autocast_like(self.wte.weight):  # bf16 weights: bf16 matmuls, float32 residual stream (precision.py)
            return self._hidden_states(input_ids, attention_mask, cache)

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       cache: KVCache | None) -> torch.Tensor:
        start = 0 if cache is None else cache.length
        x = self._embed(input_ids, cache)
        B, T, _ = x.shape
        total = start + T
        pad_mask = None
        if attention_mask is not None:
            pad_mask = self._with_virtual(attention_mask)
            if pad_mask.shape[1] != total:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, but "
                                 f"{total - self.n_virtual_tokens} have been seen (cache + input)")
        mask = None if pad_mask is None else self._sdpa_mask(pad_mask, start, T)
        # Without pads: a fresh sequence is plainly causal; a decoding step may see the whole cache.
        is_causal = mask is None and start == 0
        if mask is None and start > 0 and T > 1:
            mask = self._sdpa_mask(x.new_ones(B, total, dtype=torch.long), start, T)
        positions = self._positions(pad_mask, B, start, T, x.device)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        fast = None
        if cache is not None and cache.run_blocks is not None:
            fast = cache.run_blocks(self, x, positions, mask, is_causal)
        x = self._blocks(x, positions, mask, is_causal, cache) if fast is None else fast
        x = self.norm_f(x)
        if cache is not None:
            cache.length = total
        if self.n_virtual_tokens and start == 0:
            x = x[:, self.n_virtual_tokens:]
        return x

    def _blocks(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None) -> torch.Tensor:
        """Every block in turn (recomputed in the backward pass under activations checkpointing)."""
        rope = None
        if self.config.position == "rope":
            rope = (self.rope_cos[positions][:, :, None], self.rope_sin_signed[positions][:, :, None])  # (B, T, 1, D)
        for block in self.blocks:
            if self.activations_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, is_causal, cache, use_reentrant=False)  # recomputed in backward
            else:
                x = block(x, rope, mask, is_causal, cache)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) for the last position only when ``last_only``."""
        with autocast_like(self.wte.weight):
            h = self._hidden_states(input_ids, attention_mask, cache)
            if last_only:  # contiguous: a strided (B, 1, d) view would send the LM head down a slow batched path
                h = h[:, -1:].contiguous()
            return self.lm_head(h)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose label is not -100.

        ``labels`` are aligned with ``input_ids`` (the shift happens here). The LM head, the largest
        matrix multiply of this model (576 x 49152 per token), runs only at the labelled positions:
        for answer-only SFT that is a few tokens per example instead of hundreds.
        """
        targets = labels[:, 1:]
        keep = targets != -100
        if not keep.any():
            raise ValueError("loss(): every label is -100, so there is nothing to learn from this batch")
        with autocast_like(self.wte.weight):
            h = self._hidden_states(input_ids, attention_mask, None)
            logits = self.lm_head(h[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep])

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A KV cache sized for ``max_len`` real tokens (virtual tokens are added on top)."""
        param = self.wte.weight
        with autocast_like(self.wte.weight):
            dtype = attention_dtype(param.device.type, param.dtype)
        return KVCache(self.config, batch_size, max_len + self.n_virtual_tokens, dtype, param.device)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count, tied weights counted once; frozen weights stored quantized (``quantize.py``,
        ``qlora.py``: buffers, not parameters) count as the matrices they stand for."""
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        if not trainable_only:
            total += sum(m.in_features * m.out_features for m in self.modules()
                         if getattr(m, "weight_is_quantized", False))
        return total


__all__ = ["GPTConfig", "GPT", "KVCache", "RMSNorm"]
