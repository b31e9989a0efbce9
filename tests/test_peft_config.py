"""The PEFT method configs: built from the whole model config as in NeMo, on the one schema of config.py, with
the same ConfigError for bad values as load_config."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lora_tutorial.config import ConfigError, default_config, load_config
from lora_tutorial.peft import (AdapterPEFTConfig, IA3PEFTConfig, LoraPEFTConfig, PtuningPEFTConfig, add_adapter,
                                peft_configs_from_scheme)

from helpers import tiny_model

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"lora_tuning": LoraPEFTConfig, "adapter_tuning": AdapterPEFTConfig, "ia3_tuning": IA3PEFTConfig,
           "p_tuning": PtuningPEFTConfig}
ALL_TARGETS = ["attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2"]


@pytest.mark.parametrize("section", CLASSES)
def test_a_missing_section_means_the_schema_defaults(section):
    cls = CLASSES[section]
    defaults = cls(default_config().model)
    assert cls() == defaults and cls({"peft": {}}) == defaults and cls(None) == defaults
    assert cls(load_config(REPO / "conf" / "peft_tuning.yaml").model) == defaults


@pytest.mark.parametrize("section, key, value", [
    ("lora_tuning", "adapter_dim", 8), ("adapter_tuning", "norm_position", "post"),
    ("ia3_tuning", "layer_selection", [0, 2]), ("p_tuning", "virtual_tokens", 4)])
def test_values_come_from_the_loaded_config_and_keywords_win(section, key, value):
    cls = CLASSES[section]
    cfg = load_config(None, [f"model.peft.{section}.{key}={value}".replace(" ", "")])
    assert getattr(cls(cfg.model), key) == value
    assert getattr(cls(cfg.model, **{key: cls().to_dict()[key]}), key) == cls().to_dict()[key]


def test_config_reads_a_dictconfig_and_a_plain_dict_and_normalises():
    yaml = """
    peft:
      peft_scheme: lora
      lora_tuning: {target_modules: [attention, mlp_fc2], adapter_dim: 8, alpha: 16, layer_selection: [3, 1]}
    """
    cfg = LoraPEFTConfig(OmegaConf.create(yaml))
    assert cfg.scheme == "lora" and cfg.adapter_dim == 8 and cfg.alpha == 16
    assert cfg.target_modules == ["attention_qkv", "attention_dense", "mlp_fc2"]  # shortcuts expanded, in order
    assert cfg.layer_selection == [1, 3]
    assert LoraPEFTConfig(OmegaConf.to_container(OmegaConf.create(yaml))) == cfg
    assert LoraPEFTConfig(None, target_modules=["mlp_fc2", "all"]).target_modules == ALL_TARGETS


def test_to_dict_from_dict_equality_and_repr():
    cfg = LoraPEFTConfig(None, adapter_dim=8, target_modules=["mlp"], rslora=True)
    assert LoraPEFTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg != LoraPEFTConfig(None, adapter_dim=8, target_modules=["mlp"])
    assert cfg != IA3PEFTConfig()  # another method is never equal
    assert set(cfg.to_dict()) == set(OmegaConf.to_container(default_config().model.peft.lora_tuning))
    assert repr(cfg).startswith("LoraPEFTConfig(") and "adapter_dim=8" in repr(cfg) and "rslora=True" in repr(cfg)
    assert eval(repr(cfg).replace("LoraPEFTConfig(", "dict(")) == cfg.to_dict()  # noqa: S307 - our own repr


@pytest.mark.parametrize("section", CLASSES)
def test_config_unknown_key_is_named(section):
    with pytest.raises(ConfigError, match=rf"model\.peft\.{section}\.adpter_dim"):
        CLASSES[section]({"peft": {section: {"adpter_dim": 8}}})


@pytest.mark.parametrize("cls, knobs, match", [
    (LoraPEFTConfig, {"target_modules": ["attention_qkvv"]}, r"target_modules=\['attention_qkvv'\]"),
    (LoraPEFTConfig, {"target_modules": "all"}, "target_modules"),  # a bare string is not a list
    (LoraPEFTConfig, {"adapter_dim": 0}, r"adapter_dim=0: expected an integer >= 1"),
    (LoraPEFTConfig, {"adapter_dim": "eight"}, r"adapter_dim='eight': expected an integer"),
    (LoraPEFTConfig, {"column_init_method": "uniform"}, r"column_init_method='uniform'"),
    (LoraPEFTConfig, {"column_init_method": "zero", "row_init_method": "zero"}, "never learn"),
    (LoraPEFTConfig, {"adapter_dropout": 1.0}, r"adapter_dropout=1.0"),
    (LoraPEFTConfig, {"layer_selection": []}, "layer_selection"),
    (AdapterPEFTConfig, {"norm_position": "middle"}, r"norm_position='middle'"),
    (IA3PEFTConfig, {"layer_selection": [1, 1]}, "distinct"),
    (PtuningPEFTConfig, {"virtual_tokens": -1}, r"virtual_tokens=-1"),
])
def test_config_rejects_bad_values(cls, knobs, match):
    with pytest.raises(ConfigError, match=match) as err:
        cls(None, **knobs)
    assert f"model.peft.{cls.section}." in str(err.value)


def test_layer_selection_is_checked_against_the_model():
    with pytest.raises(ConfigError, match=r"out of range.*0\.\.1"):
        add_adapter(tiny_model(), LoraPEFTConfig(None, layer_selection=[2]), verbose=False)
    model = tiny_model()
    add_adapter(model, IA3PEFTConfig(None, layer_selection=[1]), verbose=False)
    assert type(model.blocks[0].attention.attention_qkv).__name__ == "Linear"
    assert type(model.blocks[1].attention.attention_qkv).__name__ == "IA3QKV"


def test_peft_configs_from_scheme():
    cfg = {"peft": {"peft_scheme": "lora,ptuning", "p_tuning": {"virtual_tokens": 4}}}
    lora, ptuning = peft_configs_from_scheme(OmegaConf.create(cfg))
    assert (lora.scheme, ptuning.scheme, ptuning.virtual_tokens) == ("lora", "ptuning", 4)
    assert lora == LoraPEFTConfig()
    assert [c.scheme for c in peft_configs_from_scheme({"peft": {"peft_scheme": "IA3"}})] == ["ia3"]
    assert [c.scheme for c in peft_configs_from_scheme({"peft": {"peft_scheme": "adapters"}})] == ["adapter"]
    assert [c.scheme for c in peft_configs_from_scheme({"peft": {"peft_scheme": "p-tuning"}})] == ["ptuning"]
    assert peft_configs_from_scheme({"peft": {"peft_scheme": "none"}}) == []
    assert peft_configs_from_scheme({"peft": {"peft_scheme": None}}) == []
    with pytest.raises(ConfigError, match="peft_scheme='loar'"):
        peft_configs_from_scheme({"peft": {"peft_scheme": "loar"}})
    with pytest.raises(ConfigError, match="without repeats"):
        peft_configs_from_scheme({"peft": {"peft_scheme": "lora,lora"}})
    default = peft_configs_from_scheme(load_config(REPO / "conf" / "peft_tuning.yaml").model)
    assert [c.scheme for c in default] == ["lora"]
