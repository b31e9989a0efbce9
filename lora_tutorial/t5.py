r"""T5, the encoder-decoder transformer, with LoRA on its attention projections.

The NeMo tutorial says its PEFT methods apply to T5 as well. This file shows it, readable in one sitting
like ``model.py``: a T5 that loads Hugging Face ``T5ForConditionalGeneration`` directories (``load_t5``)
and takes the package's own ``LoRALinear`` (``add_lora_t5``); ``tests/test_t5.py`` checks both against
transformers and HF PEFT.

**Encoder-decoder.** SmolLM2 reads prompt and answer as one sequence. T5 splits the work: the *encoder*
reads the input with bidirectional attention, the *decoder* writes the output with causal self-attention
plus *cross-attention*: queries from the decoder, keys and values from the encoder's output::

    memory = encoder(embed(input_ids))                       # (B, S, d), computed once
    x = embed(decoder_input_ids)                             # [start] + answer[:-1], the "shifted" target
    per decoder block:  x = x + self_attn(norm(x))           # causal
                        x = x + cross_attn(norm(x), memory)  # looks at the input
                        x = x + ff(norm(x))
    logits = lm_head(final_norm(x))

How T5 differs from the Llama-style ``GPT`` of ``model.py`` (neither has biases):

==============  ==============================  ==============================================
                SmolLM2 (``model.py``)          T5
==============  ==============================  ==============================================
positions       RoPE rotates queries and keys   a learned bias per head and relative-distance
                                                *bucket*, added to the attention scores
score scaling   q·k / sqrt(head_dim)            none (folded into the initialisation of ``q``)
norm            RMSNorm                         "T5LayerNorm": the same RMSNorm, eps 1e-6
feed-forward    SwiGLU                          T5: ``wo(relu(wi x))``; v1.1 / flan (GeGLU):
                                                ``wo(gelu_tanh(wi_0 x) * wi_1 x)``
LM head         tied to the embedding           T5: tied, its input scaled by d_model**-0.5;
                                                v1.1 / flan: its own matrix, no rescaling
==============  ==============================  ==============================================

**Relative position buckets.** T5 has no position embeddings. Each attention score gets a scalar
``bias[bucket(key_pos - query_pos), head]`` from a small learned table (32 buckets x n_head): a bucket per
near distance, log-spaced buckets for far ones. In the encoder (16 buckets per direction) distances 0..7
are exact, then 8-11, 12-15, 16-22, 23-31, 32-45, 46-63, 64-90, and 91+ share the last bucket; the
decoder only looks back and spends all 32 on the past. The first block of each stack owns the table and
every block reuses its bias; cross-attention has none. As only position *differences* matter, inputs may
be padded on either side. Bias and mask make one float tensor for
``F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)``.

**LoRA.** The attention projections keep HF's names ``q``, ``k``, ``v``, ``o`` (separate, not fused as in
``model.py``). ``add_lora_t5(model, rank, alpha, targets=("q", "v"))`` wraps them in every encoder
self-attention, decoder self-attention and decoder cross-attention, as HF PEFT's
``LoraConfig(target_modules=["q", "v"])`` does.

Not here: a KV cache (``generate`` re-runs the decoder over its prefix), dropout (T5 trains with 0.1;
LoRA has its own), float16 (T5 activations overflow it; ``load_t5`` gives float32, autocast to bfloat16).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from .files import atomic_path
from .model import RMSNorm
from .peft.checkpoint import AdapterCheckpointError, adapter_state_dict
from .peft.inject import adapter_parameters
from .peft.lora import LoRALinear, lora_modules
from .peft.wrapping import replace_module, unwrap
from .checkpoint_names import CheckpointError

FEED_FORWARD = ("relu", "gated-gelu")
ATTENTION_PROJECTIONS = ("q", "k", "v", "o")


@dataclass
class T5Config:
    """Shape and flavour of a T5. The defaults are t5-small (original T5: ReLU, tied and rescaled head)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # size of one head; n_head * d_kv need not equal d_model in T5
    d_ff: int = 2048
    n_layer: int = 6  # encoder blocks
    n_decoder_layer: int = 6
    n_head: int = 8
    num_buckets: int = 32
    max_distance: int = 128
    feed_forward_proj: str = "relu"  # "relu" (original T5) | "gated-gelu" (T5 v1.1, flan-t5)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True  # lm_head is the embedding matrix
    scale_decoder_outputs: bool = True  # multiply by d_model**-0.5 before the head (original T5)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # T5 starts every answer with the pad token

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r}; expected one of {FEED_FORWARD}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], has_lm_head: bool) -> "T5Config":
        """Our config from a HF ``config.json`` dict; ``has_lm_head``: the weights hold their own head. Old configs
        had one switch, ``tie_word_embeddings`` (tied *and* rescaled, default true). transformers 5 writes ``true``
        for every T5 and ``scale_decoder_outputs`` apart: an untied head only shows as a tensor in the file."""
        rescale = hf.get("tie_word_embeddings", True) and hf.get("model_type") != "mt5"  # mT5 never rescales
        eos = hf.get("eos_token_id", 1)
        return cls(vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
                   n_layer=hf["num_layers"], n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"],
                   n_head=hf["num_heads"], num_buckets=hf.get("relative_attention_num_buckets", 32),
                   max_distance=hf.get("relative_attention_max_distance", 128),
                   feed_forward_proj=hf.get("feed_forward_proj", "relu"), norm_eps=hf.get("layer_norm_epsilon", 1e-6),
                   tie_embeddings=not has_lm_head, scale_decoder_outputs=hf.get("scale_decoder_outputs", rescale),
                   pad_token_id=hf.get("pad_token_id", 0), eos_token_id=eos[0] if isinstance(eos, list) else eos,
                   decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)))


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket index in [0, num_buckets) of each ``key_pos - query_pos`` (the operations of Mesh TensorFlow
    and HF, in the same order, so that borderline distances fall into the same bucket)."""
    bucket = torch.zeros_like(relative)
    if bidirectional:  # keys to the right of the query use the upper half of the buckets
        num_buckets //= 2
        bucket = (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:  # the decoder only looks back: distance into the past (future keys are masked anyway)
        relative = -torch.min(relative, torch.zeros_like(relative))
    max_exact = num_buckets // 2  # half of the buckets: one per distance 0 .. max_exact - 1
    # The other half log-spaced: max_exact -> max_exact, max_distance -> num_buckets (log(0) is never used).
    large = max_exact + (torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return bucket + torch.where(relative < max_exact, relative, large)


class T5Attention(nn.Module):
    """Multi-head attention with separate ``q``, ``k``, ``v``, ``o`` projections and no score scaling."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.n_head, self.d_kv = config.n_head, config.d_kv
        inner = config.n_head * config.d_kv
        self.q, self.k, self.v = (nn.Linear(config.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Queries from ``x`` (B, T, d), keys and values from ``kv`` (``x`` itself, or the encoder's output);
        ``bias`` (B or 1, H or 1, T, S) holds position bias + mask, added to the scores."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.d_kv).transpose(1, 2)  # (B, H, T, d_kv)
        k = self.k(kv).view(B, -1, self.n_head, self.d_kv).transpose(1, 2)  # (B, H, S, d_kv)
        v = self.v(kv).view(B, -1, self.n_head, self.d_kv).transpose(1, 2)
        # scale=1.0: T5 never divides by sqrt(d_kv); its q weights were initialised smaller instead.
        mask = None if bias is None else bias.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)  # not -inf in bf16
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.d_kv))


