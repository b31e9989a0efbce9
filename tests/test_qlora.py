"""QLoRA (``lora_tutorial.qlora``): LoRA on a base whose frozen matrices stay quantized.

The central claim is tested on the real SmolLM2: the Q4_1 layers hold the GGUF's own blocks, so their
weights are *bit-identical* to what the loader makes of the file, and the model's logits (float32 and bf16)
and LoRA gradients are too. The int8 variant re-quantizes and is only close. Tiny models check the custom
autograd Function (input gradient, nothing saved for backward) and the read-only weight (merge refused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_tutorial import load_base_model
from lora_tutorial.peft import LoraPEFTConfig, add_adapter, disable_adapters, merge_lora, remove_adapters
from lora_tutorial.peft.lora import lora_modules
from lora_tutorial.checkpoint_names import GGUF, llama_names, unpermute_rope_rows
from lora_tutorial.pretrained import resolve_model_path
from lora_tutorial.qlora import (DequantizedMatmul, Q4_1Linear, QInt8Linear, QuantizedLinear, QuantizedWeightError,
                                 quantize_base, quantize_q4_1, quantized_layers)
from lora_tutorial.sft_data import SFTCollator, SFTDataset
from lora_tutorial.squad import split_context

from helpers import logits, random_ids, randomize_adapters, tiny_llama_config, tiny_model

SQUAD_SHORT = Path(__file__).resolve().parents[1] / "data" / "SQuAD" / "squad_short_train.jsonl"
PROJECTIONS = ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2")


# ----------------------------------------------------------------------------------------------
# Tiny layers and models (no GGUF file: Q4_1 blocks made with gguf's own quantizer)
# ----------------------------------------------------------------------------------------------

def q4_1_layer(out_features: int = 24, in_features: int = 64, seed: int = 0, bias: bool = False) -> Q4_1Linear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    return Q4_1Linear(quantize_q4_1(w), in_features, b)


def int8_layer(out_features: int = 24, in_features: int = 64, seed: int = 0) -> QInt8Linear:
    torch.manual_seed(seed)
    return QInt8Linear(nn.Linear(in_features, out_features, bias=True))


def tiny_q4_1_model(seed: int = 0):
    """A tiny Llama (d_ff=64: every input width a multiple of 32) with Q4_1 block projections."""
    model = tiny_model(tiny_llama_config(d_ff=64), seed=seed)
    for block in model.blocks:
        for parent, name in ((block.attention, "attention_qkv"), (block.attention, "attention_dense"),
                             (block.mlp, "mlp_fc1"), (block.mlp, "mlp_fc2")):
            layer = getattr(parent, name)
            setattr(parent, name, Q4_1Linear(quantize_q4_1(layer.weight), layer.in_features))
    return model


def test_q4_1_layer_dequantizes_exactly_as_the_gguf_package():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    layer = q4_1_layer()
    reference = dequantize(layer.blocks.numpy(), GGMLQuantizationType.Q4_1)
    assert reference.shape == (24, 64)
    assert torch.equal(layer.dequantized(), torch.from_numpy(np.asarray(reference, dtype=np.float32)))
    assert torch.equal(layer.dequantized(torch.bfloat16), layer.dequantized().bfloat16())
    assert layer.blocks.dtype == torch.uint8 and layer.storage_bytes() == 24 * 64 * 5 // 8  # 5 bits a weight


@pytest.mark.parametrize("make", [q4_1_layer, int8_layer], ids=["q4_1", "int8"])
def test_input_gradient_passes_gradcheck(make):
    layer = make()
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: DequantizedMatmul.apply(t, layer), (x,))


@pytest.mark.parametrize("make", [q4_1_layer, int8_layer], ids=["q4_1", "int8"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_forward_and_input_gradient_equal_f_linear_with_the_dequantized_weight(make, autocast):
    layer = make()
    x = torch.randn(2, 7, layer.in_features)
    grad_y = torch.randn(2, 7, layer.out_features)
    results = []
    for fn in (layer, lambda t: F.linear(t, layer.dequantized(), layer.bias)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = fn(xi)
        y.backward(grad_y.to(y.dtype))
        results.append((y, xi.grad))
    (y, gx), (y_ref, gx_ref) = results
    assert y.dtype == y_ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert gx.dtype == torch.float32
    if autocast:  # bf16 products (bias added after the matmul here, inside the kernel in F.linear): rounding
        torch.testing.assert_close(y.float(), y_ref.float(), atol=0.06, rtol=0.02)
        torch.testing.assert_close(gx, gx_ref, atol=0, rtol=0)  # the same bf16 matmul, then cast
    else:
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-6)


def test_nothing_is_saved_for_backward_and_no_weight_gradient():
    layer = q4_1_layer(bias=True)
    saved = []
    x = torch.randn(4, layer.in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved == []  # no dense (out, in) copy lives between forward and backward
    y.sum().backward()
    assert x.grad is not None and list(layer.parameters()) == []  # frozen: nothing to train


def test_weight_is_read_only_and_merging_lora_into_it_is_refused():
    model = tiny_q4_1_model()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4, alpha=8, target_modules=["all"]), verbose=False)
    randomize_adapters(model, seed=1)
    x = random_ids(2, 9)
    before = logits(model, x)
    layer = lora_modules(model)[0]
    assert isinstance(layer.base, Q4_1Linear) and not layer.base.weight.requires_grad
    assert torch.equal(layer.base.weight, layer.base.dequantized())
    with pytest.raises(QuantizedWeightError, match="cannot be written"):
        merge_lora(model)
    with pytest.raises(QuantizedWeightError):
        layer.base.weight.zero_()
    assert not any(m.merged for m in lora_modules(model))
    assert torch.equal(logits(model, x), before)  # nothing changed
    with disable_adapters(model):
        assert not torch.equal(logits(model, x), before)


def test_dora_on_a_quantized_base_equals_dora_on_the_same_weights_in_float():
    quantized = tiny_q4_1_model()
    dense = tiny_model(tiny_llama_config(d_ff=64))
    for q_block, d_block in zip(quantized.blocks, dense.blocks):  # the dense model gets the dequantized weights
        for name in PROJECTIONS:
            parent = "attention" if name.startswith("attention") else "mlp"
            q, d = getattr(getattr(q_block, parent), name), getattr(getattr(d_block, parent), name)
            d.weight.data.copy_(q.dequantized())
    cfg = LoraPEFTConfig(None, adapter_dim=4, alpha=8, target_modules=["all"], use_dora=True)
    for m in (quantized, dense):
        torch.manual_seed(0)
        add_adapter(m, cfg, verbose=False)
        randomize_adapters(m, seed=2)
    x = random_ids(2, 9)
    torch.testing.assert_close(logits(quantized, x), logits(dense, x), atol=1e-5, rtol=1e-5)


def test_quantize_base_before_or_after_add_adapter_gives_the_same_model():
    cfg = LoraPEFTConfig(None, adapter_dim=4, alpha=8, target_modules=["all"])
    first, second = tiny_model(seed=3), tiny_model(seed=3)
    assert quantize_base(first, "int8") == 4 * first.config.n_layer
    torch.manual_seed(0)
    add_adapter(first, cfg, verbose=False)
    torch.manual_seed(0)
    add_adapter(second, cfg, verbose=False)
    assert quantize_base(second, "int8") == 4 * second.config.n_layer
    assert quantize_base(second, "int8") == 0  # already done
    randomize_adapters(first, seed=4)
    randomize_adapters(second, seed=4)
    x = random_ids(2, 9)
    assert torch.equal(logits(first, x), logits(second, x))
    assert all(isinstance(m.base, QInt8Linear) for m in lora_modules(second))
    assert type(second.lm_head) is nn.Linear  # the (tied) head is not a block projection
    with pytest.raises(ValueError, match="already quantized as int8"):
        quantize_base(second, "q4_1")


@pytest.mark.parametrize("init", ["merged", "pissa"])
def test_quantize_base_refuses_a_merged_or_residual_base_and_changes_nothing(init):
    model = tiny_model(tiny_llama_config(d_ff=64))
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4, alpha=8, target_modules=["all"],
                                      init_lora_weights="pissa" if init == "pissa" else "default"), verbose=False)
    if init == "merged":
        merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora" if init == "merged" else "residual"):
        quantize_base(model, "q4_1")  # refused before any file is read
    assert not quantized_layers(model)


# ----------------------------------------------------------------------------------------------
# The real SmolLM2 (each model loaded once for this module)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32():
    return load_base_model()


@pytest.fixture(scope="module")
def q4_fp32():
    model, _ = load_base_model()
    assert quantize_base(model, "q4_1") == 4 * model.config.n_layer
    return model


@pytest.fixture(scope="module")
def bf16():
    return load_base_model(dtype=torch.bfloat16)[0]


@pytest.fixture(scope="module")
def q4_bf16():
    model, _ = load_base_model(dtype=torch.bfloat16)
    quantize_base(model, "q4_1")
    return model


@pytest.fixture(scope="module")
def squad_batch(fp32):
    _, tokenizer = fp32
    dataset = SFTDataset(str(SQUAD_SHORT), tokenizer, max_seq_length=512, context_splitter=split_context)
    return SFTCollator(tokenizer.pad_id)([dataset[i] for i in (0, 7, 19, 42)])


def test_q4_1_layers_hold_the_gguf_blocks_and_dequantize_to_the_loaded_weights_exactly(fp32, q4_fp32):
    from gguf import GGUFReader

    base, _ = fp32
    layers = quantized_layers(q4_fp32)
    assert len(layers) == 120 and all(isinstance(m, Q4_1Linear) for m in layers.values())
    for name, layer in layers.items():
        w = base.get_submodule(name).weight.detach()
        assert layer.dequantized().dtype == torch.float32
        assert (layer.dequantized() - w).abs().max().item() == 0.0, name
    # the bytes are the file's own (here for the last block's Q|K|V, row-permuted K included)
    path = resolve_model_path("smollm2-135m-instruct")
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    c = q4_fp32.config
    q_name, k_name, v_name = llama_names(c, GGUF)[f"blocks.{c.n_layer - 1}.attention.attention_qkv.weight"]
    parts = [unpermute_rope_rows(torch.from_numpy(np.array(tensors[q_name].data)), c.n_head),
             unpermute_rope_rows(torch.from_numpy(np.array(tensors[k_name].data)), c.n_kv_head),
             torch.from_numpy(np.array(tensors[v_name].data))]
    assert torch.equal(layers[f"blocks.{c.n_layer - 1}.attention.attention_qkv"].blocks, torch.cat(parts))
    # what stays unquantized: the embedding (= tied LM head) and the norms, as loaded
    assert q4_fp32.lm_head.weight is q4_fp32.wte.weight and q4_fp32.wte.weight.dtype == torch.float32
    stored = sum(m.storage_bytes() for m in layers.values())
    n_weights = sum(m.in_features * m.out_features for m in layers.values())
    assert n_weights == 106_168_320 and stored == n_weights * 5 // 8  # 66 MB instead of 425 MB in float32


def test_q4_1_logits_equal_the_float32_base_bit_for_bit(fp32, q4_fp32, squad_batch):
    # Exactly 0, not "float-rounding level": the same float32 weights (see above) go into the same
    # F.linear calls on the same inputs; only when the weight is computed differs.
    base, _ = fp32
    ids = squad_batch["input_ids"][:2]
    assert torch.equal(logits(q4_fp32, ids), logits(base, ids))


def test_q4_1_logits_and_lora_gradients_equal_the_bf16_base_bit_for_bit(bf16, q4_bf16, squad_batch):
    # Under bf16 autocast both multiply bf16(x) by bf16(w): the loader's bf16 weight is the float32
    # dequantized value rounded once, and so is ours. Gradients go through the same bf16 matmuls too.
    ids, labels = squad_batch["input_ids"], squad_batch["labels"]
    assert torch.equal(logits(q4_bf16, ids[:2]), logits(bf16, ids[:2]))
    cfg = LoraPEFTConfig(None, adapter_dim=8, alpha=16, target_modules=["all"], row_init_method="normal")
    grads = []
    for model in (bf16, q4_bf16):
        torch.manual_seed(0)
        add_adapter(model, cfg, verbose=False)
        model.loss(ids, labels).backward()
        grads.append([(p.grad, p.requires_grad) for p in model.parameters() if p.requires_grad])
        remove_adapters(model)  # the fixtures are shared: put the plain layers back
    assert len(grads[0]) == len(grads[1]) == 2 * 4 * 30
    assert all(torch.equal(a, b) and a.abs().sum() > 0 for (a, _), (b, _) in zip(*grads))
    assert not quantized_layers(bf16) and len(quantized_layers(q4_bf16)) == 120


def test_lora_on_the_q4_1_base_trains(squad_batch):
    model, _ = load_base_model(dtype=torch.bfloat16)
    quantize_base(model, "q4_1")
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=8, alpha=16, target_modules=["all"]), verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    ids, labels = squad_batch["input_ids"], squad_batch["labels"]
    losses = []
    model.train()
    for step in range(4):
        loss = model.loss(ids, labels)
        loss.backward()
        if step == 1:  # B starts at zero, so A's gradient is zero at step 0; from step 1 on both move
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # measured: 1.85, 0.47, 0.12, 0.02 (it learns these 4 answers)
    assert all(isinstance(m.base, Q4_1Linear) for m in lora_modules(model))


def test_int8_base_is_close_to_the_float32_base(fp32, squad_batch):
    # Measured on these examples: logits differ by 0.17 on average and 2.5 at most (over 2 x 303 positions
    # x 49,152), the next-token argmax agrees at 97 %, the answer loss moves by 0.006 (1.845 -> 1.839).
    # A wrong scale or row order gives differences of order 10 and a loss far from the base's.
    base, _ = fp32
    model, _ = load_base_model()
    assert quantize_base(model, "int8") == 120
    ids, labels = squad_batch["input_ids"], squad_batch["labels"]
    a, b = logits(base, ids[:2]), logits(model, ids[:2])
    assert (a - b).abs().mean().item() < 0.3 and (a - b).abs().max().item() < 5.0
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9
    with torch.no_grad():
        assert abs(model.loss(ids, labels).item() - base.loss(ids, labels).item()) < 0.05
    for name, layer in quantized_layers(model).items():  # each weight within half a step (+ bf16 scale rounding)
        w = base.get_submodule(name).weight.detach()
        step = layer.scale.float()[:, None]
        assert ((layer.dequantized() - w).abs() <= 0.5 * step * 1.01 + w.abs() * 2**-8).all(), name


def test_quantize_base_refuses_blocks_that_do_not_reproduce_the_weight():
    model, _ = load_base_model(dtype=torch.bfloat16)
    with torch.no_grad():
        model.blocks[3].mlp.mlp_fc2.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="blocks.3.mlp.mlp_fc2's Q4_1 blocks do not reproduce"):
        quantize_base(model, "q4_1")
    assert not quantized_layers(model)  # all or nothing
    assert isinstance(model.blocks[0].attention.attention_qkv, nn.Linear)
    assert not isinstance(model.blocks[0].attention.attention_qkv, QuantizedLinear)
