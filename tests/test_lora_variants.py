"""DoRA and the data-driven inits (PiSSA, OLoRA) of ``LoRALinear``, checked against HF PEFT.

The reference is HF transformers' ``LlamaForCausalLM`` wrapped by ``peft`` (``use_dora=True``,
``init_lora_weights="pissa" | "olora"``) on a tiny random Llama that our ``load_base_model`` reads from the
same directory. Our fused matrices are split for PEFT as in ``test_peft_hf_parity``: one A for q, k, v (and
for gate, up), B's rows cut into parts; DoRA's magnitude vector is cut like B's rows (its norm is per
output row, so fused DoRA *is* DoRA on the parts). The inits are compared on unfused layers
(``attention_dense`` = o_proj, ``mlp_fc2`` = down_proj): on a fused matrix our PiSSA is the SVD of the
stack, which HF PEFT never computes.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lora_tutorial import load_base_model
from lora_tutorial.peft import (AdapterCheckpointError, LoraPEFTConfig, add_adapter, adapter_parameters,
                                disable_adapters, load_adapters, merge_and_unload, merge_lora, save_adapters,
                                unmerge_lora)
from lora_tutorial.peft.hf_export import hf_modules_of
from lora_tutorial.peft.lora import LoRALinear, lora_modules
from lora_tutorial.peft.lora_init import olora_factors, pissa_factors
from lora_tutorial.peft.wrapping import target_name
from lora_tutorial.quantize import quantize_int8

from helpers import logits, random_ids, save_hf_llama, tiny_llama_config, tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

TARGETS = ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2")
UNFUSED = {"attention_dense": "o_proj", "mlp_fc2": "down_proj"}
# Measured: DoRA logits agree to ~2e-7, the inits bit for bit. A wrong formula gives differences of order 0.1-1.
HF_TOL = 1e-5
X = random_ids(2, 10)


def lora_cfg(**overrides) -> LoraPEFTConfig:
    return LoraPEFTConfig(None, **{"adapter_dim": 4, "alpha": 8, "target_modules": ["all"], **overrides})


def with_adapter(model, **overrides):
    add_adapter(model, lora_cfg(**overrides), verbose=False)
    return model


def perturb(model, seed: int = 0, std: float = 0.2) -> None:
    """Move every LoRA tensor as training would: A, B by noise, the DoRA magnitude by up to ~20 %."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model):
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * std)
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * std)
            if layer.use_dora:
                layer.lora_magnitude.mul_(1 + 0.2 * torch.randn(layer.lora_magnitude.shape, generator=g))


def layer_of(model, i: int, target: str) -> LoRALinear:
    return model.get_submodule(target_name(i, target))


def row_sizes(model, target: str) -> list[int]:
    c = model.config
    return {"attention_qkv": list(c.qkv_sizes), "attention_dense": [c.d_model], "mlp_fc1": [c.d_ff, c.d_ff],
            "mlp_fc2": [c.d_model]}[target]


def hf_parts(hf_peft, i: int, target: str) -> list:
    """The HF PEFT lora.Linear modules our ``target`` of block i is split into, in row order."""
    layer = hf_peft.base_model.model.model.layers[i]
    return [layer.get_submodule(name) for name in hf_modules_of(target)]


def copy_into_hf(ours, hf_peft) -> None:
    """Our A (shared), B and magnitude (cut by rows) into HF PEFT's per-projection adapters."""
    with torch.no_grad():
        for i in range(len(ours.blocks)):
            for target in TARGETS:
                layer = layer_of(ours, i, target)
                if not isinstance(layer, LoRALinear):
                    continue
                sizes = row_sizes(ours, target)
                b_parts = layer.lora_B.split(sizes)
                m_parts = layer.lora_magnitude.split(sizes) if layer.use_dora else [None] * len(sizes)
                for part, b, m in zip(hf_parts(hf_peft, i, target), b_parts, m_parts):
                    part.lora_A["default"].weight.copy_(layer.lora_A)
                    part.lora_B["default"].weight.copy_(b)
                    if m is not None:
                        part.lora_magnitude_vector["default"].weight.copy_(m)


