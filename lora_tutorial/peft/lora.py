r"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al., 2021).

A pretrained linear layer computes ``h = W x`` with ``W`` of shape (out, in). Full fine-tuning learns a
change ``ΔW`` of the same shape: for SmolLM2's fused QKV projection that is 960 x 576 = 552,960 numbers
per layer. LoRA bets that the useful change has a *low rank* r and learns it as a product of two thin
matrices, while ``W`` stays frozen::

    h = W x + (alpha / r) · B A x        A: (r, in)   B: (out, r)   r << min(in, out)

            x
            ├──────────────────┐
            │                  │ dropout
      ┌─────┴─────┐      ┌─────┴─────┐
      │  W        │      │  A  r×in  │  "column" init (xavier)
      │  frozen   │      └─────┬─────┘
      │  out×in   │      ┌─────┴─────┐
      └─────┬─────┘      │  B  out×r │  "row" init (zero)
            │            └─────┬─────┘
            │                  │ × alpha/r
            └─────── + ────────┘
                     h

Why these choices:

* **B starts at zero**, so ``B A x = 0`` and the adapted model *is* the base model at step 0; training
  moves away from a known-good point. A must then be random: the gradient of B is proportional to A x,
  and with both at zero neither would ever move.
* **The scale alpha/r** decouples the learning rate from the rank: with ``alpha`` fixed, doubling r halves
  the scale, roughly compensating the larger sum over r terms. rsLoRA (Kalajdzievski, 2023) argues that
  ``alpha / sqrt(r)`` keeps updates well-scaled at large ranks; ``rslora: true`` selects it.
* **The fused QKV matrix gets one LoRA** (as NeMo does): A (r, 576) is shared and B (960, r) stacks the
  query (576 rows), key (192) and value (192) parts. That equals three LoRAs on q, k, v with a shared A,
  which is how ``hf_export.export_hf_peft`` writes it for HF PEFT. With r = 32 on all 30 layers:
  30 x 32 x (576 + 960) = 1,474,560 trainable parameters, 1.1 % of the 134.5 M base.
* **Merging**: after training, ``W + (alpha/r) B A`` is an ordinary (out, in) matrix. ``merge()`` folds it into
  the base weight so inference costs exactly what the base costs; ``unmerge()`` subtracts it again.

Two variants, DoRA and data-driven initialisation (PiSSA, OLoRA), as in HF PEFT (and checked against it in
``tests/test_lora_variants.py``):

**DoRA** (Liu et al., 2024; ``use_dora: true``) splits the adapted weight into a *magnitude* and a
*direction*, and learns the magnitude separately: one number per output row, ``m`` (``lora_magnitude``)::

    W' = m ⊙ (W + s·B A) / ||W + s·B A||        ||.||: the L2 norm of each output row (over the inputs)

    h  = W' x = g ⊙ (W x + s·B A x),            g = m / ||W + s·B A||   (one factor per output)

``m`` starts at the row norms ``||W + s·B A||`` (= ``||W||`` with B = 0), so ``g = 1`` and the model is the
base at step 0. Following the paper (section 4.3) and HF PEFT, the norm is treated as a *constant* in the
backward pass (``detach``): gradients reach m through g and A, B through ``s·B A x`` only, which saves the
memory of differentiating a norm of an (out x in) matrix. The norm itself is recomputed at every forward
from the current A and B: one (out, in) temporary, outside autograd; all products with x stay thin
(for generation, ``merge_lora`` removes even that cost).
Because the norm is per output row, DoRA on our fused QKV matrix *is* DoRA on q, k, v separately with a
shared A (the magnitude vector splits into q | k | v parts like B's rows). Merging writes W' itself into
the weight; since W' is no longer "W plus something", ``unmerge`` restores a saved copy of W (exact).

**PiSSA / OLoRA** (``init_lora_weights: pissa | olora``, see ``lora_init.py``) start A and B from W's SVD or QR
instead of (random, zero) and freeze the *residual* ``W_res = W - s·B0 A0``, so the output at step 0 is
still the base's. The layer keeps A0 and B0 as buffers (``lora_A0``, ``lora_B0``), for three reasons: adapter
files store them so that a fresh base can rebuild ``W_res`` exactly; ``disable_adapters`` gives the true
base model (``W_res x + s·B0 A0 x = W x``; HF PEFT gives the residual model there); and the update
training made is ``s·(B A - B0 A0)``. Merging adds ``s·B A`` to the residual, i.e. the weight becomes
``W + s·(B A - B0 A0)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..model import GPT
from ..precision import matmul_dtype, trainable_dtype
from .config import LoraPEFTConfig, select_layers
from .lora_init import DATA_DRIVEN_INITS, initial_factors, residual_weight
from .wrapping import is_peft_module, replace_module, unwrap, wrap_targets


def init_tensor_(tensor: torch.Tensor, method: str) -> torch.Tensor:
    """Initialise in place with one of NeMo's adapter init methods: xavier | normal | kaiming | zero."""
    if method == "xavier":
        return nn.init.xavier_normal_(tensor)
    if method == "normal":
        return nn.init.normal_(tensor, mean=0.0, std=0.2)  # NeMo's init_method_normal(0.2)
    if method == "kaiming":
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))  # what nn.Linear uses by default
    if method == "zero":
        return nn.init.zeros_(tensor)
    raise ValueError(f"unknown init method {method!r}; expected xavier, normal, kaiming or zero")


