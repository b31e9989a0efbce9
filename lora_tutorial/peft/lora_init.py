r"""Data-driven LoRA initialisation: PiSSA (SVD) and OLoRA (QR), as HF PEFT's ``init_lora_weights``.

Plain LoRA starts from ``B = 0``: the update is zero and the first steps must *find* useful directions.
PiSSA (Meng et al., 2024) and OLoRA (Büyükakyüz, 2024) instead start A and B from a decomposition of the
pretrained weight W itself, and freeze only what is left over::

    W  =  W_res  +  s · B0 A0          s = alpha / r  (or alpha / sqrt(r) with rslora)
          frozen    trainable, starts at A0, B0

so the adapted model *is* the base model at step 0 (``W_res x + s B0 A0 x = W x``), but the trainable
part already holds W's most important directions, and training moves them directly.

**PiSSA** takes the top-r singular triplets of ``W = U S Vᵀ`` (U: out x k, S: k, Vᵀ: k x in)::

    A0 = diag(sqrt(S_r / s)) · Vᵀ_r        (r, in)
    B0 = U_r · diag(sqrt(S_r / s))         (out, r)       so  s · B0 A0 = U_r S_r Vᵀ_r

i.e. the best rank-r approximation of W, split evenly between A and B; W_res holds the small singular
values. (HF PEFT names the factors the other way round: ``V, S, Uh = svd(W)``; same matrices.)

**OLoRA** takes the thin QR decomposition ``W = Q R`` (Q: out x k with orthonormal columns, R: k x in
upper triangular)::

    A0 = R[:r]        (r, in)
    B0 = Q[:, :r]     (out, r)        W_res = W - s · B0 A0

B starts orthonormal. (HF PEFT does not divide by s here, unlike PiSSA: with s != 1 the subtracted part is
s times the first r QR terms. We follow it exactly.)

Both are computed in float32 whatever the weight's dtype, as HF PEFT does.

**Signs.** An SVD is unique only up to the sign of each singular pair (u_i, v_i -> -u_i, -v_i), and a QR
up to the sign of each column of Q with the matching row of R. A sign flip changes row i of A0 and
column i of B0 together, so ``B0 A0`` and ``W_res`` are the same either way; only the factors differ.
Called on the same matrix, ``torch.linalg.svd`` / ``qr`` return the same signs, which is why the
parity tests can compare the factors with HF PEFT's (up to such a flip, to be safe).

**Fused matrices.** On our fused QKV matrix ``[W_q; W_k; W_v]`` (960 x 576) PiSSA is the SVD of the
*stacked* matrix, not three SVDs: the shared A0 holds the top right singular vectors of the stack (the
top eigenvectors of ``W_qᵀW_q + W_kᵀW_k + W_vᵀW_v``) and B0's rows split into q, k and v parts. It is the
best rank-r approximation of the stack as a whole, which is not the three blocks' own best rank-r
approximations (HF PEFT's PiSSA on q_proj, k_proj, v_proj would take r directions from *each*, with
three different A's). The same holds for OLoRA and the fused gate|up matrix. On unfused layers
(``attention_dense`` = o_proj, ``mlp_fc2`` = down_proj) ours and HF PEFT's agree exactly.

**Reloading.** ``W_res`` depends on the base weight, so an adapter file must let a *fresh* base rebuild
it: ``LoRALinear`` keeps A0 and B0 (as buffers ``lora_A0``, ``lora_B0``) and ``checkpoint.save_adapters``
writes them next to A and B (see ``LoRALinear.set_initial_factors`` for why these and not something else).
"""

from __future__ import annotations

import torch

DATA_DRIVEN_INITS = ("pissa", "olora")


def _check_rank(weight: torch.Tensor, rank: int, method: str) -> None:
    out_features, in_features = weight.shape
    if rank > min(out_features, in_features):
        raise ValueError(f"init_lora_weights={method!r} takes the first r directions of the ({out_features} x "
                         f"{in_features}) weight, which has only {min(out_features, in_features)}; adapter_dim={rank} "
                         "is too large for it (lower adapter_dim, or use init_lora_weights='default')")


def pissa_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (A0, B0) for an (out, in) weight, float32: ``scaling · B0 @ A0`` is W's best rank-r approximation."""
    _check_rank(weight, rank, "pissa")
    # The names follow HF PEFT's pissa_init (lora/layer.py) so that the two can be read side by side.
    V, S, Uh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    Vr, Sr, Uhr = V[:, :rank], S[:rank] / scaling, Uh[:rank]
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))
    return lora_A, lora_B


def olora_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's (A0, B0) for an (out, in) weight, float32: the first r rows of R and columns of Q of ``W = Q R``.

    ``scaling`` is not used (HF PEFT's olora_init does not divide by it); it is taken for a common signature.
    """
    _check_rank(weight, rank, "olora")
    Q, R = torch.linalg.qr(weight.detach().float())
    return R[:rank].contiguous(), Q[:, :rank].contiguous()


INIT_FACTORS = {"pissa": pissa_factors, "olora": olora_factors}


def initial_factors(method: str, weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of ``method`` (pissa | olora) for ``weight``, in float32."""
    if method not in INIT_FACTORS:
        raise ValueError(f"unknown data-driven init {method!r}; expected one of {', '.join(INIT_FACTORS)}")
    return INIT_FACTORS[method](weight, rank, scaling)


def residual_weight(weight: torch.Tensor, lora_A0: torch.Tensor, lora_B0: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """``W - scaling · B0 @ A0`` in ``weight``'s dtype (computed in at least float32).

    The one place the residual is computed, at initialisation and when an adapter file is loaded onto a
    fresh base: the same operations on the same numbers give the same bits, so a reloaded model's frozen
    weight is *identical* to the trained model's. (The order ``(s · B0) @ A0`` is HF PEFT's.)
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return (weight.detach().to(dtype) - (scaling * lora_B0.to(dtype)) @ lora_A0.to(dtype)).to(weight.dtype)


__all__ = ["DATA_DRIVEN_INITS", "initial_factors", "pissa_factors", "olora_factors", "residual_weight"]