def hf_lora_config(targets=TARGETS, **kwargs) -> peft.LoraConfig:
    modules = sorted({name.split(".")[-1] for t in targets for name in hf_modules_of(t)})
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": modules, **kwargs})


@pytest.fixture
def tiny_hf(tmp_path):
    """(HF LlamaForCausalLM, our GPT) with the same random weights, read from one tiny HF directory."""
    hf = save_hf_llama(tmp_path / "base")
    ours, _ = load_base_model(tmp_path / "base")
    return hf, ours


def hf_logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


# ----------------------------------------------------------------------------------------------
# DoRA
# ----------------------------------------------------------------------------------------------


def test_dora_starts_as_the_base_model_with_the_row_norms_of_w_as_magnitude():
    model = tiny_model()
    base = logits(model, X)
    weights = {t: layer_of(model, 0, t).weight.detach().clone() for t in TARGETS}
    with_adapter(model, use_dora=True)
    assert torch.equal(logits(model, X), base)  # g = m / ||W|| = 1 exactly and B = 0
    for target, w in weights.items():
        layer = layer_of(model, 0, target)
        assert layer.lora_magnitude.shape == (w.shape[0],) and layer.lora_magnitude.requires_grad
        torch.testing.assert_close(layer.lora_magnitude.detach(), w.norm(dim=1))
    assert "lora_magnitude" in {name.split(".")[-1] for name in adapter_parameters(model)}


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_equals_hf_peft_dora_with_the_same_tensors(tiny_hf, rslora):
    hf, ours = tiny_hf
    with_adapter(ours, use_dora=True, rslora=rslora)
    perturb(ours, seed=1)
    x = random_ids(2, 12, hf.config.vocab_size)
    expected = logits(ours, x)
    hf_peft = peft.get_peft_model(hf, hf_lora_config(use_dora=True, use_rslora=rslora))
    copy_into_hf(ours, hf_peft)
    theirs = hf_logits(hf_peft, x)
    with torch.no_grad(), hf_peft.disable_adapter():
        base = hf_peft(input_ids=x).logits
    for layer in lora_modules(ours):  # the same A and B without DoRA's rescaling: another model
        layer.use_dora = False
    assert (logits(ours, x) - expected).abs().max() > 1e-1
    assert (expected - base).abs().max() > 1e-1  # the adapter changes the model...
    assert (expected - theirs).abs().max() < HF_TOL  # ...and PEFT agrees on how


