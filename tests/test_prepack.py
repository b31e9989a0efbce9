"""Weights packed for oneDNN give bit for bit what the plain layers give, and the layers come back as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_tutorial.generation import generate_ids
from lora_tutorial.peft import LoraPEFTConfig, add_adapter
from lora_tutorial.peft.lora import merged_for_inference
from lora_tutorial.precision import cast_frozen_weights, cpu_has_amx
from lora_tutorial.prepack import PACKED_MAX_ROWS, packed_for_evaluation

from helpers import randomize_adapters, tiny_gpt2_config, tiny_llama_config, tiny_model

# Packing is used only where it was measured to pay (AMX); elsewhere the tests of "does nothing" still run.
needs_amx = pytest.mark.skipif(not (cpu_has_amx() and torch.backends.mkldnn.is_available()),
                               reason="prepacking is used only on CPUs with AMX and oneDNN")


def frozen_bf16_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).requires_grad_(False).to(torch.bfloat16)


@needs_amx
@pytest.mark.parametrize("shape", [(1, 64), (16, 64), (PACKED_MAX_ROWS, 64), (PACKED_MAX_ROWS + 1, 64),
                                   (4, 3, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_layer_gives_the_plain_layers_bits(shape, bias):
    layer = frozen_bf16_linear(64, 96, bias)
    x = torch.randn(shape).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x)
        with packed_for_evaluation(layer) as n:
            assert n == 1 and "forward" in vars(layer)
            packed = layer(x)
    assert "forward" not in vars(layer)  # a plain nn.Linear again
    assert packed.dtype == plain.dtype and torch.equal(packed, plain)


@needs_amx
def test_generation_is_unchanged_for_a_merged_lora_model():
    for config in (tiny_llama_config(), tiny_gpt2_config()):  # the GPT-2 style has biases
        model = tiny_model(config)
        add_adapter(model, LoraPEFTConfig(None, target_modules=["attention_qkv", "mlp_fc1"], adapter_dim=4,
                                          alpha=8), verbose=False)
        randomize_adapters(model)
        cast_frozen_weights(model, torch.bfloat16)
        prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [3]]
        with merged_for_inference(model):
            plain = generate_ids(model, prompts, tokens_to_generate=8)
            with packed_for_evaluation(model) as n:
                # every block's four matrices (LoRA's merged bases included) and the LM head
                assert n == 4 * config.n_layer + 1
                assert generate_ids(model, prompts, tokens_to_generate=8) == plain
        assert not any("forward" in vars(m) for m in model.modules())


def test_float32_weights_and_trainable_layers_are_left_alone():
    model = tiny_model()  # float32
    trainable = frozen_bf16_linear(8, 8, False).requires_grad_(True)
    for module in (model, trainable):
        with packed_for_evaluation(module) as n:
            assert n == 0
            assert not any("forward" in vars(m) for m in module.modules())


@needs_amx
def test_a_failure_while_packing_restores_the_layers_packed_so_far(monkeypatch):
    model = nn.Sequential(frozen_bf16_linear(16, 16, False), frozen_bf16_linear(16, 16, False))
    real = torch.ops.mkldnn._reorder_linear_weight
    calls = []

    def fail_second(weight, batch_size):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("oneDNN: out of memory")
        return real(weight, batch_size)

    monkeypatch.setattr("lora_tutorial.prepack.torch.ops.mkldnn._reorder_linear_weight", fail_second)
    with pytest.raises(RuntimeError, match="out of memory"), packed_for_evaluation(model):
        pass
    assert len(calls) == 2 and not any("forward" in vars(m) for m in model)


@needs_amx
def test_nested_blocks_pack_once_and_unpack_in_order():
    layer = frozen_bf16_linear(64, 32, False)
    with packed_for_evaluation(layer) as outer:
        forward = vars(layer)["forward"]
        with packed_for_evaluation(layer) as inner:
            assert (outer, inner) == (1, 0) and vars(layer)["forward"] is forward
        assert vars(layer)["forward"] is forward  # the inner block did not take the outer one's away
    assert "forward" not in vars(layer)


@needs_amx
def test_a_float32_input_without_autocast_gets_what_the_plain_layer_gives():
    layer = frozen_bf16_linear(64, 32, False)
    x = torch.randn(2, 64)
    with packed_for_evaluation(layer), pytest.raises(RuntimeError) as packed_error:
        layer(x)  # float32 input, bf16 weight, no autocast: the plain layer refuses it, and so must this
    with pytest.raises(RuntimeError) as plain_error:
        layer(x)
    assert str(packed_error.value) == str(plain_error.value)
