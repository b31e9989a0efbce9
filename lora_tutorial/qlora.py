r"""QLoRA: LoRA on a base model whose frozen matrices stay quantized (``model.quantized_base``).

**What QLoRA is.** Dettmers et al. (2023), *QLoRA: Efficient Finetuning of Quantized LLMs*, observed that
LoRA never updates the base weights, so they need not be stored in a format one can train: they only
have to be *multiplied by*. QLoRA keeps them in 4 bits (their "NF4" format, plus double-quantized scales
and paged optimizer states) and trains the LoRA matrices in 16/32-bit on top. At each matmul a block of
4-bit codes is turned back into numbers ("dequantized"), used, and thrown away; the gradient flows
*through* the frozen weight to the adapters below (``dL/dx = dL/dy · W``) but never *into* it. That let
them fine-tune a 65B-parameter model on one 48 GB GPU.

**Why it is exact here.** QLoRA rounds a 16-bit model to 4 bits, which changes the model a little. Our
base is different: SmolLM2-135M-Instruct *ships* in 4 bits. Its GGUF file stores every projection matrix
as Q4_1 blocks, and ``load_base_model`` turns them into float32 numbers once (``pretrained.py``): the
model we fine-tune already *is* ``w = d·q + m`` for every weight. Keeping the file's own blocks and
dequantizing them at each matmul therefore changes no weight value at all, only *when* the numbers are
computed and how much memory holds them. The float32 logits of a ``q4_1`` model equal the float32 base
model's bit for bit, and so do the bf16 ones (``tests/test_qlora.py``): same operands, same kernels.

**The Q4_1 format.** Each row of a matrix is cut into blocks of 32 consecutive weights. A block is 20
bytes: an fp16 scale ``d``, an fp16 minimum ``m`` and 32 codes ``q`` in 0..15 packed two per byte (byte
``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble); weight ``= d·q + m``.
That is 5 bits per weight. ``Q4_1Linear`` keeps those bytes verbatim, one (out, in/32·20) uint8 buffer.

Memory of the 106.2 M projection weights (30 layers x QKV, output, gate|up, down)::

    float32   4     bytes/weight   425 MB
    bf16      2                    212 MB
    int8      1 (+ a scale/row)    106 MB     QInt8Linear
    Q4_1      0.625                 66 MB     Q4_1Linear

**The backward pass.** A plain ``F.linear(x, W)`` saves ``W`` for its backward (it needs it for the input
gradient). With a freshly dequantized ``W`` that would keep a dense copy of every matrix alive from the
forward to the backward pass: all the memory QLoRA saves. ``DequantizedMatmul`` (a custom
``torch.autograd.Function``) saves nothing and dequantizes again in ``backward``: a little compute
traded for memory, like activation checkpointing. There is no weight gradient: the layer is frozen.
Under CPU bf16 autocast (``precision.py``) the matrix is dequantized to bf16 and the product is the
one autocast would have made; in float32 everything stays float32.

**What stays unquantized** (``quantize_base`` touches the four block projections only):

* the token embedding, which is also the tied LM head (28.3 M weights; Q8_0 in the file): it stays as
  loaded (bf16 in a bf16 run: 57 MB). It is used two ways, as a row lookup and as the largest matmul
  (576 x 49,152 per labelled token); Q8_0 is a different block format, and 8-bit blocks would save
  only ~27 MB more;
* the RMSNorm gains (61 vectors of 576, float32 in the file): tiny, and precision.py keeps them float32;
* the LoRA matrices: they are trained, so they stay float32 (precision.py, rule 3).

**int8.** ``quantized_base: int8`` quantizes each frozen matrix again, per output row with the absmax
recipe of ``quantize.py`` (int8 codes and one bf16 scale per row). That is a *second* rounding on top
of Q4_1, so the model changes slightly (within half a quantization step per weight), but it works for
any base, Hugging Face directories included, at 1 byte per weight.

Usage (before or after ``add_adapter``: the quantized layers are ``nn.Linear`` subclasses, so LoRA wraps
them like any linear layer)::

    model, tokenizer = load_base_model(dtype=torch.bfloat16)   # bf16: the embedding's dtype
    quantize_base(model, "q4_1")                               # blocks re-read from the GGUF file
    add_adapter(model, LoraPEFTConfig(cfg.model))

A quantized layer's ``weight`` is the dequantized (out, in) float32 matrix, computed on each access and
*read-only*: what LoRA reads (DoRA's norms, PiSSA's SVD, adapter fingerprints) works, but anything that
writes into it -- merging LoRA, PiSSA/OLoRA's residual -- raises ``QuantizedWeightError`` before changing
anything. To merge a QLoRA-trained adapter, load the float base, ``load_adapters`` and merge there: with
``q4_1`` it is the very base the adapter was trained on (same weights, same base fingerprint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import GPT
from .peft.config import TARGET_PARENTS
from .peft.lora import LoRALinear
from .peft.wrapping import is_peft_module, target_name
from .precision import matmul_dtype
from .checkpoint_names import GGUF, CheckpointError, llama_names, unpermute_rope_rows
from .pretrained import resolve_model_path
from .quantize import Int8Linear

KINDS = ("int8", "q4_1")
PROJECTIONS = tuple(TARGET_PARENTS)  # attention_qkv, attention_dense, mlp_fc1, mlp_fc2
Q4_1_BLOCK = 32  # weights per block
Q4_1_BYTES = 20  # bytes per block: fp16 d, fp16 m, 16 bytes of packed 4-bit codes


class QuantizedWeightError(ValueError):
    """Something tried to write into the weight of a quantized layer (e.g. merging LoRA into it)."""


# ----------------------------------------------------------------------------------------------
# The matmul: dequantize in forward, and again in backward
# ----------------------------------------------------------------------------------------------

class DequantizedMatmul(torch.autograd.Function):
    """``y = x @ W.T`` with ``W = layer.dequantized(dtype)``, rebuilt in backward instead of saved.

    Nothing is saved for backward (the layer's own buffers are already in memory, and ``ctx`` only keeps a
    reference to the layer), so no dense (out, in) matrix outlives the call that made it. Only the input
    gradient is computed, ``dL/dx = dL/dy @ W``: the layer is frozen.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        dtype = matmul_dtype(x.device.type, x.dtype)
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        return F.linear(x.to(dtype), layer.dequantized(dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.dequantized(ctx.dtype)
        grad_x = torch.matmul(grad_y.to(ctx.dtype), w)  # (.., out) @ (out, in): what F.linear's backward does
        return grad_x.to(ctx.x_dtype), None


class ReadOnlyWeight(torch.Tensor):
    """A dequantized weight handed out by ``QuantizedLinear.weight``: any op that writes into it raises.

    Reads behave as on a plain tensor (and return plain tensors). The matrix is a fresh copy, so a write
    would silently change nothing; failing loudly is what keeps e.g. ``merge_lora`` from marking a layer
    "merged" while its weight stayed the same.
    """

    _WRITES = {"__setitem__", "__set__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
               "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.startswith("_") and name != "requires_grad_") or name in cls._WRITES
        if (in_place and args and isinstance(args[0], cls)) or isinstance(kwargs.get("out"), cls):
            raise QuantizedWeightError(
                f"{name}: this weight is dequantized from a quantized base layer and cannot be written (merging "
                "LoRA into it, or PiSSA/OLoRA's residual, needs a float base: load_base_model() without "
                "quantize_base, then load_adapters / merge_lora there)")
        with torch._C.DisableTorchFunctionSubclass():  # plain tensors out: results are not read-only
            return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# The layers
# ----------------------------------------------------------------------------------------------

class QuantizedLinear(nn.Linear):
    """A frozen linear layer whose weight is stored quantized and dequantized at each matmul.

    It subclasses ``nn.Linear`` (as bitsandbytes' ``Linear4bit`` does) so that LoRA and the other PEFT
    wrappers accept it as their base; but it has no parameters: its storage is buffers, and ``weight`` is
    a read-only property. Subclasses define ``dequantized(dtype)``.
    """

    kind = ""
    weight_is_quantized = True  # GPT.num_parameters counts it as the (out, in) matrix it stands for

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) matrix this layer stands for, in ``dtype`` (a new tensor at every call)."""
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) float32 matrix, computed now and read-only (``ReadOnlyWeight``)."""
        return self.dequantized(torch.float32).as_subclass(ReadOnlyWeight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = DequantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def storage_bytes(self) -> int:
        """Bytes of the quantized storage (buffers), bias included."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.kind}, frozen")


def dequantize_q4_1(blocks: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (rows, in_features) matrix of Q4_1 ``blocks`` (rows, in_features/32 · 20 bytes): ``w = d·q + m``.

    Computed in float32 as ``(q * d) + m``, the very operations of ``gguf.quants`` (which our loader
    uses), so the result is bit-identical to the loader's weights; then rounded once to ``dtype``.
    """
    rows = blocks.shape[0]
    b = blocks.view(rows, -1, Q4_1_BYTES)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # (rows, n_blocks, 1)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    packed = b[..., 4:]  # (rows, n_blocks, 16)
    q = torch.empty(rows, b.shape[1], Q4_1_BLOCK, dtype=torch.uint8, device=blocks.device)
    torch.bitwise_and(packed, 0x0F, out=q[..., :16])  # low nibbles: weights 0..15 of the block
    torch.bitwise_right_shift(packed, 4, out=q[..., 16:])  # high nibbles: weights 16..31
    w = torch.mul(q, d).add_(m).view(rows, in_features)  # uint8 * float32 -> float32: q converts exactly
    return w if dtype == torch.float32 else w.to(dtype)


def quantize_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks of a float (out, in) matrix, with the gguf package's own quantizer (the llama.cpp recipe).

    Only for building test layers from arbitrary weights: ``quantize_base`` never re-quantizes, it takes
    the blocks from the GGUF file.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return torch.from_numpy(quantize(weight.detach().float().numpy(), GGMLQuantizationType.Q4_1))


class Q4_1Linear(QuantizedLinear):
    """A frozen linear layer stored as the GGUF's Q4_1 blocks (``blocks``: uint8, (out, in/32 · 20))."""

    kind = "q4_1"

    def __init__(self, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None = None) -> None:
        if in_features % Q4_1_BLOCK:
            raise ValueError(f"Q4_1 needs in_features divisible by {Q4_1_BLOCK}, got {in_features}")
        expected = (blocks.shape[0], in_features // Q4_1_BLOCK * Q4_1_BYTES)
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != expected:
            raise ValueError(f"Q4_1 blocks for in_features={in_features} must be uint8 of shape {expected}, got "
                             f"{blocks.dtype} {tuple(blocks.shape)}")
        super().__init__(in_features, blocks.shape[0], bias)
        self.register_buffer("blocks", blocks.contiguous())

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_q4_1(self.blocks, self.in_features, dtype)


class QInt8Linear(QuantizedLinear):
    """A frozen linear layer stored as int8 rows + one bf16 scale per row (``quantize.Int8Linear``'s recipe),
    multiplied through ``DequantizedMatmul`` so that gradients reach the adapters above it."""

    kind = "int8"

    def __init__(self, linear: nn.Linear) -> None:
        reference = Int8Linear(linear)  # quantize.py does the rounding: one recipe for both int8 layers
        super().__init__(linear.in_features, linear.out_features, reference.bias)
        self.register_buffer("weight_int8", reference.weight_int8)
        self.register_buffer("scale", reference.scale)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # int8 x bf16 scale is exact in float32 (7 + 8 significant bits); one rounding to ``dtype`` after.
        w = self.weight_int8.float() * self.scale.float()[:, None]
        return w if dtype == torch.float32 else w.to(dtype)


# ----------------------------------------------------------------------------------------------
# Quantizing a loaded model
# ----------------------------------------------------------------------------------------------

def _projection_sites(model: GPT) -> list[tuple[str, nn.Module, str, nn.Module, list[nn.Module]]]:
    """(name, owner, attribute, layer, wrappers) for every block projection: the innermost layer under any
    PEFT wrappers, and where it hangs (``owner.<attribute>``)."""
    sites = []
    for i in range(len(model.blocks)):
        for target in PROJECTIONS:
            name = target_name(i, target)
            parent_name, _, attribute = name.rpartition(".")
            owner, layer, wrappers = model.get_submodule(parent_name), model.get_submodule(name), []
            while is_peft_module(layer) and hasattr(layer, "base"):
                wrappers.append(layer)
                owner, attribute, layer = layer, "base", layer.base
            sites.append((name, owner, attribute, layer, wrappers))
    return sites


def _read_q4_1_blocks(model: GPT, gguf_path: str | Path | None) -> dict[str, torch.Tensor]:
    """Our projection name (``blocks.3.mlp.mlp_fc1``) -> its Q4_1 blocks, fused and un-permuted as the loader does.

    Tensor bytes are read with plain file reads (``np.fromfile``), not through the reader's memory map, so
    the file's pages never count towards this process's resident memory.
    """
    from gguf import GGUFReader

    source = gguf_path if gguf_path is not None else model.name_or_path
    if not source:
        raise ValueError("quantize_base(kind='q4_1') needs the GGUF file the base was loaded from: pass gguf_path")
    path = resolve_model_path(source)
    if not path.is_file():
        raise ValueError(f"quantize_base(kind='q4_1'): {path} is not a GGUF file (Q4_1 blocks come from the GGUF "
                         "file itself; for other bases use kind='int8')")
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    config = model.config
    heads = {"attn_q.weight": config.n_head, "attn_k.weight": config.n_kv_head}
    blocks = {}
    for ours, theirs in llama_names(config, GGUF).items():
        module_name = ours.removesuffix(".weight")
        if module_name.rpartition(".")[2] not in PROJECTIONS:
            continue
        parts = []
        for name in theirs:
            if name not in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} is missing")
            t = tensors[name]
            if t.tensor_type.name != "Q4_1":
                raise CheckpointError(f"{path}: tensor {name} is {t.tensor_type.name}, not Q4_1; use kind='int8'")
            raw = np.fromfile(path, dtype=np.uint8, count=int(t.n_bytes), offset=int(t.data_offset))
            part = torch.from_numpy(raw).view(int(t.shape[1]), -1)  # GGUF shapes are (in, out): rows = out
            n_head = heads.get(name.split(".", 2)[2])  # blk.{i}.attn_q.weight -> attn_q.weight
            if n_head:  # a permutation of whole rows: applies to the block rows as to the float rows
                part = unpermute_rope_rows(part, n_head)
            parts.append(part)
        blocks[module_name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return blocks


def quantize_base(model: GPT, kind: str | None, gguf_path: str | Path | None = None, verify: bool = True) -> int:
    """Replace the frozen block projections of ``model`` by ``Q4_1Linear`` or ``QInt8Linear``; return how many.

    ``kind``: ``None`` (do nothing), ``"q4_1"`` (the GGUF's own blocks, re-read from ``gguf_path``,
    by default the file ``model.name_or_path`` names) or ``"int8"`` (per-row absmax of the weight as
    loaded). Works before or after ``add_adapter`` (the layer under a PEFT wrapper is replaced); the
    embedding / tied LM head and the norms stay as loaded (module docstring). Layers already quantized
    with the same ``kind`` are left alone.

    ``verify`` (q4_1): check that every block matrix dequantizes to exactly the weight it replaces (in
    that weight's dtype), so a different GGUF file or a modified base is an error, not a silent change.
    Every new layer is built (and checked) before the first one is swapped in: on an error the model is
    unchanged. Refused: LoRA merged into the weight (unmerge first), and PiSSA / OLoRA, whose frozen weight
    is a residual ``W - s·B0 A0`` that later loads and merges must be able to write.
    """
    if kind is None:
        return 0
    if kind not in KINDS:
        raise ValueError(f"quantize_base: unknown kind {kind!r}; expected one of {', '.join(KINDS)} (or None)")
    sites = _projection_sites(model)
    todo = []
    for name, owner, attribute, layer, wrappers in sites:
        if isinstance(layer, QuantizedLinear):
            if layer.kind != kind:
                raise ValueError(f"quantize_base: {name} is already quantized as {layer.kind}, not {kind}")
            continue
        if type(layer) is not nn.Linear:
            raise TypeError(f"quantize_base: {name} is a {type(layer).__name__}, expected an nn.Linear")
        for w in wrappers:
            if isinstance(w, LoRALinear) and w.merged:
                raise ValueError(f"quantize_base: LoRA is merged into {name}; call unmerge_lora(model) first")
            if isinstance(w, LoRALinear) and w.lora_A0 is not None:
                raise ValueError(f"quantize_base: {name} holds a {w.init_lora_weights} residual W - s·B0 A0, which "
                                 "cannot stay writable once quantized; use init_lora_weights=default with QLoRA")
        todo.append((name, owner, attribute, layer))
    blocks = _read_q4_1_blocks(model, gguf_path) if kind == "q4_1" and todo else {}
    new_layers = []
    for name, owner, attribute, layer in todo:
        if kind == "int8":
            new = QInt8Linear(layer)
        else:
            if name not in blocks or blocks[name].shape[0] != layer.out_features:
                raise CheckpointError(f"quantize_base: the GGUF file has no Q4_1 matrix for {name} of "
                                      f"{layer.out_features} rows")
            new = Q4_1Linear(blocks.pop(name), layer.in_features, layer.bias)
            if verify:
                w = layer.weight.detach()
                if not torch.equal(new.dequantized().to(w.dtype), w):
                    raise ValueError(f"quantize_base: {name}'s Q4_1 blocks do not reproduce its current weight "
                                     f"(max abs diff {(new.dequantized() - w.float()).abs().max().item():.3g}): "
                                     "another GGUF file, or a base that was modified; pass the right gguf_path")
        new_layers.append((owner, attribute, new.to(layer.weight.device)))
    for owner, attribute, new in new_layers:
        setattr(owner, attribute, new)
    if new_layers:
        _release_checkpoint_file(model)
    return len(new_layers)


def _release_checkpoint_file(model: nn.Module) -> None:
    """Give every remaining parameter its own memory, so that the loaded checkpoint file can be let go.

    ``load_base_model`` memory-maps its cached safetensors file, and a tensor read from it keeps the whole
    mapping alive: while the embedding still points into it, every page of the file that was ever read --
    the dense matrices just replaced included (``verify`` reads them all) -- stays in resident memory. A
    copy of the few tensors that stay (embedding, norms: ``precision.cast_frozen_weights`` does the same)
    lets the mapping go. Values, dtypes and ``Parameter`` objects (tying, optimizers) are unchanged.
    """
    for p in model.parameters():  # tied weights are one Parameter, visited once
        p.data = p.data.clone()


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every quantized layer of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


__all__ = ["KINDS", "QuantizedLinear", "Q4_1Linear", "QInt8Linear", "DequantizedMatmul", "ReadOnlyWeight",
           "QuantizedWeightError", "quantize_base", "quantized_layers", "dequantize_q4_1", "quantize_q4_1"]