class LoRALinear(nn.Module):
    """``base(x) + scaling * B(A(dropout(x)))`` around a frozen ``nn.Linear`` kept as ``self.base``.

    The base layer's parameters keep their names under ``.base`` (``attention_qkv.base.weight``), and the
    two new matrices are ``lora_A`` (rank, in) and ``lora_B`` (out, rank), as in HF PEFT. With
    ``use_dora`` there is a third trainable tensor, ``lora_magnitude`` (out,); with
    ``init_lora_weights`` pissa or olora two frozen buffers ``lora_A0``, ``lora_B0`` hold the initial A, B.
    """

    peft_scheme: ClassVar[str] = "lora"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 column_init_method: str = "xavier", row_init_method: str = "zero", use_dora: bool = False,
                 init_lora_weights: str = "default") -> None:
        super().__init__()
        frozen = unwrap(base)  # base may be another adapter's LoRALinear (peft/multi.py) or a quantized layer
        if not hasattr(frozen, "in_features"):
            raise TypeError(f"LoRALinear wraps a linear layer, got {type(base).__name__}")
        if isinstance(base, LoRALinear) and (use_dora or init_lora_weights != "default" or base.use_dora
                                             or base.lora_A0 is not None):
            raise ValueError("DoRA and PiSSA/OLoRA adapters cannot share a layer with another adapter: their "
                             "magnitude / residual is defined on the base weight alone")
        if init_lora_weights != "default" and not hasattr(frozen, "weight"):
            raise ValueError(f"{init_lora_weights} needs a float base weight to decompose; this base layer is "
                             f"{type(frozen).__name__} (quantized)")
        if init_lora_weights not in ("default", *DATA_DRIVEN_INITS):
            raise ValueError(f"unknown init_lora_weights {init_lora_weights!r}; expected default, "
                             f"{', '.join(DATA_DRIVEN_INITS)}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        weight = frozen.weight if hasattr(frozen, "weight") else frozen.dequantized()
        factory = dict(device=weight.device, dtype=trainable_dtype(weight.dtype))
        self.lora_A = nn.Parameter(init_tensor_(torch.empty(rank, frozen.in_features, **factory), column_init_method))
        self.lora_B = nn.Parameter(init_tensor_(torch.empty(frozen.out_features, rank, **factory), row_init_method))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while the update lives inside base.weight
        self.adapter_enabled = True  # switched off by peft.disable_adapters
        self.use_dora = use_dora
        self.init_lora_weights = "default"  # set_initial_factors records pissa / olora
        self.register_buffer("lora_A0", None)  # PiSSA / OLoRA: the initial A and B (set_initial_factors)
        self.register_buffer("lora_B0", None)
        # DoRA's merge keeps W here (not saved with the model) so that unmerge can put it back exactly.
        self.register_buffer("weight_before_merge", None, persistent=False)
        if init_lora_weights != "default":
            a0, b0 = initial_factors(init_lora_weights, base.weight, rank, self.scaling)
            self.set_initial_factors(init_lora_weights, a0, b0)
        if use_dora:  # after the init above: m starts at ||W + s B A||, so that g = 1 at step 0
            self.lora_magnitude = nn.Parameter(self.weight_norm().to(factory["dtype"]))

    # ------------------------------------------------------------------------------------------
    # PiSSA / OLoRA: the frozen weight is a residual
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_initial_factors(self, method: str, lora_A0: torch.Tensor, lora_B0: torch.Tensor) -> None:
        """Start from (A0, B0) and freeze the residual: ``A, B = A0, B0`` and ``base.weight = W - s·B0 A0``.

        Used at initialisation (A0, B0 from W's SVD / QR) and by ``load_adapters`` (A0, B0 from the file,
        on a fresh base). Why an adapter file stores A0 and B0: they are adapter-sized (the file doubles,
        still ~1 % of the base), and with them a fresh base rebuilds the residual with the *same*
        operations on the same numbers, so the reloaded model is bit-identical to the trained one.
        Recomputing the SVD on load instead would depend on the device and LAPACK build (and on the
        sign of each singular pair); storing the residual itself would cost a full-size matrix.

        If the layer already holds a residual of another (A0, B0), that one is added back first (exact
        only up to float rounding; a no-op when the factors are the same).
        """
        if self.merged:
            raise RuntimeError("set_initial_factors on a merged LoRA layer; unmerge first")
        lora_A0 = lora_A0.to(self.lora_A.device, self.lora_A.dtype)
        lora_B0 = lora_B0.to(self.lora_B.device, self.lora_B.dtype)
        if lora_A0.shape != self.lora_A.shape or lora_B0.shape != self.lora_B.shape:
            raise ValueError(f"initial factors of shapes {tuple(lora_A0.shape)}, {tuple(lora_B0.shape)} do not "
                             f"fit lora_A {tuple(self.lora_A.shape)}, lora_B {tuple(self.lora_B.shape)}")
        w = self._weight_to_merge_into()
        same = (self.lora_A0 is not None and torch.equal(self.lora_A0, lora_A0)
                and torch.equal(self.lora_B0, lora_B0))
        if not same:
            if self.lora_A0 is not None:  # back to W (up to rounding)
                w.copy_((w.float() + self.scaling * (self.lora_B0.float() @ self.lora_A0.float())).to(w.dtype))
            w.copy_(residual_weight(w, lora_A0, lora_B0, self.scaling))
        self.lora_A0, self.lora_B0 = lora_A0.clone(), lora_B0.clone()
        self.lora_A.copy_(lora_A0)
        self.lora_B.copy_(lora_B0)
        self.init_lora_weights = method

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out  # base.weight already holds the adapted weight
        if not self.adapter_enabled:
            if self.lora_A0 is None:
                return out
            # PiSSA / OLoRA: base.weight is the residual; add s·B0 A0 x back to get the base model's W x.
            return out + F.linear(F.linear(x, self.lora_A0), self.lora_B0 * self.scaling)
        # Two thin matmuls, x -> (.., r) -> (.., out): never materialise the (out, in) product here. The
        # scale multiplies the small B (out x r), not the large output (tokens x out).
        dropout_active = self.training and isinstance(self.dropout, nn.Dropout)
        xd = self.dropout(x) if dropout_active else x
        a, b, g = self._inference_factors(x) if not torch.is_grad_enabled() else self._factors()
        lora = F.linear(F.linear(xd, a), b)
        if not self.use_dora:
            return out + lora
        # DoRA: h = g ⊙ (W x + s·B A x) (+ bias, not rescaled), written as a correction of the base output
        # as in HF PEFT. With dropout active the correction applies to the dropped-out input (HF does the same).
        if dropout_active:
            wx = F.linear(xd, self._base_weight())
        else:
            wx = out if self.base.bias is None else out - self.base.bias  # W x is already in `out`
        return out + (g - 1) * wx + g * lora

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A, s·B and DoRA's row factor g = m / ||W + s·B A|| (None without DoRA; the norm is a constant
        for autograd)."""
        b = self.lora_B if self.scaling == 1 else self.lora_B * self.scaling
        return self.lora_A, b, (self.lora_magnitude / self.weight_norm() if self.use_dora else None)

    def _inference_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``_factors`` without gradients, computed once and kept while the tensors do not change: already
        cast to the dtype the matmuls run in (bf16 under autocast). Generating a token then costs two thin
        matmuls per layer instead of two casts, a scaling and (DoRA) a full-size norm as well."""
        dtype = matmul_dtype(x.device.type, self.lora_A.dtype)
        params = (self.lora_A, self.lora_B) + ((self.lora_magnitude,) if self.use_dora else ())
        key = (dtype, x.device, *((id(p), p._version) for p in params), self._base_weight_key())
        if getattr(self, "_cache_key", None) != key:
            a, b, g = self._factors()
            self._cached = (a.to(dtype), b.to(dtype), g)
            self._cache_key = key
        return self._cached

    def _base_weight_key(self) -> tuple[int, int] | None:
        """Identity and version of the frozen weight parameter (DoRA's norm depends on it); None for a
        quantized base, whose buffers never change."""
        weight = unwrap(self.base)._parameters.get("weight")
        return None if weight is None else (id(weight), weight._version)

    def _base_weight(self) -> torch.Tensor:
        """The frozen (out, in) weight under any other adapters' wrappers (dequantized if the base layer is
        quantized: ``quantize_int8``, ``qlora``)."""
        base = unwrap(self.base)
        weight = getattr(base, "weight", None)  # one read: a quantized layer dequantizes on every .weight
        return weight if weight is not None else base.dequantized()

    def _weight_to_merge_into(self) -> torch.Tensor:
        base = unwrap(self.base)
        if not hasattr(base, "weight"):
            raise ValueError(f"cannot merge LoRA into a quantized base layer ({type(base).__name__}): the sum "
                             "would not fit its quantized format; merge on a float copy of the base instead")
        return base.weight

    def adapted_weight(self) -> torch.Tensor:
        """``W + s·B A`` (out, in) in float32, built in one matrix (``addmm``): DoRA's direction before scaling."""
        return torch.addmm(self._base_weight().float(), self.lora_B.float(), self.lora_A.float(), alpha=self.scaling)

    def weight_norm(self) -> torch.Tensor:
        """DoRA's denominator ``||W + s·B A||`` per output row, in float32 and without gradient (HF PEFT:
        ``get_weight_norm``, norm over dim 1 = the input features, then ``detach``)."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.adapted_weight(), dim=1)

    def delta_weight(self) -> torch.Tensor:
        """The full-size update ``scaling * B @ A`` (out, in), computed in float32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def original_and_update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, what training changed in it), both (out, in) float32, merged or not.

        W is the base model's weight: for PiSSA / OLoRA the residual plus ``s·B0 A0``. The change is the
        adapted weight minus W: ``s·B A`` for LoRA, ``s·(B A - B0 A0)`` for PiSSA / OLoRA, and
        ``g ⊙ (W + s·B A) - W`` for DoRA (not of low rank: the magnitude rescales whole rows).
        """
        stored = self._base_weight().float()
        if self.merged:
            stored = self.weight_before_merge.float() if self.use_dora else stored - self.delta_weight()
        if self.lora_A0 is None:
            original = stored
        else:
            original = stored + self.scaling * (self.lora_B0.float() @ self.lora_A0.float())
        adapted = stored + self.delta_weight()
        if self.use_dora:
            adapted = (self.lora_magnitude.float() / torch.linalg.vector_norm(adapted, dim=1))[:, None] * adapted
        return original, adapted - original

    # ------------------------------------------------------------------------------------------
    # Merge
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base.weight`` (for inference). Merging twice is a no-op.

        LoRA (and PiSSA/OLoRA, whose ``base.weight`` is the residual) adds ``s·B A``. DoRA writes
        ``g ⊙ (W + s·B A)`` with ``g = m / ||W + s·B A||`` and keeps W for ``unmerge``.
        The result is computed in float32 and rounded once to the weight's dtype: exact to ~1e-7 in fp32,
        but a bf16 weight cannot hold small updates precisely, so merge fp32 weights when precision matters.
        """
        if self.merged:
            return
        w = self._weight_to_merge_into()
        if self.use_dora:
            original, adapted = w.detach().clone(), self.adapted_weight()
            g = self.lora_magnitude.float() / torch.linalg.vector_norm(adapted, dim=1)
            w.copy_((g[:, None] * adapted).to(w.dtype))
            self.weight_before_merge = original  # only once the write succeeded
        else:
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: LoRA subtracts the update again (exact up to float rounding); DoRA puts the saved
        W back (exact). A no-op when not merged."""
        if not self.merged:
            return
        w = self._weight_to_merge_into()
        if self.use_dora:
            w.copy_(self.weight_before_merge)
            self.weight_before_merge = None
        else:
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        extras = (", dora=True" if self.use_dora else "") + (
            f", init={self.init_lora_weights}" if self.init_lora_weights != "default" else "")
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}{extras}, merged={self.merged}"


def apply_lora(model: GPT, cfg: LoraPEFTConfig) -> list[str]:
    """Wrap the configured linear layers of the selected blocks in ``LoRALinear``; return their names."""
    def make(layer: nn.Module) -> LoRALinear:
        # A plain or quantized linear layer, or another (named) adapter's LoRA; not IA3 / adapter wrappers,
        # which change what the layer computes in ways a merge could not undo.
        if is_peft_module(layer) and not isinstance(layer, LoRALinear):
            raise ValueError(f"LoRA must wrap a linear layer, found {type(layer).__name__}; add LoRA first "
                             "(or pass all configs to one add_adapter call, which orders them)")
        return LoRALinear(layer, cfg.adapter_dim, cfg.alpha, cfg.adapter_dropout, cfg.rslora,
                          cfg.column_init_method, cfg.row_init_method, use_dora=cfg.use_dora,
                          init_lora_weights=cfg.init_lora_weights)
    layers = select_layers(len(model.blocks), cfg.layer_selection, cfg.section)
    return wrap_targets(model, layers, cfg.target_modules, make)


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    """Every ``LoRALinear`` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Merge every enabled LoRA layer of ``model`` into its base weight; return how many were merged.

    A switched-off layer (``set_adapter`` chose another adapter) is left unmerged: merging it would
    switch it back on, since a merged layer's update lives in the base weight."""
    layers = [layer for layer in lora_modules(model) if layer.adapter_enabled]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo ``merge_lora``; return how many LoRA layers there are."""
    layers = lora_modules(model)
    for layer in layers:
        layer.unmerge()
    return len(layers)


@contextlib.contextmanager
def merged_for_inference(model: nn.Module) -> Iterator[int]:
    """Inside the block every enabled LoRA layer runs merged (one matmul instead of three); afterwards the
    base weights are exactly what they were (the originals are kept aside, not recomputed by subtraction).

    Generating an answer token by token is dominated by per-matmul overhead, and an unmerged LoRA doubles
    the matmuls of every adapted layer. Why swap ``.data`` instead of ``merge()`` / ``unmerge()``: in bf16,
    subtracting the update again would not give back the original weight bit for bit; keeping it does.
    The merged weight is ``W + s·B A`` (DoRA: rescaled by its row factor) rounded once to the weight's
    dtype; in bf16 that rounding is the same size as the rounding the bf16 base weights already have.
    Layers that cannot merge (a quantized base, nested adapters, a disabled adapter) are left as they
    are. Yields how many layers were merged.
    """
    swapped = []
    for layer in lora_modules(model):
        weight = layer.base._parameters.get("weight") if isinstance(layer.base, nn.Linear) else None
        if layer.merged or not layer.adapter_enabled or weight is None:
            continue
        original = weight.data
        with torch.no_grad():
            adapted = layer.adapted_weight()  # W + s·B A in float32
            if layer.use_dora:
                adapted *= (layer.lora_magnitude.float() / torch.linalg.vector_norm(adapted, dim=1))[:, None]
            weight.data = adapted.to(original.dtype)
        layer.merged = True
        if layer.use_dora:  # what DoRA's unmerge() restores, should anything call it inside the block
            layer.weight_before_merge = original
        swapped.append((layer, weight, original))
    try:
        yield len(swapped)
    finally:
        for layer, weight, original in swapped:
            weight.data = original
            layer.merged = False
            layer.weight_before_merge = None


def merge_and_unload(model: GPT) -> GPT:
    """Merge every enabled LoRA layer and put the plain ``nn.Linear`` back in its place (no LoRA code left).

    The result is an ordinary model with the fine-tuned weights: it can be saved and shared like a base
    model. Other PEFT methods (adapters, IA3, p-tuning) stay as they are, and so do LoRA adapters that
    are switched off (``set_adapter`` chose another one): they are not part of the fine-tuned model.
    """
    unloaded = set()
    for name, module in reversed(list(model.named_modules())):  # innermost first: nested adapters' paths hold
        if isinstance(module, LoRALinear) and module.adapter_enabled:
            module.merge()
            module.weight_before_merge = None  # DoRA's copy of W: no unmerge after this
            replace_module(model, name, module.base)
            unloaded.add(getattr(module, "adapter_name", "default"))
    still_there = {getattr(m, "adapter_name", "default") for m in lora_modules(model)}
    model.peft_configs = [c for c in model.peft_configs
                          if not (c.scheme == "lora" and c.adapter_name in unloaded - still_there)]
    return model


__all__ = ["LoRALinear", "apply_lora", "init_tensor_", "lora_modules", "merge_lora", "merged_for_inference",
           "unmerge_lora", "merge_and_unload"]
