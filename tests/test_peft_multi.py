"""Several adapters on one base (peft/multi.py): named loading, switching, exact linear combination."""

from __future__ import annotations

import pytest
import torch

from lora_tutorial.peft import (AdapterPEFTConfig, LoraPEFTConfig, PtuningPEFTConfig, add_adapter, adapter_names,
                                combine_lora, disable_adapters, freeze_prompt_encoder, load_adapters, merge_and_unload,
                                merge_lora, remove_adapters, save_adapters, set_adapter, unmerge_lora)
from lora_tutorial.peft.inject import adapter_name_of
from lora_tutorial.peft.lora import LoRALinear

from helpers import logits, random_ids, randomize_adapters, tiny_model


def trained_lora(tmp_path, seed: int, rank: int = 4, targets=("attention_qkv", "mlp_fc2"), **knobs):
    """A tiny model with a LoRA whose A and B are random (as if trained); its file and its logits."""
    model = tiny_model()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=rank, alpha=8.0, target_modules=list(targets), **knobs),
                verbose=False)
    randomize_adapters(model, seed=seed)
    path = save_adapters(model, tmp_path / f"lora{seed}.safetensors")
    return model, path


def two_named_loras(tmp_path):
    """A tiny base with the LoRAs of seeds 1 and 2 loaded as "one" and "two" ("two" wraps "one"'s layers)."""
    model = tiny_model()
    load_adapters(model, trained_lora(tmp_path, seed=1)[1], name="one")
    load_adapters(model, trained_lora(tmp_path, seed=2)[1], name="two")
    return model


def test_named_adapters_switch_to_exactly_each_adapters_own_logits(tmp_path):
    ids = random_ids(2, 9)
    one, path_one = trained_lora(tmp_path, seed=1)
    two, path_two = trained_lora(tmp_path, seed=2)
    model = tiny_model()
    base = logits(model, ids)
    load_adapters(model, path_one, name="one")
    load_adapters(model, path_two, name="two")
    assert adapter_names(model) == ["one", "two"]
    set_adapter(model, "one")
    assert torch.equal(logits(model, ids), logits(one, ids))
    set_adapter(model, "two")
    assert torch.equal(logits(model, ids), logits(two, ids))
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    with pytest.raises(ValueError, match="no adapter named 'three'"):
        set_adapter(model, "three")


def test_saving_one_named_adapter_writes_the_same_file_as_the_model_it_came_from(tmp_path):
    one, path_one = trained_lora(tmp_path, seed=1)
    _, path_two = trained_lora(tmp_path, seed=2)
    model = tiny_model()
    load_adapters(model, path_two, name="two")
    load_adapters(model, path_one, name="one")  # wraps "two"'s layers: its keys must not show the nesting
    resaved = save_adapters(model, tmp_path / "resaved.safetensors", name="one")
    fresh = tiny_model()
    load_adapters(fresh, resaved)
    ids = random_ids(1, 7)
    assert torch.equal(logits(fresh, ids), logits(one, ids))


def test_combine_lora_is_the_weighted_sum_of_the_updates_and_round_trips(tmp_path):
    model = two_named_loras(tmp_path)
    config = combine_lora(model, {"one": 0.7, "two": -0.2}, name="mix")
    assert config.adapter_dim == 8 and config.alpha == 8.0  # rank 4 + 4, scale 1
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    by_name = {}
    for m in layers:
        by_name.setdefault(adapter_name_of(m), []).append(m)
    for mix, one, two in zip(by_name["mix"], by_name["one"], by_name["two"]):
        expected = 0.7 * one.delta_weight() - 0.2 * two.delta_weight()
        torch.testing.assert_close(mix.delta_weight(), expected, atol=1e-6, rtol=1e-5)
    ids = random_ids(2, 9)
    mixed = logits(model, ids)
    path = save_adapters(model, tmp_path / "mix.safetensors", name="mix")
    fresh = tiny_model()
    load_adapters(fresh, path)
    assert torch.equal(logits(fresh, ids), mixed)


def test_combine_lora_mixes_adapters_of_different_layers_with_zero_where_one_is_absent(tmp_path):
    _, everywhere = trained_lora(tmp_path, seed=1, targets=("attention_qkv", "mlp_fc2"))
    _, top_only = trained_lora(tmp_path, seed=2, rank=2, targets=("mlp_fc2",), layer_selection=[1])
    model = tiny_model()
    load_adapters(model, everywhere, name="everywhere")
    load_adapters(model, top_only, name="top")
    config = combine_lora(model, {"everywhere": 0.5, "top": 2.0}, name="mix")
    assert (config.adapter_dim, config.target_modules, config.layer_selection) == (6, ["attention_qkv", "mlp_fc2"], None)
    deltas = {}
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            target = ".".join(p for p in path.split(".") if p != "base")
            deltas.setdefault(target, {})[adapter_name_of(m)] = m.delta_weight()
    assert len(deltas) == 4  # two modules x two blocks
    for target, d in deltas.items():
        expected = 0.5 * d["everywhere"] + (2.0 * d["top"] if "top" in d else 0)
        assert ("top" in d) == (target == "blocks.1.mlp.mlp_fc2")
        torch.testing.assert_close(d["mix"], expected, atol=1e-6, rtol=1e-5)
    ids = random_ids(2, 9)
    mixed = logits(model, ids)
    fresh = tiny_model()
    load_adapters(fresh, save_adapters(model, tmp_path / "mix.safetensors", name="mix"))
    assert torch.equal(logits(fresh, ids), mixed)


