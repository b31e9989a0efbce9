"""Evaluation on tiny models: evaluate(cfg) with Lightning's predict, answer_dataset without it (the same
answers), the base-vs-tuned comparison, the predictions file, and SFTModel's generation entry points."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lora_tutorial.config import load_config
from lora_tutorial.evaluation import Evaluation, answer_dataset, compare_base_and_tuned, evaluate, write_predictions
from lora_tutorial.metrics import score_predictions
from lora_tutorial.peft import LoraPEFTConfig, adapter_names, disable_adapters, save_adapters
from lora_tutorial.precision import cast_frozen_weights, cpu_has_amx
from lora_tutorial.quantize import Int8Linear
from lora_tutorial.sft_data import SFTCollator
from lora_tutorial.sft_model import SFTModel

from helpers import (QA_EXAMPLES, qa_records, randomize_adapters, tiny_overrides, tiny_sft_model, write_records,
                     write_tiny_run_inputs)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return write_tiny_run_inputs(tmp_path_factory.mktemp("tiny"))


def tuned_sft(cfg, seed: int = 0) -> SFTModel:
    """The tiny SFT model with a random (as if trained) LoRA."""
    model = tiny_sft_model(cfg, seed=seed)
    model.add_adapter(LoraPEFTConfig(None, adapter_dim=4, alpha=8))
    randomize_adapters(model.model, std=0.5)
    return model


@pytest.fixture
def test_cfg(tmp_path):
    path = write_records(tmp_path / "test.jsonl", qa_records(QA_EXAMPLES + [(c + " Twice.", q, a)
                                                                            for c, q, a in QA_EXAMPLES]))
    return load_config(None, [f"model.data.test_ds.file_names=[{path}]", "model.data.test_ds.tokens_to_generate=4",
                              "inference.tokens_to_generate=4"])


def batches(model: SFTModel, ds_cfg, batch_size: int = 3):
    dataset = model.build_dataset(ds_cfg)
    collate = SFTCollator(model.tokenizer.pad_id)
    return [collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            for start in range(0, len(dataset), batch_size)]


def test_evaluate_scores_and_writes_predictions(tiny_setup, tmp_path):
    out = tmp_path / "pred.jsonl"
    cfg = load_config(REPO / "conf/peft_eval.yaml", tiny_overrides(tiny_setup, tmp_path)
                      + ["model.peft.restore_from_path=null", f"inference.output_file={out}"])
    result = evaluate(cfg)
    assert isinstance(result, Evaluation)
    assert len(result.answers) == len(result.prompts) == len(QA_EXAMPLES) == result.scores.n
    assert result.scores == score_predictions(result.answers, result.golds)
    assert sorted(g[0] for g in result.golds) == sorted(a for _, _, a in QA_EXAMPLES)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"input": p, "prediction": a, "answers": g}
                    for p, a, g in zip(result.prompts, result.answers, result.golds)]


def test_evaluate_loads_the_adapter_named_in_the_config(tiny_setup, tmp_path):
    base_cfg = load_config(REPO / "conf/peft_eval.yaml", tiny_overrides(tiny_setup, tmp_path)
                           + ["model.peft.restore_from_path=null"])
    tuned = SFTModel.restore_from(base_cfg.model.restore_from_path, base_cfg)
    tuned.add_adapter(LoraPEFTConfig(None, adapter_dim=4, alpha=8))
    randomize_adapters(tuned.model, std=0.5)
    adapter = save_adapters(tuned.model, tmp_path / "adapter.safetensors")
    cfg = load_config(REPO / "conf/peft_eval.yaml", tiny_overrides(tiny_setup, tmp_path)
                      + [f"model.peft.restore_from_path={adapter}"])
    with_adapter = evaluate(cfg)
    expected = evaluate(base_cfg, model=tuned)
    by_prompt = dict(zip(expected.prompts, expected.answers))
    assert dict(zip(with_adapter.prompts, with_adapter.answers)) == by_prompt
    plain = evaluate(base_cfg)  # the base alone answers otherwise: the adapter was really loaded
    assert dict(zip(plain.prompts, plain.answers)) != by_prompt


def test_answer_dataset_gives_the_answers_of_generate_answers(test_cfg):
    model = tuned_sft(test_cfg)
    result = answer_dataset(model, test_cfg.model.data.test_ds, batch_size=3, progress=False)
    expected = {}
    for batch in batches(model, test_cfg.model.data.test_ds):
        expected.update(zip(batch["prompts"], model.generate_answers(batch, greedy=True)))
    assert dict(zip(result.prompts, result.answers)) == expected
    assert len(result.prompts) == len(expected) == 8
    assert result.scores == score_predictions(result.answers, result.golds)


def test_evaluate_and_answer_dataset_agree(test_cfg):
    model = tuned_sft(test_cfg)
    cfg = test_cfg.copy()
    OmegaConf.update(cfg, "trainer.enable_progress_bar", False)
    OmegaConf.update(cfg, "trainer.accelerator", "cpu")
    predicted = evaluate(cfg, model=model)
    direct = answer_dataset(model, cfg.model.data.test_ds, progress=False)
    assert dict(zip(predicted.prompts, predicted.answers)) == dict(zip(direct.prompts, direct.answers))


def test_compare_base_and_tuned_switches_the_adapter_off_for_the_base(test_cfg):
    model = tuned_sft(test_cfg)
    ds_cfg = test_cfg.model.data.test_ds
    out = compare_base_and_tuned(model, ds_cfg, progress=False)
    assert list(out) == ["base (chat template)", "base + adapter"]
    base, tuned = {}, {}
    for batch in batches(model, ds_cfg):
        tuned.update(zip(batch["prompts"], model.generate_answers(batch, greedy=True)))
        with disable_adapters(model.model):
            base.update(zip(batch["prompts"], model.generate_answers(batch, greedy=True, use_chat_template=True)))
    assert dict(zip(out["base + adapter"].prompts, out["base + adapter"].answers)) == tuned
    assert dict(zip(out["base (chat template)"].prompts, out["base (chat template)"].answers)) == base
    assert base != tuned  # the adapter is really off for one and on for the other
    assert all(m.adapter_enabled for m in model.model.modules() if hasattr(m, "adapter_enabled"))


def test_quantized_evaluation_replaces_the_frozen_linears(test_cfg):
    model = tuned_sft(test_cfg)
    cfg = test_cfg.copy()
    for key, value in (("inference.quantize_int8", True), ("trainer.enable_progress_bar", False),
                       ("trainer.accelerator", "cpu")):
        OmegaConf.update(cfg, key, value)
    result = evaluate(cfg, model=model)
    assert result.scores.n == 8
    assert any(isinstance(m, Int8Linear) for m in model.model.modules())
    qkv = model.model.blocks[0].attention.attention_qkv
    assert type(qkv).__name__ == "LoRALinear" and isinstance(qkv.base, Int8Linear)  # the adapter stays on top


def test_sampled_answers_repeat_with_a_generator_and_leave_the_global_rng(test_cfg):
    model = tuned_sft(test_cfg)
    batch = batches(model, test_cfg.model.data.test_ds)[0]
    state = torch.random.get_rng_state()
    runs = [model.generate_answers(batch, generator=torch.Generator().manual_seed(4), greedy=False,
                                   temperature=2.0, tokens_to_generate=8) for _ in range(2)]
    assert runs[0] == runs[1]
    assert torch.equal(torch.random.get_rng_state(), state)


def test_sft_model_load_adapters_and_inference_config(test_cfg, tmp_path):
    trained = tuned_sft(test_cfg)
    path = save_adapters(trained.model, tmp_path / "a.safetensors")
    fresh = tiny_sft_model(test_cfg)
    assert fresh.load_adapters(str(path)) == trained.model.peft_configs
    batch = batches(fresh, test_cfg.model.data.test_ds)[0]
    assert fresh.generate_answers(batch) == trained.generate_answers(batch)
    fresh.set_inference_config({"tokens_to_generate": 1})
    assert all(len(fresh.tokenizer.encode(a)) <= 1 for a in fresh.generate_answers(batch))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['batch_size'\]"):
        fresh.set_inference_config({"batch_size": 4})


def test_sft_model_loads_adapters_under_names(test_cfg, tmp_path):
    trained = tuned_sft(test_cfg)
    path = save_adapters(trained.model, tmp_path / "a.safetensors")
    fresh = tiny_sft_model(test_cfg)
    fresh.load_adapters(str(path), name="first")
    fresh.load_adapters(str(path), name="second")
    assert adapter_names(fresh.model) == ["first", "second"]


def test_write_predictions_is_one_line_per_question(tmp_path):
    path = write_predictions(tmp_path / "p.jsonl", ["q1", "q2"], ["a1", "a2"], [["g1"], ["g2", "g3"]])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"input": "q1", "prediction": "a1", "answers": ["g1"]},
        {"input": "q2", "prediction": "a2", "answers": ["g2", "g3"]}]


@pytest.mark.skipif(not cpu_has_amx(), reason="weights are pre-packed only on CPUs with AMX")
def test_evaluation_packs_the_bf16_weights_and_answers_as_without(test_cfg, monkeypatch):
    from lora_tutorial import prepack

    model = tuned_sft(test_cfg)
    cast_frozen_weights(model.model, torch.bfloat16)
    cfg = test_cfg.copy()
    OmegaConf.update(cfg, "trainer.enable_progress_bar", False)
    OmegaConf.update(cfg, "trainer.accelerator", "cpu")
    packed_counts = []
    real = prepack.packed_for_evaluation

    @contextlib.contextmanager
    def counting(module):
        with real(module) as n:
            packed_counts.append(n)
            yield n

    monkeypatch.setattr("lora_tutorial.evaluation.packed_for_evaluation", counting)
    monkeypatch.setattr("lora_tutorial.sft_model.packed_for_evaluation", counting)
    direct = answer_dataset(model, cfg.model.data.test_ds, progress=False)
    predicted = evaluate(cfg, model=model)
    # both ways in packed every block's four matrices and the LM head, once
    assert packed_counts == [4 * model.model.config.n_layer + 1] * 2
    monkeypatch.setattr(prepack, "packing_pays", lambda module: False)
    plain = answer_dataset(model, cfg.model.data.test_ds, progress=False)
    assert direct.answers == plain.answers and dict(zip(predicted.prompts, predicted.answers)) == dict(
        zip(plain.prompts, plain.answers))
    assert not any("forward" in vars(m) for m in model.model.modules())  # plain layers again
