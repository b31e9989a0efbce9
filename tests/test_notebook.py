"""Notebook support: the run's parameters per mode, tables, the results store, and asking questions (the QA box
does exactly what answer_question does)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from lora_tutorial import notebook
from lora_tutorial.config import load_config
from lora_tutorial.metrics import score_predictions
from lora_tutorial.notebook import (DEMO_CONTEXT, DEMO_QUESTION, answer_question, format_table, interval, label_view,
                                    load_results, notebook_params, prediction_rows, print_results_table, qa_demo,
                                    record_result, results_table, scores_table, show_example, wrong_answers)
from lora_tutorial.peft import LoraPEFTConfig
from lora_tutorial.sft_data import SFTDataset
from lora_tutorial.squad import format_prompt

from helpers import (randomize_adapters, tiny_overrides, tiny_sft_model, tiny_tokenizer, write_records,
                     write_tiny_run_inputs)

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# Parameters per mode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, expected", [(None, "fast"), ("fast", "fast"), ("nemo", "nemo"), (" NEMO ", "nemo")])
def test_notebook_params_read_the_mode_from_the_environment(monkeypatch, tmp_path, env, expected):
    if env is None:
        monkeypatch.delenv(notebook.MODE_ENV, raising=False)
    else:
        monkeypatch.setenv(notebook.MODE_ENV, env)
    monkeypatch.chdir(tmp_path)  # outside any checkout: the root is the checkout the package came from
    params = notebook_params(verbose=False)
    assert params.mode == expected and params.root == REPO
    assert Path.cwd() == tmp_path  # no chdir any more


def test_an_unknown_mode_is_named(monkeypatch):
    monkeypatch.setenv(notebook.MODE_ENV, "quick")
    with pytest.raises(ValueError, match="LORA_TUTORIAL_MODE='quick': expected one of fast, nemo"):
        notebook_params(verbose=False)


def test_each_mode_trains_its_own_config_into_its_own_run_dir():
    fast, nemo = notebook_params("fast", verbose=False), notebook_params("nemo", verbose=False)
    assert fast.run_dir != nemo.run_dir
    fast_cfg, nemo_cfg = fast.config("trainer.max_steps=7"), nemo.config()
    assert fast_cfg == load_config(REPO / "conf/peft_tuning.yaml", [f"exp_manager.explicit_log_dir={fast.run_dir}",
                                                                     "trainer.max_steps=7"])
    assert nemo_cfg == load_config(REPO / "conf/nemo_tutorial.yaml", [f"exp_manager.explicit_log_dir={nemo.run_dir}"])
    assert fast.adapter_path() == Path(fast.run_dir) / "checkpoints" / "smollm2_lora_squad.safetensors"
    limited = fast.config(*fast.test_overrides())
    assert limited.model.data.test_ds.limit == fast.eval_limit


def test_method_configs_never_write_into_the_lora_run():
    params = notebook_params("fast", verbose=False)
    dirs = set()
    for scheme in ("lora", "adapter", "ia3", "ptuning", "lora,ptuning"):
        cfg = params.method_config(scheme, lr=2e-3)
        assert cfg.model.peft.peft_scheme == scheme and cfg.model.optim.lr == 2e-3
        assert cfg.trainer.max_steps == params.method_steps
        dirs.add(cfg.exp_manager.explicit_log_dir)
    assert len(dirs) == 5 and params.run_dir not in dirs


def test_ensure_adapter_uses_an_existing_adapter_without_training(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    params = dataclasses.replace(notebook_params("fast", verbose=False), root=tmp_path)
    adapter = tmp_path / params.adapter_path()
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"stand-in")

    def no_training(cfg):
        raise AssertionError("ensure_adapter trained although the adapter exists")

    monkeypatch.setattr(notebook, "train", no_training)
    assert notebook.ensure_adapter(params) == adapter
    assert "Using the adapter notebook 03 trained" in capsys.readouterr().out


def test_start_run_and_fit_and_score_give_a_method_row(tmp_path):
    from lora_tutorial.plots import plot_methods

    root = write_tiny_run_inputs(tmp_path / "inputs")
    cfg = load_config(None, tiny_overrides(root, tmp_path / "run", max_steps=2) + ["trainer.val_check_interval=0"])
    model, trainer = notebook.start_run(cfg)
    model.add_adapter(LoraPEFTConfig(cfg.model))
    row = notebook.fit_and_score(model, trainer, cfg.model.data.test_ds, "LoRA r=4")
    assert row["method"] == "LoRA r=4" and row["steps"] == 2
    assert row["trainable_params"] == model.model.num_parameters(trainable_only=True)
    assert (row["f1"], row["f1_interval"]) == (row["scores"].f1, row["scores"].f1_interval)
    assert row["scores"].n == 4
    plot_methods([row])  # the row is what the figure takes


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def test_format_table_text_and_markdown():
    rows = [("a", (2, 3), 1234567, 0.25), ("bb|c", (4,), 5, None)]
    text = format_table(rows, ["name", "shape", "values", "x"], digits=2).splitlines()
    assert text[0].split() == ["name", "shape", "values", "x"]
    assert text[2].split() == ["a", "(2,", "3)", "1,234,567", "0.25"]
    assert text[3].endswith("–")
    assert text[2].index("1,234,567") + len("1,234,567") == text[3].index("5") + 1  # numbers right-aligned
    md = format_table(rows, ["name", "shape", "values", "x"], markdown=True).splitlines()
    assert md[1] == "|---|---|---:|---|"  # x is not numeric in every row
    assert md[2] == "| a | (2, 3) | 1,234,567 | 0.2 |"
    assert md[3] == "| bb\\|c | (4) | 5 | – |"


def test_interval_and_scores_table():
    assert interval(61.234, (58.06, 64.35)) == "61.2 [58.1, 64.3]"
    scores = score_predictions(["Paris", "Lyon"], [["Paris"], ["Nice"]])
    table = scores_table({"base + adapter": scores}).splitlines()
    assert table[0] == "| model | questions | EM [95 % CI] | F1 [95 % CI] |"
    assert table[2] == (f"| base + adapter | 2 test | {interval(50.0, scores.em_interval)} | "
                        f"{interval(50.0, scores.f1_interval)} |")


def test_show_example_and_prediction_rows():
    record = {"input": format_prompt("The cat sat on the mat.", "Where?"), "output": "on the mat",
              "answers": ["on the mat", "mat"]}
    text = show_example(record)
    assert "Question: Where?" in text and "output: 'on the mat'" in text and "['on the mat', 'mat']" in text
    prompt = format_prompt("Some text.", "Who won?")
    rows = prediction_rows([prompt], [["Denver Broncos", "Broncos"]],
                           {"base": ["The answer is Denver"], "tuned": ["Denver Broncos"]}, max_chars=12)
    assert rows == [["Who won?", "Denver Bron…", "The answer …", "Denver Bron…"]]


def test_wrong_answers_lists_the_misses_with_their_f1():
    prompts = [format_prompt("c", q) for q in ("Q1?", "Q2?", "Q3?")]
    rows = wrong_answers(prompts, ["Paris", "the Broncos team", "x"], [["Paris"], ["Denver Broncos"], ["y"]])
    # Q1 is right; Q2 shares "broncos" (pred [broncos, team], gold [denver, broncos]): P = R = 1/2, F1 50
    assert rows == [("Q2?", "Denver Broncos", "the Broncos team", pytest.approx(50.0)), ("Q3?", "y", "x", 0.0)]


def test_label_view_shows_what_the_loss_sees(tmp_path):
    tok = tiny_tokenizer()
    record = {"input": format_prompt("Paris is the capital of France.", "What is the capital?"), "output": "Paris"}
    item = SFTDataset(write_records(tmp_path / "a.jsonl", [record]), tok)[0]
    rows = label_view(item, tok, last=4)
    n = len(item["input_ids"])
    assert [pos for pos, _, _ in rows] == list(range(n - 4, n))
    answer = n - item["prompt_len"]  # " Paris" and EOS
    assert [label for _, _, label in rows[:4 - answer]] == ["-100 (ignored)"] * (4 - answer)
    assert rows[-1][1:] == ("'<|im_end|>'", "'<|im_end|>'")
    assert "".join(eval(text) for _, text, _ in rows[4 - answer:-1]) == " Paris"  # noqa: S307 - a repr


# ----------------------------------------------------------------------------------------------
# Results store
# ----------------------------------------------------------------------------------------------


def test_record_result_updates_in_place_and_the_table_renders(tmp_path):
    path = tmp_path / "experiments" / "results.json"
    first = score_predictions(["Paris", "Lyon"], [["Paris"], ["Nice"]])
    record_result("lora", "LoRA r=32", first, path=path, trainable_params=1_474_560, steps=100, train_seconds=301.2)
    record_result("ia3", "IA3", score_predictions(["Lyon"], [["Nice"]]), path=path)
    better = score_predictions(["Paris", "Nice"], [["Paris"], ["Nice"]])
    record_result("lora", "LoRA r=32", better, path=path, trainable_params=1_474_560, steps=100, train_seconds=290.0)
    stored = load_results(path)
    assert list(stored) == ["lora", "ia3"]  # first-recorded order; a second record replaces the first
    assert stored["lora"]["em"] == 100.0 and stored["lora"]["em_interval"] == [100.0, 100.0]
    assert stored["lora"]["n"] == 2 and stored["lora"]["split"] == "test"
    assert json.loads(path.read_text()) == stored
    table = results_table(stored).splitlines()
    assert table[0] == "| run | trainable params | steps | train s | questions | EM [95 % CI] | F1 [95 % CI] |"
    assert table[2] == "| LoRA r=32 | 1,474,560 | 100 | 290 | 2 test | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] |"
    assert table[3] == "| IA3 | – | – | – | 1 test | 0.0 [0.0, 0.0] | 0.0 [0.0, 0.0] |"
    assert "no results" in results_table({}) and load_results(tmp_path / "none.json") == {}


def test_print_results_table_reads_the_modes_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(notebook, "find_repo_root", lambda start=None: tmp_path)
    path = tmp_path / "experiments" / "tutorial_nemo" / "results.json"
    record_result("x", "LoRA", score_predictions(["Paris"], [["Paris"]]), path=path)
    print_results_table("nemo")
    out = capsys.readouterr().out
    assert "experiments/tutorial_nemo/results.json" in out and "| LoRA |" in out


# ----------------------------------------------------------------------------------------------
# Asking questions
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned():
    model = tiny_sft_model()
    model.add_adapter(LoraPEFTConfig(None, adapter_dim=4, alpha=8))
    randomize_adapters(model.model, std=0.5)
    return model


def test_answer_question_is_generate_answers_on_the_training_prompt(tuned):
    context, question = "The cat sat on the mat.", "Where did the cat sit?"
    answer = answer_question(tuned, context, question, tokens_to_generate=6)
    prompt = format_prompt(context, question)
    ids = tuned.tokenizer.encode(prompt)
    batch = {"input_ids": torch.tensor([ids]), "prompt_lens": torch.tensor([len(ids)]), "prompts": [prompt]}
    assert answer == tuned.generate_answers(batch, greedy=True, tokens_to_generate=6)[0]


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(tuned):
    state = torch.random.get_rng_state()
    sampled = [answer_question(tuned, "The cat sat.", "Who?", greedy=False, temperature=2.0, top_p=1.0, seed=3,
                               tokens_to_generate=8) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert torch.equal(torch.random.get_rng_state(), state)
    others = {answer_question(tuned, "The cat sat.", "Who?", greedy=False, temperature=2.0, top_p=1.0, seed=s,
                              tokens_to_generate=8) for s in range(4, 9)}
    assert len(others | {sampled[0]}) > 1  # the seed matters


def test_the_qa_box_answers_what_answer_question_answers(tuned):
    box = qa_demo(tuned)
    assert box.answer() == answer_question(tuned, DEMO_CONTEXT, DEMO_QUESTION)
    context_box, question_box = box.children[0], box.children[1]
    context_box.value, question_box.value = "Paris is the capital of France.", "What is the capital?"
    text = box.answer()
    assert text == answer_question(tuned, "Paris is the capital of France.", "What is the capital?")
    output = box.children[-1]
    assert output.outputs[-1]["text"] == f"Answer: {text}\n"  # what the reader sees under the button


def test_same_tensors_compares_names_dtypes_and_every_bit(tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(3, 4)
    save_file({"a": x, "b": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    save_file({"a": x.clone(), "b": torch.zeros(2)}, str(tmp_path / "two.safetensors"))
    nudged = x.clone()
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(1e9))  # one value, one bit (ulp) away
    save_file({"a": nudged, "b": torch.zeros(2)}, str(tmp_path / "nudged.safetensors"))
    save_file({"a": x, "c": torch.zeros(2)}, str(tmp_path / "renamed.safetensors"))
    save_file({"a": x.double(), "b": torch.zeros(2)}, str(tmp_path / "double.safetensors"))
    save_file({"a": x, "b": -torch.zeros(2)}, str(tmp_path / "signed_zero.safetensors"))  # == but not bitwise
    save_file({"a": x.reshape(4, 3), "b": torch.zeros(2)}, str(tmp_path / "reshaped.safetensors"))
    assert notebook.same_tensors(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    for other in ("nudged", "renamed", "double", "signed_zero", "reshaped"):
        assert not notebook.same_tensors(tmp_path / "one.safetensors", tmp_path / f"{other}.safetensors"), other