def test_combine_lora_refuses_dora_and_layers_that_no_adapter_covers(tmp_path):
    _, qkv_first = trained_lora(tmp_path, seed=1, targets=("attention_qkv",), layer_selection=[0])
    _, dense_second = trained_lora(tmp_path, seed=3, targets=("attention_dense",), layer_selection=[1])
    _, dora = trained_lora(tmp_path, seed=2, use_dora=True)
    model = tiny_model()
    load_adapters(model, qkv_first, name="qkv0")
    load_adapters(model, dense_second, name="dense1")
    with pytest.raises(ValueError, match=r"blocks\.(0\.attention\.attention_dense|1\.attention\.attention_qkv) is adapted by none"):
        combine_lora(model, {"qkv0": 1.0, "dense1": 1.0}, name="mix")
    assert adapter_names(model) == ["qkv0", "dense1"]  # nothing was added
    with pytest.raises(ValueError, match=r"'qvk0' is not a LoRA adapter of this model; it has \['dense1', 'qkv0'\]"):
        combine_lora(model, {"qvk0": 1.0, "dense1": 1.0}, name="mix")  # a misspelt name
    with pytest.raises(ValueError, match="cannot share a layer"):
        load_adapters(model, dora, name="dora")
    alone = tiny_model()  # the DoRA adapter on its own model: combine_lora refuses it
    load_adapters(alone, dora, name="dora")
    with pytest.raises(ValueError, match="'dora' is DoRA or PiSSA/OLoRA"):
        combine_lora(alone, {"dora": 1.0}, name="mix")


def test_a_second_named_adapter_trains_alone_and_removing_it_leaves_the_first(tmp_path):
    one, path_one = trained_lora(tmp_path, seed=1)
    model = tiny_model()
    load_adapters(model, path_one, name="one")
    add_adapter(model, AdapterPEFTConfig(None, adapter_dim=4), verbose=False, name="bottleneck")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    remove_adapters(model, "bottleneck")
    assert adapter_names(model) == ["one"]
    ids = random_ids(1, 6)
    assert torch.equal(logits(model, ids), logits(one, ids))


def test_only_one_p_tuning_prompt_fits_the_model(tmp_path):
    model = tiny_model()
    add_adapter(model, PtuningPEFTConfig(None, virtual_tokens=2, bottleneck_dim=8, embedding_dim=8), verbose=False)
    with pytest.raises(ValueError, match="one virtual-prompt slot"):
        add_adapter(model, PtuningPEFTConfig(None, virtual_tokens=2, bottleneck_dim=8, embedding_dim=8),
                    verbose=False, name="second")


def test_merging_keeps_a_switched_off_adapter_out_of_the_weights(tmp_path):
    one, path_one = trained_lora(tmp_path, seed=1)
    _, path_two = trained_lora(tmp_path, seed=2)
    model = tiny_model()
    load_adapters(model, path_one, name="one")
    load_adapters(model, path_two, name="two")  # nested: "two" wraps "one"'s layers
    set_adapter(model, "one")
    ids = random_ids(2, 9)
    expected = logits(one, ids)
    merge_lora(model)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    set_adapter(model, "two")  # unmerges "one" on the way: its update must leave the weights
    two_only = logits(model, ids)
    set_adapter(model, "one")
    unmerge_lora(model)
    merge_and_unload(model)  # "one" goes into the weights; "two" (switched off) stays a LoRA layer
    assert adapter_names(model) == ["two"]
    assert {adapter_name_of(m) for m in model.modules() if isinstance(m, LoRALinear)} == {"two"}
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    set_adapter(model, "two")
    assert not torch.allclose(logits(model, ids), two_only, atol=1e-4)  # now on top of the merged "one"


def test_merge_and_unload_of_nested_adapters_bakes_both_into_plain_linears(tmp_path):
    model = two_named_loras(tmp_path)
    ids = random_ids(2, 9)
    both = logits(model, ids)  # both switched on after loading: the two updates add up
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m.attention_qkv) is torch.nn.Linear for m in (b.attention for b in model.blocks))
    assert model.peft_configs == []
    torch.testing.assert_close(logits(model, ids), both, atol=1e-5, rtol=1e-5)


def test_a_named_p_tuning_prompt_keeps_its_name_when_frozen_and_saved(tmp_path):
    model = tiny_model()
    add_adapter(model, PtuningPEFTConfig(None, virtual_tokens=2, bottleneck_dim=8, embedding_dim=8), verbose=False,
                name="prompt")
    randomize_adapters(model, seed=3)
    freeze_prompt_encoder(model)
    assert adapter_name_of(model.virtual_prompt) == "prompt"
    path = save_adapters(model, tmp_path / "prompt.safetensors", name="prompt")
    fresh = tiny_model()
    load_adapters(fresh, path, name="prompt")
    ids = random_ids(2, 5)
    assert adapter_names(fresh) == ["prompt"]
    assert torch.equal(logits(fresh, ids), logits(model, ids))