class T5FeedForward(nn.Module):
    """``wo(relu(wi x))`` (original T5) or ``wo(gelu_tanh(wi_0 x) * wi_1 x)`` (T5 v1.1 / flan: gated GELU)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gated = config.feed_forward_proj == "gated-gelu"
        if self.gated:  # wi_0 through the activation, times wi_1 (the "gate" of a GLU)
            self.wi_0, self.wi_1 = (nn.Linear(config.d_model, config.d_ff, bias=False) for _ in range(2))
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:  # HF's "gelu_new" is the tanh approximation of GELU
            return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))
        return self.wo(F.relu(self.wi(x)))


class T5Block(nn.Module):
    """Pre-norm residual block: self-attention, cross-attention (decoder only), feed-forward."""

    def __init__(self, config: T5Config, cross_attention: bool) -> None:
        super().__init__()
        self.self_attn_norm = RMSNorm(config.d_model, config.norm_eps)  # = HF's T5LayerNorm
        self.self_attn = T5Attention(config)
        if cross_attention:
            self.cross_attn_norm = RMSNorm(config.d_model, config.norm_eps)
            self.cross_attn = T5Attention(config)
        self.ff_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ff = T5FeedForward(config)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, memory: torch.Tensor | None = None,
                cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.self_attn_norm(x)
        x = x + self.self_attn(h, h, self_bias)
        if memory is not None:  # the encoder's output is already normalised (its stack's final_norm)
            x = x + self.cross_attn(self.cross_attn_norm(x), memory, cross_bias)
        return x + self.ff(self.ff_norm(x))


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention): blocks + final norm."""

    def __init__(self, config: T5Config, n_layer: int, is_decoder: bool) -> None:
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        # One bias table per stack (HF keeps it in block 0's self-attention): (bucket) -> one number per head.
        self.relative_bias = nn.Embedding(config.num_buckets, config.n_head)
        self.blocks = nn.ModuleList(T5Block(config, cross_attention=is_decoder) for _ in range(n_layer))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """(1, n_head, length, length): the learned bias of each (query, key) pair's distance bucket."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], not self.is_decoder,
                                           self.config.num_buckets, self.config.max_distance)
        return self.relative_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, T, d) embeddings, ``mask`` (B, T) 1 on real tokens; the decoder also gets the encoder's
        output ``memory`` (B, S, d) and mask (B, S). Bias and masks are computed once for all blocks."""
        T = x.shape[1]  # allowed: (B, 1, 1, T) to hide pad *keys*; the decoder also hides the future
        allowed = torch.ones(T, dtype=torch.bool, device=x.device) if mask is None else mask.bool()[:, None, None, :]
        if self.is_decoder:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # Masked scores get the most negative float, not -inf: a query with no key left (a pad) gets
        # uniform weights instead of NaN. Cross-attention has no position bias, only the encoder's pad mask.
        masked = torch.finfo(self.relative_bias.weight.dtype).min
        self_bias = torch.where(allowed, self.position_bias(T, x.device), masked)
        cross_bias = None if memory_mask is None else torch.where(memory_mask.bool()[:, None, None, :], 0.0, masked)
        for block in self.blocks:
            x = block(x, self_bias, memory, cross_bias)
        return self.final_norm(x)