def test_dora_gradients_equal_hf_peft_so_the_norm_is_a_constant_as_in_peft(tiny_hf):
    hf, ours = tiny_hf
    with_adapter(ours, use_dora=True)
    perturb(ours, seed=2)
    hf_peft = peft.get_peft_model(hf, hf_lora_config(use_dora=True))
    copy_into_hf(ours, hf_peft)
    x = random_ids(2, 12, hf.config.vocab_size)
    F.cross_entropy(ours(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    F.cross_entropy(hf_peft(input_ids=x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    for i in range(len(ours.blocks)):
        for target in TARGETS:
            layer, parts = layer_of(ours, i, target), hf_parts(hf_peft, i, target)
            # A is shared by the parts, so its gradient is the sum of theirs; B and m are cut by rows.
            grads = {"lora_A": sum(p.lora_A["default"].weight.grad for p in parts),
                     "lora_B": torch.cat([p.lora_B["default"].weight.grad for p in parts]),
                     "lora_magnitude": torch.cat([p.lora_magnitude_vector["default"].weight.grad for p in parts])}
            for name, theirs in grads.items():
                mine = getattr(layer, name).grad
                assert mine is not None and mine.abs().max() > 0, (i, target, name)
                torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-3, msg=f"{i} {target} {name}")


def test_dora_with_dropout_in_training_equals_hf_peft_under_the_same_random_masks(tiny_hf):
    """HF PEFT allows DoRA with dropout: then the rescaling of W x applies to the dropped-out input too."""
    hf, ours = tiny_hf
    with_adapter(ours, use_dora=True, adapter_dropout=0.3, target_modules=["attention_dense", "mlp_fc2"])
    perturb(ours, seed=3)
    hf_peft = peft.get_peft_model(hf, hf_lora_config(["attention_dense", "mlp_fc2"], use_dora=True,
                                                     lora_dropout=0.3))
    copy_into_hf(ours, hf_peft)
    ours.train(), hf_peft.train()
    x = random_ids(2, 12, hf.config.vocab_size)
    with torch.no_grad():
        torch.manual_seed(7)
        expected = ours(x)
        torch.manual_seed(7)
        theirs = hf_peft(input_ids=x).logits
        torch.manual_seed(8)
        other_masks = ours(x)
    ours.eval(), hf_peft.eval()
    assert (expected - other_masks).abs().max() > 1e-2  # dropout is really on...
    assert (expected - theirs).abs().max() < HF_TOL  # ...with the same masks, PEFT agrees
    assert (logits(ours, x) - hf_logits(hf_peft, x)).abs().max() < HF_TOL  # and off in eval mode


def test_dora_merge_writes_the_rescaled_weight_and_unmerge_restores_w_exactly():
    model = with_adapter(tiny_model(seed=3), use_dora=True)
    perturb(model, seed=4)
    layer = layer_of(model, 1, "mlp_fc1")
    w = layer.base.weight.detach().clone()
    adapted = w + layer.delta_weight().detach()
    expected_weight = (layer.lora_magnitude.detach() / adapted.norm(dim=1))[:, None] * adapted
    unmerged = logits(model, X)
    merge_lora(model)
    torch.testing.assert_close(layer.base.weight.detach(), expected_weight, atol=1e-6, rtol=1e-6)
    assert (logits(model, X) - unmerged).abs().max() < 1e-4
    with disable_adapters(model):  # unmerges for the duration
        assert torch.equal(layer.base.weight, w)
    unmerge_lora(model)
    assert torch.equal(layer.base.weight, w) and layer.weight_before_merge is None  # exact, not "up to rounding"
    assert torch.equal(logits(model, X), unmerged)
    plain = merge_and_unload(model)
    assert not lora_modules(plain) and (logits(plain, X) - unmerged).abs().max() < 1e-4


def test_dora_runs_on_an_int8_quantized_base():
    model = with_adapter(tiny_model(), use_dora=True, target_modules=["attention_qkv"])
    perturb(model, seed=5)
    expected = logits(model, X)
    quantize_int8(model)
    assert type(layer_of(model, 0, "attention_qkv").base).__name__ == "Int8Linear"
    assert (logits(model, X).float() - expected).abs().max() < 0.2  # int8 + bf16 rounding, not a wrong formula


# ----------------------------------------------------------------------------------------------
# PiSSA and OLoRA: the initial factors
# ----------------------------------------------------------------------------------------------


def assert_same_up_to_signs(a, b, a_ref, b_ref, atol: float) -> None:
    """A, B equal A_ref, B_ref up to the sign of each direction (row i of A with column i of B)."""
    signs = torch.sign((a * a_ref).sum(dim=1))
    assert (signs != 0).all()
    torch.testing.assert_close(a * signs[:, None], a_ref, atol=atol, rtol=0)
    torch.testing.assert_close(b * signs[None, :], b_ref, atol=atol, rtol=0)


@pytest.mark.parametrize("init, rslora, dora", [("pissa", False, False), ("pissa", True, False),
                                                ("olora", False, False), ("olora", True, False),
                                                ("pissa", False, True)])
def test_pissa_and_olora_init_equal_hf_peft_on_unfused_layers(tiny_hf, init, rslora, dora):
    hf, ours = tiny_hf
    with_adapter(ours, init_lora_weights=init, rslora=rslora, use_dora=dora, target_modules=list(UNFUSED))
    hf_peft = peft.get_peft_model(hf, hf_lora_config(list(UNFUSED), init_lora_weights=init, use_rslora=rslora,
                                                     use_dora=dora))
    for i in range(len(ours.blocks)):
        for target in UNFUSED:
            layer, (part,) = layer_of(ours, i, target), hf_parts(hf_peft, i, target)
            assert_same_up_to_signs(layer.lora_A.detach(), layer.lora_B.detach(),
                                    part.lora_A["default"].weight.detach(), part.lora_B["default"].weight.detach(),
                                    atol=1e-6)
            torch.testing.assert_close(layer.base.weight, part.base_layer.weight, atol=1e-6, rtol=0)
            if dora:
                torch.testing.assert_close(layer.lora_magnitude.detach(),
                                           part.lora_magnitude_vector["default"].weight.detach(), atol=1e-6, rtol=0)
    # Trained (moved) factors on the same residuals: the same model.
    perturb(ours, seed=6)
    copy_into_hf(ours, hf_peft)
    x = random_ids(2, 12, hf.config.vocab_size)
    assert (logits(ours, x) - hf_logits(hf_peft, x)).abs().max() < HF_TOL


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_data_driven_init_keeps_the_base_output_and_freezes_the_residual(init):
    model = tiny_model()
    base = logits(model, X)
    weights = {t: layer_of(model, 1, t).weight.detach().clone() for t in TARGETS}
    with_adapter(model, init_lora_weights=init)
    assert (logits(model, X) - base).abs().max() < 1e-4  # W_res x + s B0 A0 x = W x, up to rounding
    for target, w in weights.items():
        layer = layer_of(model, 1, target)
        assert torch.equal(layer.lora_A, layer.lora_A0) and torch.equal(layer.lora_B, layer.lora_B0)
        assert not layer.base.weight.requires_grad and layer.lora_A.requires_grad and not layer.lora_A0.requires_grad
        torch.testing.assert_close(layer.base.weight + layer.delta_weight(), w, atol=1e-5, rtol=0)
        assert (layer.base.weight - w).abs().max() > 1e-2  # the frozen weight really is a residual
    with disable_adapters(model):  # the true base model, not the residual model
        assert (logits(model, X) - base).abs().max() < 1e-4


def test_pissa_takes_the_top_singular_directions_and_olora_an_orthonormal_b():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    a, b = pissa_factors(w, rank=3, scaling=2.0)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(2.0 * b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(w - 2.0 * b @ a)[:13], s[3:], atol=1e-5, rtol=0)
    a, b = olora_factors(w, rank=3, scaling=2.0)
    torch.testing.assert_close(b.T @ b, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.allclose(a.tril(-1), torch.zeros_like(a))  # the first rows of an upper-triangular R


def test_pissa_on_the_fused_qkv_matrix_is_the_svd_of_the_stack_not_three_svds():
    model = tiny_model()
    w = layer_of(model, 0, "attention_qkv").weight.detach().clone()
    with_adapter(model, init_lora_weights="pissa", target_modules=["attention_qkv"])
    layer = layer_of(model, 0, "attention_qkv")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    top_r = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    torch.testing.assert_close(layer.delta_weight(), top_r, atol=1e-5, rtol=0)  # the stack's best rank 4
    per_part = torch.cat([pu[:, :4] @ torch.diag(ps[:4]) @ pvh[:4]
                          for pu, ps, pvh in map(lambda p: torch.linalg.svd(p, full_matrices=False),
                                                 w.split(row_sizes(model, "attention_qkv")))])
    assert (layer.delta_weight() - per_part).abs().max() > 1e-2  # three SVDs would remove something else


def test_pissa_merge_gives_the_original_weight_plus_the_learned_change():
    model = tiny_model(seed=2)
    originals = {t: layer_of(model, 0, t).weight.detach().clone() for t in TARGETS}
    with_adapter(model, init_lora_weights="pissa")
    perturb(model, seed=7, std=0.05)
    unmerged = logits(model, X)
    residuals = {t: layer_of(model, 0, t).base.weight.detach().clone() for t in TARGETS}
    merge_lora(model)
    for target, w in originals.items():
        layer = layer_of(model, 0, target)
        s = layer.scaling
        learned = s * (layer.lora_B @ layer.lora_A - layer.lora_B0 @ layer.lora_A0)
        torch.testing.assert_close(layer.base.weight, residuals[target] + layer.delta_weight(), atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base.weight, w + learned, atol=1e-5, rtol=0)
    assert (logits(model, X) - unmerged).abs().max() < 1e-4
    unmerge_lora(model)
    for target, w_res in residuals.items():
        torch.testing.assert_close(layer_of(model, 0, target).base.weight, w_res, atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_rank_above_the_matrix_rank_is_refused_with_a_clear_error(init):
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'.*\(32 x 48\) weight, which has only 32; "
                                         r"adapter_dim=40 is too large"):
        with_adapter(tiny_model(), init_lora_weights=init, adapter_dim=40, target_modules=["mlp_fc2"])
    with pytest.raises(ValueError, match="unknown init_lora_weights 'svd'"):
        LoRALinear(torch.nn.Linear(4, 4), rank=2, alpha=2, init_lora_weights="svd")


# ----------------------------------------------------------------------------------------------
# Adapter files: a fresh base reproduces the trained model exactly
# ----------------------------------------------------------------------------------------------

VARIANTS = {"dora": dict(use_dora=True), "pissa": dict(init_lora_weights="pissa"),
            "olora": dict(init_lora_weights="olora"),
            "pissa+dora+rslora": dict(init_lora_weights="pissa", use_dora=True, rslora=True),
            "olora, layer 0 only": dict(init_lora_weights="olora", layer_selection=[0])}


def named_base(seed: int = 0):
    return tiny_model(tiny_llama_config(), seed=seed, name_or_path=f"tiny-seed{seed}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_then_load_on_a_fresh_base_gives_identical_logits(tmp_path, variant):
    model = with_adapter(named_base(), **VARIANTS[variant])
    perturb(model, seed=8)
    trained = logits(model, X)
    path = save_adapters(model, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    data_driven = "init_lora_weights" in VARIANTS[variant]
    for layer_name in (n for n, m in model.named_modules() if isinstance(m, LoRALinear)):
        assert (f"{layer_name}.lora_A0" in names) == data_driven
        assert (f"{layer_name}.lora_magnitude" in names) == ("use_dora" in VARIANTS[variant])

    fresh = named_base()
    load_adapters(fresh, path)
    assert fresh.peft_configs == model.peft_configs
    assert torch.equal(logits(fresh, X), trained)  # bit-identical: the residual is rebuilt exactly
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    save_adapters(fresh, tmp_path / "again.safetensors")  # and it can be saved again, with the same content
    with safe_open(str(tmp_path / "again.safetensors"), framework="pt") as f, \
            safe_open(str(path), framework="pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in names)

    # Loading into a model that already has the same adapters (from its own SVD of the same base) also works.
    again = with_adapter(named_base(), **VARIANTS[variant])
    load_adapters(again, path)
    assert torch.equal(logits(again, X), trained)


def test_a_pissa_file_is_refused_on_another_base_and_leaves_it_untouched(tmp_path):
    model = with_adapter(named_base(), init_lora_weights="pissa")
    path = save_adapters(model, tmp_path / "adapter.safetensors")
    other = named_base(seed=1)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(AdapterCheckpointError, match="different weights"):
        load_adapters(other, path)
    assert not other.peft_configs and all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def test_a_pissa_file_missing_its_initial_factors_is_refused_and_rolled_back(tmp_path):
    from safetensors.torch import save_file

    model = with_adapter(named_base(), init_lora_weights="pissa", target_modules=["mlp_fc2"])
    path = save_adapters(model, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("lora_B0")}
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=metadata)
    fresh = named_base()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(AdapterCheckpointError, match=r"2 missing \(e\.g\. blocks\.0\.mlp\.mlp_fc2\.lora_B0"):
        load_adapters(fresh, tmp_path / "broken.safetensors")
    assert not fresh.peft_configs and fresh.state_dict().keys() == before.keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


# ----------------------------------------------------------------------------------------------
# Training: the variants learn
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dora", "pissa", "olora"])
def test_a_few_steps_of_training_lower_the_loss(variant):
    torch.manual_seed(0)
    model = with_adapter(tiny_model(), **VARIANTS[variant], adapter_dropout=0.1)
    start = {name: p.detach().clone() for name, p in adapter_parameters(model).items()}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = random_ids(4, 16, seed=1)
    model.train()
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.1, losses
    moved = {name for name, p in adapter_parameters(model).items() if not torch.equal(p, start[name])}
    assert moved == set(start)  # every A, B (and DoRA magnitude) trained...
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)
