"""Parity with the reference: HF transformers' LlamaForCausalLM + HF PEFT on the same GGUF weights.

Our LoRA (one update of the fused QKV matrix) must equal PEFT's three LoRAs on q_proj/k_proj/v_proj with a
shared A, our IA3 must equal PEFT's IA3, and ``export_hf_peft`` must produce a directory that
``PeftModel.from_pretrained`` turns into the same model. B is random (non-zero) everywhere, so a wrong
split, a wrong scale or a rotary-layout mistake shows up as a logit difference.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peft  # noqa: E402 - a dev dependency: the reference implementation

from lora_tutorial import load_base_model  # noqa: E402
from lora_tutorial.peft import IA3PEFTConfig, LoraPEFTConfig, add_adapter, export_hf_peft  # noqa: E402
from lora_tutorial.peft.hf_export import hf_modules_of  # noqa: E402

from helpers import logits, random_ids, save_hf_llama, tiny_model  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

PROMPT = ("User: Context: The Amazon rainforest covers much of the Amazon basin of South America. "
          "Question: Which basin does the Amazon rainforest cover?\n\nAssistant: the Amazon basin")
TOL = 1e-3  # our base already matches HF to ~5e-5; a wrong adapter gives differences of order 1


# ----------------------------------------------------------------------------------------------
# A tiny HF Llama (fast)
# ----------------------------------------------------------------------------------------------


def test_hf_module_names_exist_in_transformers_llama(tmp_path):
    hf = save_hf_llama(tmp_path)
    for target in ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2"):
        for name in hf_modules_of(target):
            assert isinstance(hf.get_submodule(f"model.layers.1.{name}"), torch.nn.Linear), name
    assert [n.split(".")[-1] for n in hf_modules_of("attention_qkv")] == ["q_proj", "k_proj", "v_proj"]
    assert [n.split(".")[-1] for n in hf_modules_of("mlp_fc1")] == ["gate_proj", "up_proj"]


@pytest.mark.parametrize("targets, layers", [(["all"], None), (["attention_qkv", "mlp_fc1"], [1])])
def test_export_hf_peft_of_a_tiny_llama_loads_in_peft_with_the_same_logits(tmp_path, targets, layers):
    hf = save_hf_llama(tmp_path / "base")
    ours, _ = load_base_model(tmp_path / "base")
    add_adapter(ours, LoraPEFTConfig(None, target_modules=targets, adapter_dim=4, alpha=8, layer_selection=layers),
                verbose=False)
    _randomize_lora(ours, seed=5, std=0.3)
    x = random_ids(2, 12, hf.config.vocab_size)
    expected = logits(ours, x)
    export_hf_peft(ours, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    theirs = _hf_logits(peft_model, x)
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(input_ids=x).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the model...
    assert (expected - theirs).abs().max() < 1e-4  # ...and PEFT agrees on how


def test_export_refuses_other_methods(tmp_path):
    model = tiny_model()
    add_adapter(model, IA3PEFTConfig(), verbose=False)
    with pytest.raises(ValueError, match="LoRA only"):
        export_hf_peft(model, tmp_path)
    with pytest.raises(ValueError, match="no adapters"):
        export_hf_peft(tiny_model(), tmp_path)
    assert not list(tmp_path.iterdir())


def test_export_refuses_two_loras_and_a_merged_one(tmp_path):
    from lora_tutorial.peft import merge_lora

    model = tiny_model()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4), verbose=False)
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4), verbose=False, name="second")
    with pytest.raises(ValueError, match="exports one LoRA; this model has 2 .default, second."):
        export_hf_peft(model, tmp_path)
    merged = tiny_model()
    add_adapter(merged, LoraPEFTConfig(None, adapter_dim=4), verbose=False)
    merge_lora(merged)
    with pytest.raises(ValueError, match="merged into the base weight.*unmerge_lora"):
        export_hf_peft(merged, tmp_path)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# The real model (slow)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tokenizer = smollm2
    return torch.tensor([tokenizer.encode(PROMPT)])


def _randomize_lora(model, seed: int, std: float = 0.02) -> None:
    """Give every LoRA B (and A) random values large enough to change the logits clearly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_lora_qkv_equals_hf_peft_on_q_k_v_with_the_same_tensors(smollm2, hf_smollm2, ids):
    model = copy.deepcopy(smollm2[0])
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=8, alpha=16, target_modules=["attention_qkv"]), verbose=False)
    _randomize_lora(model, seed=1)
    with torch.no_grad():
        ours = model(ids)

    hf = peft.get_peft_model(copy.deepcopy(hf_smollm2[0]), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0))
    sizes = model.blocks[0].attention.qkv_sizes
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            lora = block.attention.attention_qkv
            attn = hf.base_model.model.model.layers[i].self_attn
            for proj, b_part in zip((attn.q_proj, attn.k_proj, attn.v_proj), lora.lora_B.split(sizes)):
                proj.lora_A["default"].weight.copy_(lora.lora_A)
                proj.lora_B["default"].weight.copy_(b_part)
    theirs = _hf_logits(hf, ids)
    with torch.no_grad():
        base = smollm2[0](ids)
    assert (ours - base).abs().max() > 0.5  # the adapter really changes the model...
    assert (ours - theirs).abs().max() < TOL  # ...and PEFT agrees on how


@pytest.mark.slow
@pytest.mark.parametrize("rslora", [False, True])
def test_export_hf_peft_loads_in_peft_with_the_same_logits(smollm2, hf_smollm2, ids, tmp_path, rslora):
    model = copy.deepcopy(smollm2[0])
    # Every target (fused QKV and fused gate/up are split on export), a subset of layers, both scales.
    add_adapter(model, LoraPEFTConfig(None, target_modules=["all"], adapter_dim=4, alpha=8, rslora=rslora,
                                      layer_selection=[0, 7, 29]), verbose=False)
    _randomize_lora(model, seed=2)
    with torch.no_grad():
        ours = model(ids)
    export_hf_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0, 7, 29] and config["use_rslora"] is rslora
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    hf = peft.PeftModel.from_pretrained(copy.deepcopy(hf_smollm2[0]), str(tmp_path))
    n_lora = sum(1 for name, _ in hf.named_parameters() if "lora_B" in name)
    assert n_lora == 3 * 7  # three layers, seven HF modules each
    theirs = _hf_logits(hf, ids)
    with torch.no_grad():
        base = smollm2[0](ids)
    assert (ours - base).abs().max() > 0.5
    assert (ours - theirs).abs().max() < TOL


@pytest.mark.slow
def test_ia3_equals_hf_peft_ia3_with_the_same_vectors(smollm2, hf_smollm2, ids):
    model = copy.deepcopy(smollm2[0])
    add_adapter(model, IA3PEFTConfig(), verbose=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        ours = model(ids)

    hf = peft.get_peft_model(copy.deepcopy(hf_smollm2[0]), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            layer = hf.base_model.model.model.layers[i]
            qkv, fc2 = block.attention.attention_qkv, block.mlp.mlp_fc2
            layer.self_attn.k_proj.ia3_l["default"].copy_(qkv.ia3_k[:, None])  # (out, 1): scales outputs
            layer.self_attn.v_proj.ia3_l["default"].copy_(qkv.ia3_v[:, None])
            layer.mlp.down_proj.ia3_l["default"].copy_(fc2.ia3_ff[None, :])  # (1, in): scales inputs
    theirs = _hf_logits(hf, ids)
    with torch.no_grad():
        base = smollm2[0](ids)
    assert (ours - base).abs().max() > 0.5
    assert (ours - theirs).abs().max() < TOL