class T5(nn.Module):
    """Shared embedding, encoder, decoder and LM head: ``T5(config)(input_ids, decoder_input_ids) -> logits``."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # encoder, decoder (and maybe head)
        self.encoder = T5Stack(config, config.n_layer, is_decoder=False)
        self.decoder = T5Stack(config, config.n_decoder_layer, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.shared.weight
        self.lora: dict[str, Any] | None = None  # add_lora_t5's settings (saved with the adapter)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output ("memory") for ``input_ids`` (B, S): (B, S, d_model)."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, attention_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of the decoder over ``memory``; ``attention_mask`` is the *encoder's* mask."""
        h = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, memory, attention_mask)
        if self.config.scale_decoder_outputs:  # the tied embedding has std ~1: keep the logits in range
            h = h * self.config.d_model ** -0.5
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask,
                           decoder_attention_mask)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding: (B, 1 + new) ids starting with the start token, pad after each row's EOS (as HF).
        The encoder runs once; without a KV cache the decoder re-reads its whole prefix at every step."""
        c, memory = self.config, self.encode(input_ids, attention_mask)
        out = torch.full_like(input_ids[:, :1], c.decoder_start_token_id)
        done = torch.zeros_like(out[:, 0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            next_id = self.decode(out, memory, attention_mask)[:, -1].argmax(-1)
            next_id = next_id.masked_fill(done, c.pad_token_id)
            out = torch.cat([out, next_id[:, None]], dim=1)
            done |= next_id == c.eos_token_id
            if done.all():
                break
        return out


# Tensors HF writes or keeps but never uses: tied copies of shared.weight, and a cross-attention bias table.
_HF_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
               "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def t5_hf_name(name: str) -> str:
    """Our parameter name -> HF's: ``decoder.blocks.1.cross_attn.q.weight`` ->
    ``decoder.block.1.layer.1.EncDecAttention.q.weight``."""
    match = re.fullmatch(r"(encoder|decoder)\.(?:blocks\.(\d+)\.)?(\w+)\.(.+)", name)
    if match is None:
        return name  # shared.weight, lm_head.weight
    stack, block, part, leaf = match.groups()
    ff = f"layer.{2 if stack == 'decoder' else 1}"  # HF numbers a block's sub-layers: self-attn, (cross-attn,) ff
    hf_part = {"self_attn": "layer.0.SelfAttention", "self_attn_norm": "layer.0.layer_norm",
               "cross_attn": "layer.1.EncDecAttention", "cross_attn_norm": "layer.1.layer_norm",
               "ff": f"{ff}.DenseReluDense", "ff_norm": f"{ff}.layer_norm", "final_norm": "final_layer_norm",
               "relative_bias": "block.0.layer.0.SelfAttention.relative_attention_bias"}[part]
    return f"{stack}.{hf_part}.{leaf}" if block is None else f"{stack}.block.{block}.{hf_part}.{leaf}"


def load_t5(directory: str | Path) -> tuple[T5, Tokenizer | None]:
    """``model, tokenizer = load_t5(dir)`` from ``config.json`` + ``*.safetensors`` (never pickle files); the
    tokenizer is ``tokenizers.Tokenizer`` of ``tokenizer.json``, or None. Every problem (missing file, other
    ``model_type``, missing, misshapen or unexpected tensor) is one ``CheckpointError`` naming file and tensor."""
    directory = Path(directory)
    config_file = directory / "config.json"
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        reason = "no such file" if not config_file.is_file() else f"not readable JSON ({err})"
        raise CheckpointError(f"{config_file}: {reason}; load_t5 expects a Hugging Face T5 directory "
                              "(config.json + *.safetensors)") from None
    if hf.get("model_type") not in ("t5", "mt5"):
        raise CheckpointError(f"{config_file}: model_type {hf.get('model_type')!r} is not supported by load_t5; "
                              "expected 't5' or 'mt5' (the T5ForConditionalGeneration layout)")
    files = sorted(directory.glob("*.safetensors"))
    if not files:  # pickle files (*.bin) are never loaded: unpickling can run arbitrary code
        pickles = ", ".join(sorted(p.name for p in directory.glob("*.bin"))) or "none"
        raise CheckpointError(f"{directory}: no *.safetensors weights (pickle files, never loaded: {pickles}); "
                              "re-save with save_pretrained(dir, safe_serialization=True)")
    raw, origin = {}, {}  # every tensor, and the file it came from (a large model has several shards)
    for file in files:
        try:
            tensors = load_file(file)
        except Exception as err:  # noqa: BLE001 - safetensors raises several error types
            raise CheckpointError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err})") from None
        raw.update(tensors)
        origin.update(dict.fromkeys(tensors, file))
    # Own head: the config says untied, or the file holds one that is not a copy of the embedding (see from_hf).
    head, shared = raw.get("lm_head.weight"), raw.get("shared.weight", torch.empty(0))
    has_head = hf.get("tie_word_embeddings", True) is False or not (head is None or torch.equal(head, shared))
    try:
        config = T5Config.from_hf(hf, has_lm_head=has_head)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: unsupported T5 config ({type(err).__name__}: {err})") from None
    with torch.device("meta"):  # shapes only, no memory and no random init: the file provides every tensor
        model = T5(config)
    state = {}
    for name, param in model.named_parameters():  # a tied head is listed once, as shared.weight
        key = t5_hf_name(name)
        if key not in raw:
            raise CheckpointError(f"{directory}: tensor {key!r} is missing from {', '.join(f.name for f in files)}")
        tensor = raw.pop(key)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{origin[key]}: tensor {key!r} has shape {tuple(tensor.shape)}; config.json "
                                  f"implies {tuple(param.shape)}")
        state[name] = tensor.float()  # for bf16 speed, run under torch.autocast (precision.py says why)
    extra = sorted(k for k in raw if k not in _HF_IGNORED and k != "lm_head.weight")
    if extra:
        raise CheckpointError(f"{origin[extra[0]]}: unexpected tensors {extra[:5]} (not a T5 checkpoint?)")
    model.load_state_dict(state, strict=False, assign=True)  # assign: the meta tensors become the file's
    if config.tie_embeddings:  # assign replaced shared.weight: tie the head to the new tensor
        model.lm_head.weight = model.shared.weight
    tokenizer_file = directory / "tokenizer.json"
    return model.eval(), Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.is_file() else None


def attention_targets(model: T5, targets: Sequence[str]) -> list[str]:
    """Names of the chosen projections in every self- and cross-attention, encoder first."""
    if not targets or any(t not in ATTENTION_PROJECTIONS for t in targets):
        raise ValueError(f"LoRA targets {list(targets)}: expected some of {ATTENTION_PROJECTIONS}")
    return [f"{name}.{t}" for name, module in model.named_modules() if isinstance(module, T5Attention)
            for t in targets]


def add_lora_t5(model: T5, rank: int, alpha: float, targets: Sequence[str] = ("q", "v"),
                dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Freeze ``model``, wrap the ``targets`` of every attention in ``LoRALinear``; return the wrapped names.
    (``LoraPEFTConfig`` names ``model.py``'s fused layers, so it does not apply here.)"""
    if model.lora is not None or lora_modules(model):
        raise ValueError("add_lora_t5: the model already has LoRA layers")
    names = attention_targets(model, targets)
    model.requires_grad_(False)
    for name in names:  # B = 0: the wrapped model computes exactly what the base did
        replace_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, rslora))
    model.lora = {"rank": rank, "alpha": alpha, "targets": list(targets), "dropout": dropout, "rslora": rslora}
    return names


