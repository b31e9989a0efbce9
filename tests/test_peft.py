"""PEFT methods on tiny random models (fast), plus parameter counts and a few training steps on the real base."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lora_tutorial.generation import generate_ids
from lora_tutorial.model import GPT, GPTConfig, init_weights
from lora_tutorial.peft import (AdapterLinear, AdapterPEFTConfig, FrozenPrompt, IA3PEFTConfig, LoRALinear,
                                LoraPEFTConfig, PromptEncoder, PtuningPEFTConfig, add_adapter,
                                adapter_parameters, disable_adapters, freeze_prompt_encoder, merge_and_unload,
                                merge_lora, peft_configs_from_scheme, unmerge_lora)

VOCAB = 97


def tiny_base(seed: int = 0) -> GPT:
    config = GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=128)
    return init_weights(GPT(config), std=0.1, seed=seed).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def small(scheme: str):
    """Small configs of each method (and LoRA on every target), for the tiny model."""
    return {
        "lora": [LoraPEFTConfig(None, target_modules=["all"], adapter_dim=4, alpha=8)],
        "adapter": [AdapterPEFTConfig(None, adapter_dim=8)],
        "adapter_post": [AdapterPEFTConfig(None, adapter_dim=8, norm_position="post")],
        "ia3": [IA3PEFTConfig()],
        "ptuning": [PtuningPEFTConfig(None, virtual_tokens=3, bottleneck_dim=16, embedding_dim=8)],
        "lora+ptuning": [LoraPEFTConfig(None, adapter_dim=4),
                         PtuningPEFTConfig(None, virtual_tokens=3, bottleneck_dim=16, embedding_dim=8)],
    }[scheme]


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Move every adapter tensor away from its (output-preserving) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

SCHEMA = {
    "lora_tuning": {"target_modules": ["attention_qkv"], "adapter_dim": 32, "alpha": 32, "adapter_dropout": 0.0,
                    "column_init_method": "xavier", "row_init_method": "zero", "layer_selection": None,
                    "rslora": False},
    "adapter_tuning": {"adapter_dim": 32, "adapter_dropout": 0.0, "norm_position": "pre", "layer_selection": None,
                       "column_init_method": "xavier", "row_init_method": "zero"},
    "ia3_tuning": {"layer_selection": None},
    "p_tuning": {"virtual_tokens": 10, "bottleneck_dim": 1024, "embedding_dim": 1024, "init_std": 0.023},
}
CLASSES = {"lora_tuning": LoraPEFTConfig, "adapter_tuning": AdapterPEFTConfig, "ia3_tuning": IA3PEFTConfig,
           "p_tuning": PtuningPEFTConfig}


@pytest.mark.parametrize("section", SCHEMA)
def test_config_defaults_match_the_nemo_schema(section):
    cls = CLASSES[section]
    assert cls().to_dict() == SCHEMA[section]
    assert cls({"peft": {}}).to_dict() == SCHEMA[section]  # a missing section means defaults
    assert cls(OmegaConf.create({"peft": {section: SCHEMA[section]}})).to_dict() == SCHEMA[section]


def test_config_reads_a_dictconfig_and_a_plain_dict():
    yaml = """
    peft:
      peft_scheme: lora
      lora_tuning: {target_modules: [attention, mlp_fc2], adapter_dim: 8, alpha: 16, layer_selection: [3, 1]}
    """
    cfg = LoraPEFTConfig(OmegaConf.create(yaml))
    assert cfg.scheme == "lora" and cfg.adapter_dim == 8 and cfg.alpha == 16
    assert cfg.target_modules == ["attention_qkv", "attention_dense", "mlp_fc2"]  # shortcuts expanded
    assert cfg.layer_selection == [1, 3]
    assert LoraPEFTConfig(OmegaConf.to_container(OmegaConf.create(yaml))) == cfg
    assert LoraPEFTConfig.from_dict(cfg.to_dict()) == cfg
    assert LoraPEFTConfig(None, target_modules="all").target_modules == [
        "attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2"]


@pytest.mark.parametrize("section", SCHEMA)
def test_config_unknown_key_is_named(section):
    with pytest.raises(ValueError, match=rf"model\.peft\.{section}\.adpter_dim"):
        CLASSES[section]({"peft": {section: {"adpter_dim": 8}}})


@pytest.mark.parametrize("cls,knobs,match", [
    (LoraPEFTConfig, {"target_modules": ["attention_qkvv"]}, "target_modules"),
    (LoraPEFTConfig, {"adapter_dim": 0}, "adapter_dim"),
    (LoraPEFTConfig, {"column_init_method": "uniform"}, "column_init_method"),
    (LoraPEFTConfig, {"column_init_method": "zero", "row_init_method": "zero"}, "never learn"),
    (LoraPEFTConfig, {"adapter_dropout": 1.0}, "adapter_dropout"),
    (LoraPEFTConfig, {"layer_selection": []}, "layer_selection"),
    (AdapterPEFTConfig, {"norm_position": "middle"}, "norm_position"),
    (IA3PEFTConfig, {"layer_selection": [1, 1]}, "duplicates"),
    (PtuningPEFTConfig, {"virtual_tokens": -1}, "virtual_tokens"),
])
def test_config_rejects_bad_values(cls, knobs, match):
    with pytest.raises(ValueError, match=match):
        cls(None, **knobs)


def test_layer_selection_is_checked_against_the_model():
    with pytest.raises(ValueError, match=r"out of range.*0\.\.1"):
        add_adapter(tiny_base(), LoraPEFTConfig(None, layer_selection=[2]), verbose=False)
    model = tiny_base()
    add_adapter(model, IA3PEFTConfig(None, layer_selection=[1]), verbose=False)
    assert isinstance(model.blocks[0].attention.attention_qkv, nn.Linear)
    assert not isinstance(model.blocks[1].attention.attention_qkv, nn.Linear)


def test_peft_configs_from_scheme():
    cfg = {"peft": {"peft_scheme": "lora,ptuning", "p_tuning": {"virtual_tokens": 4}}}
    lora, ptuning = peft_configs_from_scheme(OmegaConf.create(cfg))
    assert (lora.scheme, ptuning.scheme, ptuning.virtual_tokens) == ("lora", "ptuning", 4)
    assert [c.scheme for c in peft_configs_from_scheme({"peft": {"peft_scheme": "ia3"}})] == ["ia3"]
    assert [c.scheme for c in peft_configs_from_scheme({"peft": {"peft_scheme": "adapter"}})] == ["adapter"]
    assert peft_configs_from_scheme({"peft": {"peft_scheme": "none"}}) == []
    with pytest.raises(ValueError, match="unknown method 'loar'"):
        peft_configs_from_scheme({"peft": {"peft_scheme": "loar"}})
    with pytest.raises(ValueError, match="twice"):
        peft_configs_from_scheme({"peft": {"peft_scheme": "lora,lora"}})


# ----------------------------------------------------------------------------------------------
# Inserting adapters: freezing, counting, starting at the base model
# ----------------------------------------------------------------------------------------------

def test_add_adapter_summary_counts_and_table(capsys):
    model = tiny_base()
    summary = add_adapter(model, LoraPEFTConfig(None, adapter_dim=4))
    qkv_out = 64 + 2 * 2 * 16
    assert summary.trainable_after == 2 * 4 * (64 + qkv_out)
    assert summary.total_after == summary.total_before + summary.trainable_after
    assert summary.trainable_before == summary.total_before
    printed = capsys.readouterr().out
    assert printed.strip() == str(summary).strip() and f"{summary.trainable_after:,}" in printed
    assert [c.scheme for c in model.peft_configs] == ["lora"]
    with pytest.raises(ValueError, match="twice"):
        add_adapter(model, LoraPEFTConfig(), verbose=False)


def test_a_second_add_adapter_keeps_the_first_adapters_trainable():
    model = tiny_base()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4), verbose=False)
    add_adapter(model, small("ptuning"), verbose=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(adapter_parameters(model)) and any("lora_A" in n for n in names)
    with pytest.raises(ValueError, match="add LoRA first"):
        other = tiny_base()
        add_adapter(other, IA3PEFTConfig(), verbose=False)
        add_adapter(other, LoraPEFTConfig(), verbose=False)


@pytest.mark.parametrize("scheme", ["lora", "adapter", "adapter_post", "ia3", "ptuning", "lora+ptuning"])
def test_only_adapters_train_and_base_weights_stay_bit_identical(scheme):
    model = tiny_base()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapter(model, small(scheme), verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model)) and trainable
    model.train()
    # The optimizer gets *every* parameter: frozen ones must be skipped because they have no gradient.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = ids()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model.loss(x, x)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    state = model.state_dict()
    for name, tensor in base_state.items():
        ours = name.replace(".attention_qkv.", ".attention_qkv.base.").replace(".mlp_fc2.", ".mlp_fc2.base.")
        ours = ours.replace(".attention_dense.", ".attention_dense.base.").replace(".mlp_fc1.", ".mlp_fc1.base.")
        key = name if name in state else ours
        assert torch.equal(state[key], tensor), name


@pytest.mark.parametrize("scheme", ["lora", "adapter", "adapter_post", "ia3"])
def test_fresh_adapters_leave_the_logits_unchanged(scheme):
    model = tiny_base()
    x = ids()
    reference = logits(model, x)
    add_adapter(model, small(scheme), verbose=False)
    assert torch.equal(logits(model, x), reference)
    randomize_adapters(model)  # ...and the test can fail: trained adapters do change them
    assert (logits(model, x) - reference).abs().max() > 1e-3


def test_every_method_also_fits_a_gpt2_style_model():
    """Biases, LayerNorm, learned positions and a GELU MLP (mlp_fc1 not fused) work the same way."""
    config = GPTConfig.gpt2_style(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=64)
    model = init_weights(GPT(config), std=0.1, seed=0).eval()
    x = ids()
    reference = logits(model, x)
    add_adapter(model, [*small("lora"), IA3PEFTConfig(), AdapterPEFTConfig(None, adapter_dim=8)], verbose=False)
    assert isinstance(model.blocks[0].mlp.mlp_fc2, AdapterLinear)  # outermost: lora, then ia3, then adapter
    assert isinstance(model.blocks[0].mlp.mlp_fc2.base.base, LoRALinear)
    assert torch.equal(logits(model, x), reference)
    add_adapter(model, small("ptuning"), verbose=False)
    randomize_adapters(model)
    tuned = logits(model, x)
    assert tuned.shape == reference.shape and (tuned - reference).abs().max() > 1e-3
    with disable_adapters(model):
        assert torch.equal(logits(model, x), reference)


def test_lora_wrapper_keeps_base_names_and_scale():
    model = tiny_base()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4, alpha=8, rslora=False), verbose=False)
    layer = model.blocks[0].attention.attention_qkv
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert "blocks.0.attention.attention_qkv.base.weight" in model.state_dict()
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (128, 4) and not layer.lora_B.any()
    rs = LoRALinear(nn.Linear(8, 8), rank=4, alpha=8, rslora=True)
    assert rs.scaling == 4.0
    x = torch.randn(3, 8)
    with torch.no_grad():
        rs.lora_B.normal_()
        expected = rs.base(x) + 4.0 * x @ rs.lora_A.T @ rs.lora_B.T
        assert torch.allclose(rs(x), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------

def test_merge_unmerge_and_merge_and_unload():
    model = tiny_base()
    base_weight = model.blocks[0].mlp.mlp_fc1.weight.detach().clone()
    add_adapter(model, small("lora"), verbose=False)
    randomize_adapters(model)
    x = ids()
    unmerged = logits(model, x)
    assert merge_lora(model) == 8
    merged = logits(model, x)
    assert (merged - unmerged).abs().max() < 1e-5
    layer = model.blocks[0].mlp.mlp_fc1
    assert layer.merged and not torch.equal(layer.base.weight, base_weight)
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
    assert set(model.state_dict()) == set(tiny_base().state_dict())  # a plain model again
    assert (logits(model, x) - unmerged).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# disable_adapters
# ----------------------------------------------------------------------------------------------

def test_disable_adapters_gives_the_base_model_and_then_reenables():
    model = tiny_base()
    x = ids()
    base = logits(model, x)
    add_adapter(model, [*small("lora"), IA3PEFTConfig(), AdapterPEFTConfig(None, adapter_dim=8), *small("ptuning")],
                verbose=False)
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


# ----------------------------------------------------------------------------------------------
# P-tuning
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def ptuned() -> GPT:
    model = tiny_base(seed=1)
    add_adapter(model, small("ptuning"), verbose=False)
    return model


def test_ptuning_prepends_virtual_tokens_and_keeps_outputs_aligned(ptuned):
    x = ids(batch=2, length=7)
    out = logits(ptuned, x)
    assert out.shape == (2, 7, VOCAB)
    assert isinstance(ptuned.virtual_prompt, PromptEncoder) and ptuned.n_virtual_tokens == 3
    # Same as feeding the virtual embeddings by hand in front of the token embeddings.
    with torch.no_grad():
        h = torch.cat([ptuned.virtual_prompt(2), ptuned.wte(x)], dim=1)
        for block in ptuned.blocks:
            pos = torch.arange(h.shape[1])
            rope = (ptuned.rope_cos[pos], ptuned.rope_sin[pos])
            h = block(h, rope, None, True, None)
        by_hand = ptuned.lm_head(ptuned.norm_f(h))[:, 3:]
    assert (out - by_hand).abs().max() < 1e-5


def test_ptuning_generation_with_and_without_cache_and_with_left_padding(ptuned):
    prompts = [ids(1, 5, seed=3)[0].tolist(), ids(1, 9, seed=4)[0].tolist(), ids(1, 2, seed=5)[0].tolist()]
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
    with torch.no_grad():
        padded = ptuned(x, attention_mask=mask)
        alone = ptuned(torch.tensor([prompts[0]]))
    assert (padded[0, 4:] - alone[0]).abs().max() < 1e-5


def test_freezing_the_prompt_encoder_keeps_the_logits(ptuned):
    randomize_adapters(ptuned)
    x = ids()
    before = logits(ptuned, x)
    table = freeze_prompt_encoder(ptuned)
    assert isinstance(ptuned.virtual_prompt, FrozenPrompt) and table.table.shape == (3, 64)
    assert freeze_prompt_encoder(ptuned) is table  # idempotent
    assert torch.equal(logits(ptuned, x), before)
    assert ptuned.num_parameters(trainable_only=True) == 0


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


@pytest.mark.slow
@pytest.mark.parametrize("scheme,expected", [
    ("lora", 1_474_560), ("adapter", 2_280_960), ("ia3", 57_600), ("ptuning", 1_650_240),
    ("lora,ptuning", 3_124_800)])
def test_default_trainable_parameter_counts_on_the_real_base(smollm2, scheme, expected):
    model = copy.deepcopy(smollm2[0])
    summary = add_adapter(model, peft_configs_from_scheme({"peft": {"peft_scheme": scheme}}), verbose=False)
    assert summary.trainable_after == expected
    assert summary.total_before == 134_515_008 and summary.total_after == 134_515_008 + expected


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
