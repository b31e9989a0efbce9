"""Adapter-only checkpoints: exact round trips, and one clear error for every way a load can go wrong."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_tutorial.model import GPT
from lora_tutorial.peft import (AdapterCheckpointError, AdapterPEFTConfig, IA3PEFTConfig, LoraPEFTConfig,
                                PtuningPEFTConfig, add_adapter, adapter_parameters, freeze_prompt_encoder,
                                load_adapters, merge_lora, save_adapters)
from lora_tutorial.peft.checkpoint import adapter_state_dict, base_fingerprint, read_adapter_file
from lora_tutorial.peft.inject import peft_modules
from lora_tutorial.precision import cast_frozen_weights

from helpers import logits, random_ids, randomize_adapters, tiny_llama_config, tiny_model


def named_base(seed: int = 0, n_layer: int = 2) -> GPT:
    """A tiny base whose name says which weights it has (adapter files record it)."""
    return tiny_model(tiny_llama_config(n_layer=n_layer), seed=seed, name_or_path=f"tiny-seed{seed}")


X = random_ids(2, 10)
PTUNING = PtuningPEFTConfig(None, virtual_tokens=3, bottleneck_dim=16, embedding_dim=8)
CONFIGS = {
    "lora": [LoraPEFTConfig(None, target_modules=["all"], adapter_dim=4, layer_selection=[1])],
    "adapter": [AdapterPEFTConfig(None, adapter_dim=8, norm_position="post")],
    "ia3": [IA3PEFTConfig()],
    "ptuning": [PTUNING],
    "lora+ptuning": [LoraPEFTConfig(None, adapter_dim=4), PTUNING],
    "everything": [LoraPEFTConfig(None, adapter_dim=4), IA3PEFTConfig(), AdapterPEFTConfig(None, adapter_dim=8),
                   PTUNING],
}


def trained(configs, seed: int = 0) -> GPT:
    """A tiny base with adapters whose tensors are random (as after training)."""
    model = named_base(seed)
    add_adapter(model, configs, verbose=False)
    randomize_adapters(model, seed=123)
    return model


@pytest.fixture
def lora_file(tmp_path) -> Path:
    return save_adapters(trained(CONFIGS["lora"]), tmp_path / "run" / "adapter.safetensors")


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy an adapter file through ``edit(tensors, info)`` (to forge broken files)."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    info = json.loads(metadata["lora_tutorial"])
    edit(tensors, info)
    save_file(tensors, str(dst), metadata={**metadata, "lora_tutorial": json.dumps(info)})
    return dst


def assert_untouched(model: GPT) -> None:
    """A failed load leaves a plain base: no PEFT modules, nothing recorded, every weight trainable as before."""
    assert peft_modules(model) == [] and model.virtual_prompt is None
    assert getattr(model, "peft_configs", []) == []
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_save_then_load_into_a_fresh_base_reproduces_the_logits_exactly(tmp_path, name):
    model = trained(CONFIGS[name])
    expected = logits(model, X)
    path = save_adapters(model, tmp_path / "adapter.safetensors")

    fresh = named_base()
    assert not torch.equal(logits(fresh, X), expected)
    configs = load_adapters(fresh, path)
    assert [c.scheme for c in configs] == [c.scheme for c in model.peft_configs]
    assert fresh.peft_configs == model.peft_configs
    assert torch.equal(logits(fresh, X), expected)
    # Training can resume: exactly the adapter tensors are trainable again.
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(fresh))


def test_a_frozen_prompt_round_trips(tmp_path):
    model = trained([PTUNING])
    freeze_prompt_encoder(model)
    path = save_adapters(model, tmp_path / "frozen.safetensors")
    fresh = named_base()
    load_adapters(fresh, path)
    assert type(fresh.virtual_prompt).__name__ == "FrozenPrompt"
    assert torch.equal(logits(fresh, X), logits(model, X))


def test_load_into_a_model_that_already_has_the_same_adapters(lora_file):
    model = named_base()
    add_adapter(model, CONFIGS["lora"], verbose=False)
    load_adapters(model, lora_file)
    assert torch.equal(logits(model, X), logits(trained(CONFIGS["lora"]), X))


def test_the_file_holds_only_adapter_tensors_and_readable_metadata(lora_file):
    with safe_open(str(lora_file), framework="pt") as f:
        names = set(f.keys())
        info = json.loads(f.metadata()["lora_tutorial"])
    assert names == {f"blocks.1.{p}.{t}.lora_{m}" for p, t in [("attention", "attention_qkv"),
                                                               ("attention", "attention_dense"),
                                                               ("mlp", "mlp_fc1"), ("mlp", "mlp_fc2")]
                     for m in "AB"}
    assert info["base_model"] == "tiny-seed0"
    assert info["peft_configs"][0]["scheme"] == "lora" and info["peft_configs"][0]["adapter_dim"] == 4
    assert info["base_fingerprint"] == base_fingerprint(named_base())


def test_fingerprint_ignores_dtype_and_adapters_but_not_weights():
    model = named_base()
    fp = base_fingerprint(model)
    assert base_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fp
    assert base_fingerprint(trained(CONFIGS["everything"])) == fp
    assert base_fingerprint(named_base(seed=1)) != fp


def test_fingerprint_of_an_int8_quantized_base_is_a_clear_error():
    from lora_tutorial.quantize import quantize_int8

    model = named_base().requires_grad_(False)
    assert quantize_int8(model) > 0
    with pytest.raises(AdapterCheckpointError, match="Int8Linear without a weight tensor.*before quantize_int8"):
        base_fingerprint(model)


def test_read_adapter_file_gives_the_adapter_tensors_and_configs(lora_file):
    model = trained(CONFIGS["lora"])
    tensors, info = read_adapter_file(lora_file)
    expected = adapter_state_dict(model)
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in tensors)
    assert all(not t.requires_grad for t in expected.values())  # detached copies of the parameters
    assert info["peft_configs"] == CONFIGS["lora"] and info["base_model"] == "tiny-seed0"


def test_adapters_load_onto_the_same_base_in_bf16_as_float32(lora_file):
    bf16 = named_base().requires_grad_(False)
    cast_frozen_weights(bf16, torch.bfloat16)
    load_adapters(bf16, lora_file)  # the fingerprint is the same base, whatever its dtype
    params = adapter_parameters(bf16)
    assert params and all(p.dtype == torch.float32 for p in params.values())
    fp32 = logits(trained(CONFIGS["lora"]), X)
    assert (logits(bf16, X).float().argmax(-1) == fp32.argmax(-1)).float().mean() > 0.9


# ----------------------------------------------------------------------------------------------
# Every way a load can fail
# ----------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(AdapterCheckpointError, match="nope.safetensors: no such adapter file"):
        load_adapters(named_base(), tmp_path / "nope.safetensors")


def test_truncated_and_corrupt_files(lora_file, tmp_path):
    data = lora_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    for path in (truncated, garbage):
        model = named_base()
        with pytest.raises(AdapterCheckpointError, match=rf"{path.name}: not a readable safetensors file"):
            load_adapters(model, path)
        assert_untouched(model)


def test_a_safetensors_file_that_is_not_an_adapter_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(AdapterCheckpointError, match="not an adapter file written by"):
        load_adapters(named_base(), path)


def test_corrupt_metadata(lora_file, tmp_path):
    def scramble(tensors, info):
        info["peft_configs"][0]["adapter_dim"] = "many"
    path = rewrite(lora_file, tmp_path / "meta.safetensors", scramble)
    with pytest.raises(AdapterCheckpointError, match="meta.safetensors: corrupt adapter metadata"):
        load_adapters(named_base(), path)


def test_another_base_model_is_refused(lora_file):
    other = named_base(seed=1)
    with pytest.raises(AdapterCheckpointError, match=r"adapter.safetensors: .*another base model \(tiny-seed0.*"
                                                     r"different weights"):
        load_adapters(other, lora_file)
    assert_untouched(other)
    deeper = named_base(n_layer=3)
    with pytest.raises(AdapterCheckpointError, match=r"config differs: n_layer=2 in the file, 3 in the model"):
        load_adapters(deeper, lora_file)
    # An explicit opt-out loads anyway (here a same-shaped but different base).
    load_adapters(other, lora_file, check_base=False)
    assert [c.scheme for c in other.peft_configs] == ["lora"]


def test_another_method_or_config_is_refused(lora_file):
    model = named_base()
    add_adapter(model, IA3PEFTConfig(), verbose=False)
    with pytest.raises(AdapterCheckpointError, match="holds lora adapters, but the model already has ia3"):
        load_adapters(model, lora_file)
    model = named_base()
    add_adapter(model, LoraPEFTConfig(None, target_modules=["all"], adapter_dim=8, layer_selection=[1]),
                verbose=False)
    with pytest.raises(AdapterCheckpointError, match="adapter_dim=4 in the file, 8 in the model"):
        load_adapters(model, lora_file)


def test_missing_extra_and_misshapen_tensors(lora_file, tmp_path):
    name = "blocks.1.attention.attention_qkv.lora_A"

    def drop(tensors, info):
        del tensors[name]

    def add(tensors, info):
        tensors["blocks.0.attention.attention_qkv.lora_A"] = torch.zeros(4, 32)

    def reshape(tensors, info):
        tensors[name] = torch.zeros(5, 32)

    cases = [(drop, rf"1 missing \(e.g. {name}\)"), (add, r"1 unexpected \(e.g. blocks.0.attention"),
             (reshape, rf"tensor {name} has shape \(5, 32\), the model expects \(4, 32\)")]
    for edit, match in cases:
        path = rewrite(lora_file, tmp_path / f"{edit.__name__}.safetensors", edit)
        model = named_base()
        with pytest.raises(AdapterCheckpointError, match=rf"{edit.__name__}.safetensors: .*{match}"):
            load_adapters(model, path)
        assert_untouched(model)  # the adapters inserted for the load were removed again


def test_a_failed_load_of_nested_adapters_rolls_back_too(tmp_path):
    """Every method at once nests wrappers (adapter over IA3 over LoRA); a bad tensor must still leave a plain base."""
    path = save_adapters(trained(CONFIGS["everything"]), tmp_path / "all.safetensors")

    def reshape(tensors, info):
        tensors["blocks.1.mlp.mlp_fc2.adapter.down.weight"] = torch.zeros(3, 32)

    bad = rewrite(path, tmp_path / "bad.safetensors", reshape)
    model = named_base()
    reference = logits(model, X)
    with pytest.raises(AdapterCheckpointError, match="blocks.1.mlp.mlp_fc2.adapter.down.weight has shape"):
        load_adapters(model, bad)
    assert_untouched(model)
    assert torch.equal(logits(model, X), reference)


def test_save_refuses_a_model_without_adapters_or_with_merged_lora(tmp_path):
    with pytest.raises(ValueError, match="no adapters"):
        save_adapters(named_base(), tmp_path / "a.safetensors")
    model = trained(CONFIGS["lora"])
    merge_lora(model)
    with pytest.raises(AdapterCheckpointError, match="unmerge_lora"):
        save_adapters(model, tmp_path / "a.safetensors")


# ----------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_lora_r32_qkv_checkpoint_size_and_round_trip(smollm2, tmp_path):
    base, tokenizer = smollm2
    model = copy.deepcopy(base)
    add_adapter(model, LoraPEFTConfig(None, target_modules=["attention_qkv"]), verbose=False)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.normal_(std=0.01, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([tokenizer.encode("User: Context: Water boils at 100 degrees. Question: At what "
                                         "temperature does water boil?\n\nAssistant:")])
    expected = logits(model, ids)
    path = save_adapters(model, tmp_path / "adapter.safetensors")
    size = path.stat().st_size
    assert 1_474_560 * 4 < size < 1_474_560 * 4 + 64_000  # fp32 tensors + a small JSON header

    fresh = copy.deepcopy(base)
    load_adapters(fresh, path)
    assert torch.equal(logits(fresh, ids), expected)
    assert not torch.equal(logits(base, ids), expected)
