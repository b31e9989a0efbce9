"""Mixed precision: bf16 frozen matrices, float32 adapters, residual stream and CPU attention."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_tutorial.generation import generate_ids
from lora_tutorial.peft import LoraPEFTConfig, add_adapter
from lora_tutorial.precision import autocast_like, cast_frozen_weights, trainable_dtype

from helpers import assert_agrees_with_fp32_and_answers, random_ids, tiny_model


def tiny_lora_model():
    model = tiny_model()
    add_adapter(model, LoraPEFTConfig(None, target_modules=["attention_qkv", "mlp_fc1"], adapter_dim=4, alpha=4,
                                      row_init_method="normal"), verbose=False)
    return model


def test_cast_frozen_weights_casts_only_frozen_matrices():
    model = tiny_lora_model()
    frozen_matrices = {id(p): p.numel() for p in model.parameters() if not p.requires_grad and p.dim() >= 2}
    cast = cast_frozen_weights(model)
    assert cast == sum(frozen_matrices.values())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name  # adapters: AdamW needs float32
        elif p.dim() >= 2:
            assert p.dtype == torch.bfloat16, name
        else:
            assert p.dtype == torch.float32, name  # norm gains
    assert model.lm_head.weight is model.wte.weight  # still tied
    assert model.wte.weight.dtype == torch.bfloat16  # what GPT looks at to switch autocast on
    assert cast_frozen_weights(model) == 0  # idempotent


def test_bf16_weights_give_the_autocast_loss_and_float32_gradients():
    model = tiny_lora_model().train()
    ids = random_ids(2, 12, model.config.vocab_size)
    labels = ids.clone()
    labels[:, :6] = -100
    fp32_loss = model.loss(ids, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss = model.loss(ids, labels)
    mixed = copy.deepcopy(model)
    cast_frozen_weights(mixed)
    mixed_loss = mixed.loss(ids, labels)  # no autocast here: the model switches it on for bf16 weights
    # Storing the frozen matrices in bf16 changes nothing autocast did not already round (the embedding
    # lookup aside), and both stay near the float32 loss.
    assert abs(mixed_loss.item() - autocast_loss.item()) < 2e-2
    assert abs(mixed_loss.item() - fp32_loss.item()) < 5e-2
    mixed_loss.backward()
    grads = [p.grad for p in mixed.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_cpu_autocast_keeps_the_residual_stream_float32_and_rounds_norm_outputs_once():
    model = tiny_model()
    residual_dtypes = []
    model.blocks[0].register_forward_hook(lambda module, args, out: residual_dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(1, 8)  # with gradients enabled: float32 attention on every CPU
        hidden = model.hidden_states(random_ids(1, 5, model.config.vocab_size), cache=cache)
    assert residual_dtypes == [torch.float32]
    assert cache.keys[0].dtype == torch.float32
    assert hidden.dtype == torch.bfloat16  # the final norm's output: only the LM head's matmul reads it
    assert cache.length == 5 and cache.keys[0][:, :, :5].abs().sum() > 0


def test_forward_only_attention_is_bf16_exactly_where_the_cpu_has_amx():
    from lora_tutorial.precision import cpu_has_amx

    model = tiny_model()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(1, 8)
    assert cache.keys[0].dtype == (torch.bfloat16 if cpu_has_amx() else torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):  # fp16 autocast: never bf16 attention
        assert model.new_cache(1, 8).keys[0].dtype == torch.float32


def test_trainable_tensors_are_at_least_float32():
    assert trainable_dtype(torch.bfloat16) == trainable_dtype(torch.float16) == torch.float32
    assert trainable_dtype(torch.float32) == torch.float32 and trainable_dtype(torch.float64) == torch.float64


def test_autocast_like_is_a_no_op_for_float32_weights():
    model = tiny_model()
    with autocast_like(model.wte.weight):
        assert not torch.is_autocast_enabled("cpu")
    model = model.to(torch.bfloat16)
    with autocast_like(model.wte.weight):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize("padded", [False, True])
def test_bf16_cached_generation_matches_its_own_uncached_generation(padded):
    model = tiny_model().to(torch.bfloat16)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]] if padded else [[5, 6, 7, 8, 9]]
    cached = generate_ids(model, prompts, tokens_to_generate=6)
    uncached = generate_ids(model, prompts, tokens_to_generate=6, use_cache=False)
    assert cached == uncached and all(len(row) == 6 for row in cached)


def test_bf16_smollm2_agrees_with_float32(smollm2):
    """The real model loaded with bf16 weights (RoPE tables stay float32) still behaves like float32."""
    from lora_tutorial import load_base_model

    model, tokenizer = smollm2
    bf16, _ = load_base_model(dtype=torch.bfloat16)
    assert bf16.blocks[0].attention.attention_qkv.weight.dtype == torch.bfloat16
    assert bf16.blocks[0].norm_1.weight.dtype == bf16.norm_f.weight.dtype == torch.float32  # 1-D gains stay
    assert bf16.rope_cos.dtype == torch.float32
    assert_agrees_with_fp32_and_answers(model, bf16, tokenizer, min_agreement=0.9)
