"""PEFT methods on tiny random models: inserting, counting (by hand), training only the adapters, starting at the
base model, merging, switching off, taking out again (the module surgery of wrapping.py), p-tuning, bf16 bases;
plus parameter counts and a few training steps on the real base."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_tutorial.generation import generate_ids
from lora_tutorial.model import GPT
from lora_tutorial.peft import (AdapterPEFTConfig, IA3PEFTConfig, LoRALinear, LoraPEFTConfig, ParameterSummary,
                                PtuningPEFTConfig, add_adapter, adapter_parameters, disable_adapters,
                                freeze_prompt_encoder, merge_and_unload, merge_lora, parameter_summary,
                                peft_configs_from_scheme, remove_adapters, unmerge_lora)
from lora_tutorial.peft.adapter import AdapterLinear
from lora_tutorial.peft.ia3 import IA3FFN
from lora_tutorial.peft.ptuning import FrozenPrompt, PromptEncoder
from lora_tutorial.peft.wrapping import is_peft_module, replace_module, target_name, unwrap, wrap_targets
from lora_tutorial.precision import cast_frozen_weights

from helpers import (TINY_LLAMA_PARAMS, TINY_LORA_R4, logits, random_ids, randomize_adapters, tiny_gpt2_config,
                     tiny_model)

# P-tuning with 3 virtual tokens from an 8-wide table through a 16-wide MLP into d_model 32, counted by hand:
# table 3 x 8, Linear(8, 16) 8 x 16 + 16, Linear(16, 32) 16 x 32 + 32.
PTUNING_PARAMS = 3 * 8 + (8 * 16 + 16) + (16 * 32 + 32)


def small(scheme: str):
    """Small configs of each method for the tiny model."""
    return {
        "lora": [LoraPEFTConfig(None, target_modules=["all"], adapter_dim=4, alpha=8)],
        "adapter": [AdapterPEFTConfig(None, adapter_dim=8)],
        "adapter_post": [AdapterPEFTConfig(None, adapter_dim=8, norm_position="post")],
        "ia3": [IA3PEFTConfig()],
        "ptuning": [PtuningPEFTConfig(None, virtual_tokens=3, bottleneck_dim=16, embedding_dim=8)],
        "lora+ptuning": [LoraPEFTConfig(None, adapter_dim=4),
                         PtuningPEFTConfig(None, virtual_tokens=3, bottleneck_dim=16, embedding_dim=8)],
        "everything": [LoraPEFTConfig(None, adapter_dim=4), IA3PEFTConfig(), AdapterPEFTConfig(None, adapter_dim=8),
                       PtuningPEFTConfig(None, virtual_tokens=3, bottleneck_dim=16, embedding_dim=8)],
    }[scheme]


SCHEMES = ["lora", "adapter", "adapter_post", "ia3", "ptuning", "lora+ptuning", "everything"]

# ----------------------------------------------------------------------------------------------
# Inserting adapters: counting, freezing, starting at the base model
# ----------------------------------------------------------------------------------------------


def test_add_adapter_counts_by_hand_against_the_base(capsys):
    model = tiny_model()
    summary = add_adapter(model, small("lora"))
    lora = 2 * sum(TINY_LORA_R4.values())  # two layers, four targets each
    assert summary == ParameterSummary(base=TINY_LLAMA_PARAMS, trainable=lora, added=lora, methods=["lora"])
    assert summary.percent_of_base == pytest.approx(100 * 2944 / 18752)  # of the base, not of base + adapters
    printed = capsys.readouterr().out
    assert printed.strip() == str(summary).strip() and f"{lora:,}" in printed and "15.70 %" in printed
    # A second method: the base count stays, the shares add up.
    summary = add_adapter(model, small("ptuning"), verbose=False)
    assert summary == ParameterSummary(TINY_LLAMA_PARAMS, lora + PTUNING_PARAMS, lora + PTUNING_PARAMS,
                                       ["lora", "ptuning"])
    assert summary.percent_of_base == pytest.approx(100 * (lora + PTUNING_PARAMS) / TINY_LLAMA_PARAMS)
    assert [c.scheme for c in model.peft_configs] == ["lora", "ptuning"]
    with pytest.raises(ValueError, match="twice"):
        add_adapter(model, LoraPEFTConfig(), verbose=False)
    # The encoder collapses into its (3, 32) output table, which is not trained further.
    freeze_prompt_encoder(model)
    assert parameter_summary(model) == ParameterSummary(TINY_LLAMA_PARAMS, lora, lora + 3 * 32, ["lora", "ptuning"])


def test_ia3_and_adapter_counts_by_hand():
    ia3 = add_adapter(tiny_model(), small("ia3"), verbose=False)
    assert ia3.trainable == 2 * (16 + 16 + 48)  # per layer: keys (2 heads x 8), values (2 x 8), FFN hidden (48)
    adapter = add_adapter(tiny_model(), small("adapter"), verbose=False)
    # per layer, after attention and after the MLP: LayerNorm(32) weight + bias, down 32 x 8, up 8 x 32 (no biases)
    assert adapter.trainable == 2 * 2 * (2 * 32 + 32 * 8 + 8 * 32)
    assert adapter.base == ia3.base == TINY_LLAMA_PARAMS


def test_a_second_add_adapter_keeps_the_first_adapters_trainable():
    model = tiny_model()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4), verbose=False)
    add_adapter(model, small("ptuning"), verbose=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(adapter_parameters(model)) and any("lora_A" in n for n in names)
    other = tiny_model()
    add_adapter(other, IA3PEFTConfig(), verbose=False)
    with pytest.raises(ValueError, match="add LoRA first"):
        add_adapter(other, LoraPEFTConfig(), verbose=False)


def test_add_adapter_rejects_what_is_not_a_peft_config():
    with pytest.raises(TypeError, match="LoraPEFTConfig"):
        add_adapter(tiny_model(), {"peft_scheme": "lora"}, verbose=False)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_only_adapters_train_and_base_weights_stay_bit_identical(scheme):
    model = tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    originals = {n: unwrap(m) for n, m in model.named_modules()}
    add_adapter(model, small(scheme), verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model)) and trainable
    model.train()
    # The optimizer gets *every* parameter: frozen ones must be skipped because they have no gradient.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = random_ids(2, 12)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.loss(x, x).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    # every base tensor, found through the wrappers, is bit-identical
    for name, tensor in base.items():
        module_name, _, attr = name.rpartition(".")
        layer = originals[module_name] if module_name in originals else model.get_submodule(module_name)
        assert torch.equal(getattr(layer, attr), tensor), name


@pytest.mark.parametrize("scheme", ["lora", "adapter", "adapter_post", "ia3", "everything"])
def test_fresh_adapters_leave_the_logits_unchanged(scheme):
    model = tiny_model()
    x = random_ids(2, 12)
    reference = logits(model, x)
    add_adapter(model, small(scheme), verbose=False)
    if scheme != "everything":  # (a fresh p-tuning prompt is random: it changes the logits from the start)
        assert torch.equal(logits(model, x), reference)
    randomize_adapters(model)  # ...and the test can fail: trained adapters do change them
    assert (logits(model, x) - reference).abs().max() > 1e-3


def test_every_method_also_fits_a_gpt2_style_model():
    """Biases, LayerNorm, learned positions and a GELU MLP (mlp_fc1 not fused) work the same way."""
    model = tiny_model(tiny_gpt2_config())
    x = random_ids(2, 12)
    reference = logits(model, x)
    add_adapter(model, [*small("lora"), IA3PEFTConfig(), AdapterPEFTConfig(None, adapter_dim=8)], verbose=False)
    fc2 = model.blocks[0].mlp.mlp_fc2
    assert isinstance(fc2, AdapterLinear) and isinstance(fc2.base, IA3FFN) and isinstance(fc2.base.base, LoRALinear)
    assert torch.equal(logits(model, x), reference)
    add_adapter(model, small("ptuning"), verbose=False)
    randomize_adapters(model)
    tuned = logits(model, x)
    assert tuned.shape == reference.shape and (tuned - reference).abs().max() > 1e-3
    with disable_adapters(model):
        assert torch.equal(logits(model, x), reference)


@pytest.mark.parametrize("rslora, scale", [(False, 8 / 4), (True, 8 / 2)])
def test_lora_forward_is_base_plus_scaled_b_a(rslora, scale):
    layer = LoRALinear(nn.Linear(8, 6), rank=4, alpha=8, rslora=rslora, row_init_method="normal")
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layer.base(x) + scale * x @ layer.lora_A.T @ layer.lora_B.T
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer.delta_weight(), scale * layer.lora_B @ layer.lora_A)
    with pytest.raises(TypeError, match="linear layer"):
        LoRALinear(nn.Conv1d(2, 2, 1), rank=2, alpha=2)


# ----------------------------------------------------------------------------------------------
# The module surgery: replace_module, unwrap, remove_adapters
# ----------------------------------------------------------------------------------------------


def test_target_names_are_where_the_layers_live():
    model = tiny_model()
    for target, parent in (("attention_qkv", "attention"), ("mlp_fc2", "mlp")):
        assert model.get_submodule(target_name(1, target)) is getattr(getattr(model.blocks[1], parent), target)


def test_replace_module_swaps_and_swapping_back_restores_the_model():
    model = tiny_model()
    x = random_ids(2, 8)
    reference = logits(model, x)
    name = target_name(0, "mlp_fc1")
    original = model.get_submodule(name)
    zero = nn.Linear(original.in_features, original.out_features, bias=False)
    nn.init.zeros_(zero.weight)
    assert replace_module(model, name, zero) is original
    assert model.get_submodule(name) is zero and not torch.equal(logits(model, x), reference)
    assert replace_module(model, name, original) is zero
    assert model.get_submodule(name) is original and torch.equal(logits(model, x), reference)


def test_unwrap_finds_the_original_layer_under_every_wrapper():
    model = tiny_model()
    originals = {n: model.get_submodule(target_name(i, t)) for i in range(2)
                 for t in ("attention_qkv", "attention_dense", "mlp_fc2") for n in [target_name(i, t)]}
    add_adapter(model, small("everything"), verbose=False)
    for name, original in originals.items():
        wrapped = model.get_submodule(name)
        assert is_peft_module(wrapped) and unwrap(wrapped) is original
    assert unwrap(originals[target_name(0, "mlp_fc2")]) is originals[target_name(0, "mlp_fc2")]
    assert not is_peft_module(originals[target_name(0, "mlp_fc2")])


def test_wrap_targets_wraps_exactly_the_named_layers():
    model = tiny_model()
    names = wrap_targets(model, [1], ["attention_dense", "mlp_fc1"], lambda m: AdapterLinear(m, nn.Identity()))
    assert names == [target_name(1, "attention_dense"), target_name(1, "mlp_fc1")]
    wrapped = {n for n, m in model.named_modules() if is_peft_module(m)}
    assert wrapped == set(names)


@pytest.mark.parametrize("scheme", ["lora", "ia3", "lora+ptuning", "everything"])
def test_remove_adapters_puts_the_original_modules_back(scheme):
    """Also where wrappers are nested (everything: adapter over IA3 over LoRA on mlp_fc2)."""
    model = tiny_model()
    x = random_ids(2, 10)
    reference = logits(model, x)
    modules = dict(model.named_modules())
    keys = set(model.state_dict())
    add_adapter(model, small(scheme), verbose=False)
    randomize_adapters(model)
    assert not torch.equal(logits(model, x), reference)
    assert remove_adapters(model) is model
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)
    assert set(model.state_dict()) == keys
    assert model.peft_configs == [] and model.virtual_prompt is None
    assert torch.equal(logits(model, x), reference)
    add_adapter(model, small("lora"), verbose=False)  # and the model takes adapters again
    assert parameter_summary(model).base == TINY_LLAMA_PARAMS


# ----------------------------------------------------------------------------------------------
# Merging and switching off
# ----------------------------------------------------------------------------------------------


def test_merge_unmerge_and_merge_and_unload():
    model = tiny_model()
    base_weight = model.blocks[0].mlp.mlp_fc1.weight.detach().clone()
    plain_keys = set(model.state_dict())
    add_adapter(model, small("lora"), verbose=False)
    randomize_adapters(model)
    x = random_ids(2, 12)
    unmerged = logits(model, x)
    assert merge_lora(model) == 8
    assert (logits(model, x) - unmerged).abs().max() < 1e-5
    layer = model.blocks[0].mlp.mlp_fc1
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, base_weight + layer.delta_weight())
    once = layer.base.weight.detach().clone()
    merge_lora(model)  # merging twice is a no-op
    assert torch.equal(layer.base.weight, once)
    unmerge_lora(model)
    unmerge_lora(model)
    assert not layer.merged and (layer.base.weight - base_weight).abs().max() < 1e-6
    assert (logits(model, x) - unmerged).abs().max() < 1e-5

    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.peft_configs == []
    assert set(model.state_dict()) == plain_keys  # a plain model again
    assert (logits(model, x) - unmerged).abs().max() < 1e-5


def test_disable_adapters_gives_the_base_model_and_then_reenables():
    model = tiny_model()
    x = random_ids(2, 12)
    base = logits(model, x)
    add_adapter(model, small("everything"), verbose=False)
    randomize_adapters(model)
    tuned = logits(model, x)
    assert (tuned - base).abs().max() > 1e-2
    with disable_adapters(model):
        assert torch.equal(logits(model, x), base)
        assert model.n_virtual_tokens == 0
    assert torch.equal(logits(model, x), tuned)
    # With LoRA merged, disabling unmerges for the duration (exact up to rounding) and merges again.
    merge_lora(model)
    with disable_adapters(model):
        assert (logits(model, x) - base).abs().max() < 1e-5
    assert model.blocks[0].attention.attention_qkv.base.merged
    assert (logits(model, x) - tuned).abs().max() < 1e-5


def test_disable_adapters_restores_them_after_an_error():
    model = tiny_model()
    add_adapter(model, small("lora+ptuning"), verbose=False)
    prompt = model.virtual_prompt
    with pytest.raises(RuntimeError):
        with disable_adapters(model):
            raise RuntimeError("boom")
    assert model.virtual_prompt is prompt
    assert all(m.adapter_enabled for m in model.modules() if isinstance(m, LoRALinear))


# ----------------------------------------------------------------------------------------------
# P-tuning
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def ptuned() -> GPT:
    model = tiny_model(seed=1)
    add_adapter(model, small("ptuning"), verbose=False)
    return model


def test_ptuning_prepends_virtual_tokens_and_keeps_outputs_aligned(ptuned):
    x = random_ids(2, 7)
    out = logits(ptuned, x)
    assert out.shape == (2, 7, ptuned.config.vocab_size)
    assert isinstance(ptuned.virtual_prompt, PromptEncoder) and ptuned.n_virtual_tokens == 3


@pytest.mark.parametrize("make_model", [tiny_model, lambda: tiny_model(tiny_gpt2_config())])
def test_virtual_tokens_equal_to_real_embeddings_act_like_those_tokens_prepended(make_model):
    """A virtual prompt is extra embeddings in front of the input, at positions 0..n-1: a table holding the
    embeddings of three real tokens must give exactly the logits of the input with those tokens prepended."""
    model = make_model()
    x = random_ids(2, 7, seed=9)
    prefix = torch.tensor([[11, 12, 13]]).expand(2, 3)
    expected = logits(model, torch.cat([prefix, x], dim=1))[:, 3:]
    model.virtual_prompt = FrozenPrompt(model.wte.weight[prefix[0]].detach())
    torch.testing.assert_close(logits(model, x), expected)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # and with left padding, at the real positions
    alone = logits(model, x[:1, 2:])
    torch.testing.assert_close(logits(model, x, attention_mask=mask)[0, 2:], alone[0])


def test_ptuning_generation_with_and_without_cache_and_with_left_padding(ptuned):
    prompts = [random_ids(1, 5, seed=3)[0].tolist(), random_ids(1, 9, seed=4)[0].tolist(),
               random_ids(1, 2, seed=5)[0].tolist()]
    cached = generate_ids(ptuned, prompts, tokens_to_generate=8, use_cache=True)
    uncached = generate_ids(ptuned, prompts, tokens_to_generate=8, use_cache=False)
    singles = [generate_ids(ptuned, [p], tokens_to_generate=8)[0] for p in prompts]
    assert cached == uncached == singles
    assert all(len(row) == 8 for row in cached)
    with disable_adapters(ptuned):  # the prompt matters: without it the model says something else
        assert generate_ids(ptuned, prompts, tokens_to_generate=8) != cached
    # Padded logits equal unpadded ones for the real positions.
    x = torch.tensor([[0, 0, 0, 0, *prompts[0]], prompts[1]])
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [1] * 9])
    padded = logits(ptuned, x, attention_mask=mask)
    alone = logits(ptuned, torch.tensor([prompts[0]]))
    assert (padded[0, 4:] - alone[0]).abs().max() < 1e-5


def test_freezing_the_prompt_encoder_keeps_the_logits(ptuned):
    randomize_adapters(ptuned)
    x = random_ids(2, 12)
    before = logits(ptuned, x)
    table = freeze_prompt_encoder(ptuned)
    assert isinstance(ptuned.virtual_prompt, FrozenPrompt) and table.table.shape == (3, ptuned.config.d_model)
    assert freeze_prompt_encoder(ptuned) is table  # idempotent
    assert torch.equal(logits(ptuned, x), before)
    assert ptuned.num_parameters(trainable_only=True) == 0
    with pytest.raises(ValueError, match="no p-tuning prompt encoder"):
        freeze_prompt_encoder(tiny_model())


# ----------------------------------------------------------------------------------------------
# Adapters on a bf16 base are float32
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["lora", "adapter", "ia3", "ptuning"])
def test_adapters_on_a_bf16_base_are_float32_and_train(scheme):
    model = tiny_model().requires_grad_(False)
    cast_frozen_weights(model, torch.bfloat16)
    add_adapter(model, small(scheme), verbose=False)
    params = adapter_parameters(model)
    assert params and all(p.dtype == torch.float32 for p in params.values())
    assert model.wte.weight.dtype == torch.bfloat16
    model.train()
    x = random_ids(2, 10)
    loss = model.loss(x, x)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in params.values()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------------------------
# The real base model: parameter counts and a few training steps
# ----------------------------------------------------------------------------------------------

EXAMPLES = [
    ("User: Context: The Eiffel Tower was completed in 1889 for the World's Fair in Paris. "
     "Question: When was the Eiffel Tower completed?\n\nAssistant:", "1889"),
    ("User: Context: Marie Curie was the first woman to win a Nobel Prize, in physics in 1903. "
     "Question: In which field did Marie Curie win her first Nobel Prize?\n\nAssistant:", "physics"),
]


@pytest.fixture(scope="module")
def real_batch(smollm2):
    """Two SQuAD-style examples, right-padded, labels on the answer tokens only."""
    _, tokenizer = smollm2
    rows, labels = [], []
    for prompt, answer in EXAMPLES:
        prompt_ids = tokenizer.encode(prompt)
        full = tokenizer.encode(f"{prompt} {answer}") + [tokenizer.eos_id]
        assert full[:len(prompt_ids)] == prompt_ids
        rows.append(full)
        labels.append([-100] * len(prompt_ids) + full[len(prompt_ids):])
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return input_ids, label_ids, mask


# SmolLM2-135M: d_model 576, 30 layers, 9 query heads and 3 key/value heads of 64, d_ff 1536, vocab 49152.
LORA_R32_ALL = 30 * 32 * ((576 + 960) + (576 + 576) + (576 + 2 * 1536) + (1536 + 576))  # A r x in + B out x r
ADAPTER_32 = 30 * 2 * (2 * 576 * 32 + 2 * 576)  # two adapters per layer: down + up, LayerNorm weight + bias
IA3 = 30 * (192 + 192 + 1536)
PTUNING_10 = 10 * 1024 + (1024 * 1024 + 1024) + (1024 * 576 + 576)


@pytest.mark.slow
@pytest.mark.parametrize("scheme, expected", [
    ("lora", LORA_R32_ALL), ("adapter", ADAPTER_32), ("ia3", IA3), ("ptuning", PTUNING_10),
    ("lora,ptuning", LORA_R32_ALL + PTUNING_10)])
def test_default_trainable_parameter_counts_on_the_real_base(smollm2, scheme, expected):
    model = copy.deepcopy(smollm2[0])
    summary = add_adapter(model, peft_configs_from_scheme({"peft": {"peft_scheme": scheme}}), verbose=False)
    assert summary.base == 134_515_008
    assert summary.trainable == summary.added == expected
    assert model.num_parameters() == 134_515_008 + expected


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["lora", "adapter", "ia3", "ptuning", "lora,ptuning"])
def test_a_few_steps_lower_the_answer_loss_on_the_real_model(smollm2, real_batch, scheme):
    torch.manual_seed(0)  # the adapters' random init
    model = copy.deepcopy(smollm2[0])
    add_adapter(model, peft_configs_from_scheme({"peft": {"peft_scheme": scheme}}), verbose=False)
    input_ids, labels, mask = real_batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model.loss(input_ids, labels, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model.loss(input_ids, labels, mask).item())
    assert losses[-1] < losses[0] - 0.05, losses
