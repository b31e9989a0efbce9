"""The config schema: the shipped YAML files against it, and one ConfigError naming key, value and what is
expected for every kind of bad input (wrong type, out of range, unknown choice, unknown or removed key)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lora_tutorial.config import ConfigError, default_config, load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def test_peft_tuning_yaml_spells_out_exactly_the_schema_defaults():
    assert (OmegaConf.to_container(load_config(CONF / "peft_tuning.yaml"))
            == OmegaConf.to_container(default_config()))
    # and every key of the file is one it sets explicitly (it documents the whole schema, nothing left implicit)
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "peft_tuning.yaml"))
    assert raw == OmegaConf.to_container(default_config())


@pytest.mark.parametrize("name", ["peft_tuning.yaml", "peft_eval.yaml", "nemo_tutorial.yaml"])
def test_shipped_configs_load_and_name_files_that_prepare_data_writes(name):
    cfg = load_config(CONF / name)
    for ds in ("train_ds", "validation_ds", "test_ds"):
        for file_name in cfg.model.data[ds].file_names:
            assert (REPO / file_name).is_file(), f"{name}: model.data.{ds}: {file_name} (run `make data`)"


def test_nemo_tutorial_yaml_holds_the_nemo_tutorial_settings():
    cfg = load_config(CONF / "nemo_tutorial.yaml")
    assert list(cfg.model.peft.lora_tuning.target_modules) == ["attention_qkv"]
    assert cfg.model.optim.lr == 1e-4
    assert (cfg.trainer.max_steps, cfg.model.micro_batch_size, cfg.model.global_batch_size) == (100, 1, 4)
    assert list(cfg.model.data.train_ds.file_names) == ["data/SQuAD/squad_short_train.jsonl"]


def test_peft_eval_yaml_restores_the_adapter_train_writes():
    from lora_tutorial.training import adapter_path_of

    tuning, evaluation = load_config(CONF / "peft_tuning.yaml"), load_config(CONF / "peft_eval.yaml")
    assert Path(evaluation.model.peft.restore_from_path) == adapter_path_of(tuning)


def test_interpolations_follow_the_run_name():
    cfg = load_config(CONF / "peft_tuning.yaml", ["name=my_run"])
    assert cfg.exp_manager.name == "my_run" and cfg.exp_manager.adapter_file == "my_run.safetensors"
    assert "adapter_file: my_run.safetensors" in to_yaml(cfg)


@pytest.mark.parametrize("override, key, value, expected", [
    ("model.optim.lr=abc", "model.optim.lr", "'abc'", "expected a number"),
    ("model.micro_batch_size=two", "model.micro_batch_size", "'two'", "expected an integer"),
    ("trainer.enable_progress_bar=maybe", "trainer.enable_progress_bar", "'maybe'", "true or false"),
    ("trainer.max_steps=-5", "trainer.max_steps", "-5", "expected an integer >= 1"),
    ("model.peft.lora_tuning.adapter_dim=0", "model.peft.lora_tuning.adapter_dim", "0", "expected an integer >= 1"),
    ("model.optim.lr=1.5", "model.optim.lr", "1.5", "< 1"),
    ("model.peft.lora_tuning.adapter_dropout=1.0", "model.peft.lora_tuning.adapter_dropout", "1.0", "[0, 1)"),
    ("model.optim.betas=[0.9]", "model.optim.betas", "[0.9]", "two numbers"),
    ("inference.top_p=0", "inference.top_p", "0", "(0, 1]"),
    ("trainer.precision=fp8", "trainer.precision", "'fp8'", "one of auto, 32"),
    ("model.optim.name=sgd", "model.optim.name", "'sgd'", "one of adamw, adam"),
    ("model.peft.peft_scheme=loar", "model.peft.peft_scheme", "'loar'", "one of lora"),
    ("model.peft.peft_scheme=lora,lora", "model.peft.peft_scheme", "'lora,lora'", "without repeats"),
    ("model.peft.lora_tuning.target_modules=[attention_qkvv]", "model.peft.lora_tuning.target_modules",
     "['attention_qkvv']", "attention_qkv"),
    ("model.peft.lora_tuning.layer_selection=[1,1]", "model.peft.lora_tuning.layer_selection", "[1, 1]", "distinct"),
    ("model.data.validation_ds.metric=bleu", "model.data.validation_ds.metric", "'bleu'", "one of squad"),
    ("model.data.train_ds.micro_batch_size=2", "model.data.train_ds.micro_batch_size", "2",
     "model.micro_batch_size=4"),
])
def test_bad_values_name_key_value_and_expectation(override, key, value, expected):
    with pytest.raises(ConfigError) as err:
        load_config(CONF / "peft_tuning.yaml", [override])
    message = str(err.value)
    assert f"{key}={value}" in message and expected in message, message


@pytest.mark.parametrize("override, key", [
    ("trainer.max_stepz=3", "trainer.max_stepz"),
    ("model.peft.lora_tuning.rank=8", "model.peft.lora_tuning.rank"),
    # keys the redesign removed are unknown now, not silently ignored
    ("model.data.train_ds.names=[a]", "model.data.train_ds.names"),
    ("model.optim.sched.name=CosineAnnealing", "model.optim.sched.name"),
    ("inference.batch_size=4", "inference.batch_size"),
])
def test_unknown_and_removed_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'"):
        load_config(CONF / "peft_tuning.yaml", [override])


def test_a_bad_yaml_file_is_named(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown config key 'trainer.max_stepz'"):
        load_config(unknown)
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("model:\n  optim:\n    lr: fast\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: model.optim.lr='fast': expected a number"):
        load_config(wrong_type)
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: cannot parse YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_must_be_key_value():
    with pytest.raises(ConfigError, match=r"override 'trainer.max_steps' must look like key=value"):
        load_config(None, ["trainer.max_steps"])


def test_max_steps_minus_one_needs_max_epochs():
    with pytest.raises(ConfigError, match="trainer.max_steps=-1"):
        load_config(None, ["trainer.max_steps=-1"])
    assert load_config(None, ["trainer.max_steps=-1", "trainer.max_epochs=2"]).trainer.max_epochs == 2


def test_good_values_are_accepted_and_typed():
    cfg = load_config(None, ["trainer.precision=auto", "model.optim.lr=3e-4", "model.peft.peft_scheme=lora,ptuning",
                             "model.peft.lora_tuning.target_modules=[attention,mlp_fc2]", "trainer.max_steps=7"])
    assert cfg.trainer.precision == "auto" and cfg.model.optim.lr == pytest.approx(3e-4)
    assert isinstance(cfg.trainer.max_steps, int) and cfg.trainer.max_steps == 7


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_an_override_yaml_cannot_read_is_one_error_naming_it():
    expected = r"override 'model.data.train_ds.prompt_template=\{input\}\{output\}'.*quote it"
    with pytest.raises(ConfigError, match=expected):
        load_config(CONF / "peft_tuning.yaml", ["model.data.train_ds.prompt_template={input}{output}"])
    quoted = load_config(CONF / "peft_tuning.yaml", ["model.data.train_ds.prompt_template='{input}{output}'"])
    assert quoted.model.data.train_ds.prompt_template == "{input}{output}"
