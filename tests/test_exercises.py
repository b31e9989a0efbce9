"""The notebooks' exercises: each expected answer agrees with what the package itself does (SmolLM2's shapes on
the "meta" device, no weights needed), and ``check`` says right or wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_tutorial.config import load_config
from lora_tutorial.exercises import EXERCISES, check, is_right
from lora_tutorial.model import GPT, GPTConfig
from lora_tutorial.peft import IA3PEFTConfig, LoraPEFTConfig, PtuningPEFTConfig, add_adapter, freeze_prompt_encoder
from lora_tutorial.training import gradient_accumulation

REPO = Path(__file__).resolve().parents[1]


def smollm2_shaped(*configs) -> GPT:
    """SmolLM2-135M's architecture with the given adapters, shapes only (no memory, no weights)."""
    with torch.device("meta"):
        model = GPT(GPTConfig())
        add_adapter(model, list(configs), verbose=False)
    return model


def test_lora_counts_are_what_add_adapter_adds():
    qkv_r8 = smollm2_shaped(LoraPEFTConfig(None, adapter_dim=8, target_modules=["attention_qkv"]))
    assert EXERCISES["2.1"].expected() == qkv_r8.num_parameters(trainable_only=True)
    fc1 = smollm2_shaped(LoraPEFTConfig(None, adapter_dim=32, target_modules=["mlp_fc1"])).blocks[0].mlp.mlp_fc1
    assert EXERCISES["4.1"].expected() == fc1.lora_A.numel() + fc1.lora_B.numel()
    assert EXERCISES["4.2"].expected() == fc1.rank  # rank(B A) <= r


def test_ia3_and_ptuning_counts_are_what_the_package_builds():
    ia3 = smollm2_shaped(IA3PEFTConfig())
    assert EXERCISES["6.1"].expected() * ia3.config.n_layer == ia3.num_parameters(trainable_only=True)
    ptuned = smollm2_shaped(PtuningPEFTConfig())
    with torch.device("meta"):
        table = freeze_prompt_encoder(ptuned)
    assert EXERCISES["6.2"].expected() == table.table.numel()


def test_accumulation_exercise_matches_the_trainer_arithmetic():
    cfg = load_config(None, ["model.global_batch_size=16", "model.micro_batch_size=4", "trainer.devices=2",
                             "trainer.accelerator=cpu"])
    assert EXERCISES["2.2"].expected() == gradient_accumulation(cfg)


def test_answer_token_exercise_matches_the_datasets_labels(tmp_path):
    from lora_tutorial.pretrained import load_tokenizer
    from lora_tutorial.sft_data import IGNORE_INDEX, SFTDataset
    from lora_tutorial.squad import format_prompt

    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"input": format_prompt("The Broncos won.", "Who won?"), "output": "Denver Broncos"}))
    item = SFTDataset(path, load_tokenizer())[0]
    assert EXERCISES["1.1"].expected() == sum(label != IGNORE_INDEX for label in item["labels"])


def test_test_articles_exercise_counts_the_dev_articles_of_the_first_200_test_questions():
    from lora_tutorial.squad import load_squad

    dev = load_squad(REPO / "data/SQuAD/dev-v1.1.json", "dev")
    article_of = {qa["id"]: a for a, art in enumerate(dev["data"]) for p in art["paragraphs"] for qa in p["qas"]}
    lines = (REPO / "data/SQuAD/splits/test.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    expected = len({article_of[json.loads(line)["id"]] for line in lines})
    assert EXERCISES["1.2"].expected() == expected


def test_check_says_right_or_wrong_with_a_hint(capsys):
    assert check("5.1", "denver broncos") is None  # prints, returns nothing (no stray "True" in a notebook)
    assert "Exercise 5.1: right" in capsys.readouterr().out
    check("5.1", "The Denver Broncos")
    assert "not yet" in (out := capsys.readouterr().out) and EXERCISES["5.1"].hint in out
    # about the learner's own run: the notebook passes the expected value
    assert is_right("3.1", 400, expected=400) and not is_right("3.1", 400, expected=800)
    with pytest.raises(ValueError, match="pass expected"):
        check("3.1", 400)


def test_f1_exercise_by_hand():
    # "the Denver Broncos" -> [denver, broncos], "Broncos" -> [broncos]: P = 1/2, R = 1, F1 = 2/3
    assert EXERCISES["5.2"].expected() == 66.7