ADAPTER_FORMAT = "lora_tutorial.t5_lora/1"


def t5_base_fingerprint(model: T5) -> dict[str, Any]:
    """The base's config and a SHA-256 of some embedding rows (rounded to bf16, so fp32 and bf16 agree)."""
    rows = model.shared.weight[:16].detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
    return {"config": asdict(model.config), "sha256": hashlib.sha256(rows.numpy().tobytes()).hexdigest()}


def save_t5_lora(model: T5, path: str | Path) -> Path:
    """Write the LoRA tensors (``adapter_state_dict``, keyed by module name) and settings to one safetensors
    file. ``peft.save_adapters`` cannot be reused: its metadata and base fingerprint are ``GPT``'s."""
    if model.lora is None:
        raise ValueError("save_t5_lora: the model has no LoRA layers (call add_lora_t5 first)")
    tensors = {key: t.to("cpu").contiguous() for key, t in adapter_state_dict(model).items()}
    info = {"format": ADAPTER_FORMAT, "lora": model.lora, "base": t5_base_fingerprint(model)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "lora_tutorial_t5": json.dumps(info)})
    return Path(path)


def load_t5_lora(model: T5, path: str | Path, check_base: bool = True) -> list[str]:
    """Load ``save_t5_lora``'s file into ``model`` (adding LoRA layers if it has none); return their names.
    Any mismatch raises ``AdapterCheckpointError`` before the model is changed."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {})["lora_tutorial_t5"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors / json / a missing key
        reason = ("no such adapter file" if not path.is_file() else
                  f"not a T5 LoRA file written by save_t5_lora ({type(err).__name__}: {err})")
        raise AdapterCheckpointError(f"{path}: {reason}") from None
    settings = info.get("lora")
    if info.get("format") != ADAPTER_FORMAT:
        raise AdapterCheckpointError(f"{path}: format {info.get('format')!r}; this version reads {ADAPTER_FORMAT!r}")
    if check_base and info["base"] != t5_base_fingerprint(model):
        raise AdapterCheckpointError(f"{path}: these adapters were trained on another base model (config or "
                                     "weights differ); pass check_base=False to load them anyway")
    if model.lora is not None and model.lora != settings:
        raise AdapterCheckpointError(f"{path}: LoRA settings {settings} differ from the model's {model.lora}")
    names, rank, expected = attention_targets(model, settings["targets"]), settings["rank"], {}
    for name in names:  # shapes follow from the base layers: A (rank, in), B (out, rank)
        base = unwrap(model.get_submodule(name))
        expected[f"{name}.lora_A"], expected[f"{name}.lora_B"] = (rank, base.in_features), (base.out_features, rank)
    found = {key: tuple(t.shape) for key, t in tensors.items()}
    wrong = sorted(key for key in expected.keys() | found.keys() if found.get(key) != expected.get(key))
    if wrong:
        raise AdapterCheckpointError(f"{path}: {len(wrong)} adapter tensors do not fit the model, e.g. {wrong[0]}: "
                                     f"{found.get(wrong[0], 'missing')} in the file, "
                                     f"{expected.get(wrong[0], 'not expected')} in the model")
    if model.lora is None:
        add_lora_t5(model, **settings)
    with torch.no_grad():
        for key, param in adapter_parameters(model).items():
            param.copy_(tensors[key])
    return names


__all__ = ["T5Config", "T5", "T5Attention", "relative_position_bucket", "t5_hf_name", "load_t5",
           "add_lora_t5", "attention_targets", "save_t5_lora", "load_t5_lora"]
