"""inspection.py and tutorial.py on tiny random models: the numbers the notebooks show, checked by hand."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lora_tutorial import inspection as ins  # noqa: E402
from lora_tutorial import tutorial  # noqa: E402
from lora_tutorial.config import default_config, load_config  # noqa: E402
from lora_tutorial.peft import (LoraPEFTConfig, PtuningPEFTConfig, adapter_state_dict, add_adapter,  # noqa: E402
                                save_adapters)

from helpers import tiny_llama_config, tiny_model, write_tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8


def lora_model(seed: int = 0, layers=None, rslora: bool = False):
    """A tiny Llama with LoRA (r=4, alpha=8) on QKV and the MLP input; B randomised so ΔW is not zero."""
    model = tiny_model(tiny_llama_config(), seed=seed)
    knobs = {"adapter_dim": RANK, "alpha": ALPHA, "target_modules": ["attention_qkv", "mlp_fc1"],
             "layer_selection": layers, "rslora": rslora}
    add_adapter(model, LoraPEFTConfig({"peft": {"lora_tuning": knobs}}), verbose=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in ins.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ----------------------------------------------------------------------------------------------
# ΔW norms, singular values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_norms_equal_scaled_BA_computed_by_hand(rslora):
    model = lora_model(rslora=rslora)
    rows = ins.delta_weight_norms(model)
    layers = dict(ins.lora_layers(model))
    assert [r["name"] for r in rows] == list(layers)
    assert len(rows) == 2 * 2  # 2 layers x (qkv, fc1)
    scale = ALPHA / math.sqrt(RANK) if rslora else ALPHA / RANK
    for r in rows:
        layer = layers[r["name"]]
        by_hand = scale * (layer.lora_B.detach().double() @ layer.lora_A.detach().double())
        assert r["delta_norm"] == pytest.approx(by_hand.norm().item(), rel=1e-5)
        w = layer.base.weight.detach().double().norm().item()
        assert r["weight_norm"] == pytest.approx(w, rel=1e-6)
        assert r["relative"] == pytest.approx(by_hand.norm().item() / w, rel=1e-5)
        assert r["layer"] == int(r["name"].split(".")[1])
        assert r["target"] == r["name"].split(".")[-1]


def test_delta_norms_are_the_same_while_merged():
    model = lora_model()
    before = ins.delta_weight_norms(model)
    from lora_tutorial.peft import merge_lora, unmerge_lora

    merge_lora(model)
    try:
        during = ins.delta_weight_norms(model)
    finally:
        unmerge_lora(model)
    for a, b in zip(before, during):
        assert b["delta_norm"] == pytest.approx(a["delta_norm"], rel=1e-6)
        assert b["weight_norm"] == pytest.approx(a["weight_norm"], rel=1e-4)


def test_fresh_lora_has_zero_delta():
    model = tiny_model(tiny_llama_config())
    add_adapter(model, LoraPEFTConfig({"peft": {"lora_tuning": {"adapter_dim": RANK}}}), verbose=False)
    assert all(r["delta_norm"] == 0 for r in ins.delta_weight_norms(model))
    sv = ins.singular_values(ins.delta_weight(*_ab(model)))
    assert ins.rank_for_energy(sv) == 0


def _ab(model):
    layer = ins.lora_layers(model)[0][1]
    return layer.lora_A, layer.lora_B, layer.scaling


def test_singular_values_count_order_and_rank():
    model = lora_model()
    A, B, scaling = _ab(model)
    delta = ins.delta_weight(A, B, scaling)
    assert delta.shape == (B.shape[0], A.shape[1])
    torch.testing.assert_close(delta, scaling * (B.float() @ A.float()))
    sv = ins.singular_values(delta)
    assert sv.shape == (min(delta.shape),)
    assert torch.all(sv[:-1] >= sv[1:])  # largest first
    assert (sv > 1e-5 * sv[0]).sum().item() == RANK  # B A has rank r (the rest is float32 rounding)
    # The squares of the singular values add up to ||ΔW||².
    assert (sv ** 2).sum().item() == pytest.approx(delta.double().norm().item() ** 2, rel=1e-9)


def test_rank_for_energy_on_known_values():
    values = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: cumulative 9/14, 13/14, 1
    assert ins.rank_for_energy(values, 0.5) == 1
    assert ins.rank_for_energy(values, 9 / 14) == 1
    assert ins.rank_for_energy(values, 0.9) == 2
    assert ins.rank_for_energy(values, 1.0) == 3
    with pytest.raises(ValueError):
        ins.rank_for_energy(values, 0)


def test_rank_usage_counts_singular_values_per_target():
    model = lora_model()
    rows = ins.rank_usage(model, energy=1.0)
    assert [r[0] for r in rows] == ["attention_qkv", "mlp_fc1"]
    for target, layers, rank, low, median, high in rows:
        assert (layers, rank) == (2, RANK)
        assert low <= median <= high <= RANK  # B A has rank <= r
    by_hand = [ins.rank_for_energy(ins.singular_values(ins.delta_weight(m.lora_A, m.lora_B, m.scaling)), 0.5)
               for name, m in ins.lora_layers(model) if name.endswith("attention_qkv")]
    assert ins.rank_usage(model, energy=0.5)[0][3:] == (min(by_hand), sorted(by_hand)[1], max(by_hand))


def test_running_mean():
    assert ins.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert ins.running_mean([2.0], 10) == [2.0]


def test_plots_return_figures(tmp_path):
    model = lora_model()
    fig = ins.plot_delta_norms(ins.delta_weight_norms(model))
    assert len(fig.axes) == 2
    A, B, scaling = _ab(model)
    fig = ins.plot_singular_values(ins.singular_values(ins.delta_weight(A, B, scaling)), rank=RANK)
    assert len(fig.axes) == 2
    assert len(fig.axes[0].lines[0].get_xdata()) == 2 * RANK


# ----------------------------------------------------------------------------------------------
# The adapter file as a table
# ----------------------------------------------------------------------------------------------


def test_adapter_table_lists_exactly_the_adapter_tensors(tmp_path):
    model = lora_model(layers=[1])
    path = save_adapters(model, tmp_path / "a.safetensors")
    tensors, info = ins.read_adapter(path)
    rows = ins.adapter_tensor_rows(tensors)
    expected = adapter_state_dict(model)
    assert [name for name, _, _ in rows] == [
        "blocks.1.attention.attention_qkv.lora_A", "blocks.1.attention.attention_qkv.lora_B",
        "blocks.1.mlp.mlp_fc1.lora_A", "blocks.1.mlp.mlp_fc1.lora_B"]
    assert {name for name, _, _ in rows} == set(expected)
    for name, shape, numel in rows:
        assert shape == tuple(expected[name].shape)
        assert numel == expected[name].numel()
    assert sum(n for _, _, n in rows) == model.num_parameters(trainable_only=True)
    assert [c.scheme for c in info["peft_configs"]] == ["lora"]


def test_adapter_rows_in_layer_order_and_grouped(tmp_path):
    model = tiny_model(tiny_llama_config(n_layer=12))
    add_adapter(model, LoraPEFTConfig({"peft": {"lora_tuning": {"adapter_dim": RANK}}}), verbose=False)
    rows = ins.adapter_tensor_rows(adapter_state_dict(model))
    layers = [int(name.split(".")[1]) for name, _, _ in rows]
    assert layers == sorted(layers)  # blocks.2 before blocks.10
    grouped = ins.grouped_adapter_rows(adapter_state_dict(model))
    assert [g[0] for g in grouped] == ["blocks.*.attention.attention_qkv.lora_A",
                                       "blocks.*.attention.attention_qkv.lora_B"]
    d = model.config.d_model
    qkv_out = model.blocks[0].attention.attention_qkv.base.out_features
    assert grouped[0][1:] == (12, (RANK, d), RANK * d, 12 * RANK * d)
    assert grouped[1][1:] == (12, (qkv_out, RANK), qkv_out * RANK, 12 * qkv_out * RANK)
    assert sum(g[4] for g in grouped) == model.num_parameters(trainable_only=True)


def test_format_table_text_and_markdown():
    rows = [("a", (2, 3), 1234567), ("bb", (4,), 5)]
    text = ins.format_table(rows, ["name", "shape", "values"]).splitlines()
    assert text[0].split() == ["name", "shape", "values"]
    assert text[2].endswith("1,234,567") and text[3].endswith("5")
    assert len(text[2]) == len(text[3])  # numbers right-aligned in one column
    md = ins.format_table(rows, ["name", "shape", "values"], markdown=True).splitlines()
    assert md[1] == "|---|---|---:|"
    assert md[2] == "| a | (2, 3) | 1,234,567 |"


# ----------------------------------------------------------------------------------------------
# Merge check and parameter budget
# ----------------------------------------------------------------------------------------------


def test_merged_outputs_agree_and_model_is_left_unmerged():
    model = lora_model()
    weights = {n: m.base.weight.detach().clone() for n, m in ins.lora_layers(model)}
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    check = ins.merged_outputs_agree(model, ids)
    assert check["agree"] and check["layers"] == 4
    assert check["tolerance"] == pytest.approx(1e-4 + 1e-5 * check["max_logit"])
    assert check["merged_vs_unmerged"] < 1e-4 and check["after_unmerge"] < 1e-4
    assert all(not m.merged for _, m in ins.lora_layers(model))
    for name, m in ins.lora_layers(model):
        torch.testing.assert_close(m.base.weight, weights[name], atol=1e-6, rtol=0)
    # And the adapter really changes the logits (so "agree" is not trivially true).
    from lora_tutorial.peft import disable_adapters

    with torch.no_grad():
        tuned = model(ids)
        with disable_adapters(model):
            base = model(ids)
    assert (tuned - base).abs().max() > 1e-3


def test_merged_outputs_agree_needs_lora():
    model = tiny_model(tiny_llama_config())
    with pytest.raises(ValueError, match="no LoRA"):
        ins.merged_outputs_agree(model, torch.zeros(1, 3, dtype=torch.long))


def test_parameter_budget_counts_trainable_and_base():
    model = tiny_model(tiny_llama_config())
    base = model.num_parameters()
    add_adapter(model, [LoraPEFTConfig({"peft": {"lora_tuning": {"adapter_dim": RANK}}}),
                        PtuningPEFTConfig({"peft": {"p_tuning": {"virtual_tokens": 3, "bottleneck_dim": 8,
                                                                 "embedding_dim": 8}}})], verbose=False)
    (full_name, full, full_pct, full_gib), (name, trainable, pct, gib) = ins.parameter_budget(model)
    assert full_name == "full fine-tune" and name == "lora+ptuning"
    assert full == base and full_pct == 100.0
    assert trainable == model.num_parameters(trainable_only=True)
    assert pct == pytest.approx(round(100 * trainable / base, 3))
    assert full_gib == pytest.approx(round(16 * base / 2 ** 30, 3))
    assert gib == pytest.approx(round((4 * base + 16 * trainable) / 2 ** 30, 3))


# ----------------------------------------------------------------------------------------------
# Metrics CSV, data helpers, predictions
# ----------------------------------------------------------------------------------------------


def test_read_metrics_and_loss_curve(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,lr,step,train_loss,val_em,val_f1,val_loss\n"
        "0,1e-4,4,2.5,,,\n0,,4,,10.0,20.0,2.2\n0,5e-5,9,1.5,,,\n")
    m = ins.read_metrics(tmp_path)
    assert m["train_loss"] == [(4, 2.5), (9, 1.5)]
    assert m["val_loss"] == [(4, 2.2)] and m["val_f1"] == [(4, 20.0)]
    assert "epoch" not in m and "step" not in m
    fig = ins.plot_loss_curve(tmp_path)
    assert len(fig.axes) == 2  # loss axis + F1 axis
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        ins.read_metrics(tmp_path / "missing")


def _write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_data_helpers(tmp_path):
    from lora_tutorial.tokenizer import tokenizer_from_hf_dir

    records = [{"input": "User: Context: The cat sat on the mat. Question: Where?\n\nAssistant:",
                "output": "on the mat", "answers": ["on the mat", "mat"]},
               {"input": "User: Context: Paris is the capital. Question: What?\n\nAssistant:", "output": "Paris"}]
    path = _write_jsonl(tmp_path / "x.jsonl", records)
    assert ins.count_examples({"x": path}) == [("x", str(path), 2)]
    assert ins.read_examples(path, 1) == records[:1]
    assert ins.wrap("aaa bbb ccc\n\nddd", 7) == "aaa bbb\nccc\n\nddd"
    text = ins.show_example(records[0])
    assert "Question: Where?" in text and "output: 'on the mat'" in text and "['on the mat', 'mat']" in text
    write_tiny_tokenizer(tmp_path / "tok")
    tok = tokenizer_from_hf_dir(tmp_path / "tok")
    lengths = ins.token_lengths(path, tok)
    for i, r in enumerate(records):
        assert lengths["prompt"][i] == len(tok.encode(r["input"]))
        assert lengths["answer"][i] == len(tok.encode(" " + r["output"]))
        assert lengths["total"][i] == len(tok.encode(r["input"] + " " + r["output"])) + 1
    summary = ins.length_summary({"answer": [3, 1, 2]})
    assert summary == [("answer", 1, 2, 2.0, 3)]
    fig = ins.plot_token_lengths(lengths, max_seq_length=1024)
    assert len(fig.axes) == 2


def test_plot_methods_plots_runs_with_a_score():
    runs = {"a": {"method": "LoRA", "trainable_params": 1000, "tuned_f1": 80.0},
            "b": {"method": "IA3", "trainable_params": 10, "tuned_f1": 20.0},
            "c": {"method": "no score", "trainable_params": 5}}
    fig = ins.plot_methods(runs, baseline=15.0)
    ax = fig.axes[0]
    assert len(ax.collections) == 2 and [t.get_text() for t in ax.texts] == ["LoRA", "IA3"]
    assert ax.lines[0].get_ydata()[0] == 15.0
    assert not ins.plot_methods(runs).axes[0].lines  # no baseline, no line


def test_question_and_prediction_rows():
    prompt = "User: Context: Some text. Question: Who won?\n\nAssistant:"
    assert ins.question_of(prompt) == "Who won?"
    rows = ins.predictions_rows([prompt], [["Denver Broncos", "Broncos"]],
                                {"base": ["The answer is Denver"], "tuned": ["Denver Broncos"]}, max_chars=12)
    assert rows == [["Who won?", "Denver Bron…", "The answer …", "Denver Bron…"]]
    assert ins.scores_rows({"base": {"exact_match": 10.04, "f1": 20.06, "n": 20}}) == [("base", 20, 10.0, 20.1)]


# ----------------------------------------------------------------------------------------------
# The QA demo on a tiny SFTModel
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    from lora_tutorial.sft_model import SFTModel
    from lora_tutorial.tokenizer import tokenizer_from_hf_dir

    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    tok = tokenizer_from_hf_dir(d)
    model = tiny_model(tiny_llama_config(vocab_size=tok.vocab_size, max_seq_len=256))
    return SFTModel(default_config(), model, tok)


def test_answer_question_matches_generate_answers(tiny_sft):
    from lora_tutorial.data import format_squad_input

    answer = ins.answer_question(tiny_sft, "The cat sat on the mat.", "Where did the cat sit?", tokens_to_generate=5)
    prompt = format_squad_input("The cat sat on the mat.", "Where did the cat sit?")
    ids = tiny_sft.tokenizer.encode(prompt)
    batch = {"input_ids": torch.tensor([ids]), "prompt_lens": torch.tensor([len(ids)]), "prompts": [prompt]}
    assert answer == tiny_sft.generate_answers(batch, greedy=True, tokens_to_generate=5)[0]
    sampled = [ins.answer_question(tiny_sft, "The cat sat.", "Who?", greedy=False, seed=3, tokens_to_generate=5)
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable


def test_qa_demo_wires_the_knobs(tiny_sft):
    calls = []

    def fake(model, context, question, **knobs):
        calls.append((model, context, question, knobs))
        return "forty-two"

    box = ins.qa_demo(tiny_sft, context="ctx", question="q?", answer_fn=fake)
    button = next(c for c in box.children if type(c).__name__ == "Button")
    button.click()
    assert len(calls) == 1
    model, context, question, knobs = calls[0]
    assert model is tiny_sft and context == "ctx" and question == "q?"
    assert knobs == {"greedy": True, "temperature": 0.7, "top_k": 0, "top_p": 0.9, "tokens_to_generate": 30,
                     "use_chat_template": False}


# ----------------------------------------------------------------------------------------------
# tutorial.py: parameters and the results store
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def keep_log_levels():
    """notebook_params() quiets Lightning's loggers for notebooks; put them back for the other tests."""
    import logging

    names = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
             "pytorch_lightning.accelerators.cuda", "lightning.pytorch.accelerators.cuda")
    levels = {n: logging.getLogger(n).level for n in names}
    yield names
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def test_quiet_logs_silences_lightning_info(keep_log_levels):
    import logging

    tutorial.quiet_logs()
    for name in keep_log_levels:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)


@pytest.mark.usefixtures("keep_log_levels")
@pytest.mark.parametrize("value,quick", [("1", True), ("yes", True), ("", False), ("0", False), (None, False)])
def test_notebook_params_reads_the_environment(monkeypatch, tmp_path, value, quick):
    if value is None:
        monkeypatch.delenv(tutorial.QUICK_ENV, raising=False)
    else:
        monkeypatch.setenv(tutorial.QUICK_ENV, value)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # not inside a checkout: falls back to the package's repo
    p = tutorial.notebook_params(verbose=False)
    assert Path.cwd() == REPO and p.root == str(REPO)
    assert p.quick is quick
    if quick:
        assert p.train_steps < 10 and p.eval_limit and p.eval_limit <= 8 and p.other_steps <= 5
        assert p.lora_log_dir != tutorial.FULL["lora_log_dir"]  # a test run never overwrites a full run
    else:
        assert (p.train_steps, p.val_check_interval, p.val_limit, p.eval_limit) == (100, 50, None, None)
    # Notebook 06 never writes into the LoRA run of notebook 03 (which 04 and 05 read).
    for scheme in ("lora", "adapter", "lora,ptuning"):
        log_dir = [o for o in p.method_overrides(scheme) if o.startswith("exp_manager.explicit_log_dir=")]
        assert len(log_dir) == 1 and log_dir[0].split("=", 1)[1] != p.lora_log_dir


@pytest.mark.usefixtures("keep_log_levels")
def test_notebook_params_moves_from_notebooks_to_the_root(monkeypatch):
    monkeypatch.chdir(REPO / "notebooks")
    tutorial.notebook_params(quick=True, verbose=False)
    assert Path.cwd() == REPO


@pytest.mark.usefixtures("keep_log_levels")
@pytest.mark.parametrize("quick", [True, False])
def test_overrides_are_valid_config_keys(quick):
    p = tutorial.notebook_params(quick=quick, chdir=False, verbose=False)
    cfg = load_config(REPO / "conf" / "peft_tuning.yaml", p.overrides())
    assert cfg.trainer.max_steps == p.train_steps
    assert cfg.exp_manager.explicit_log_dir == p.lora_log_dir
    assert cfg.model.data.validation_ds.limit == p.val_limit


def test_record_result_merges_and_table_renders(tmp_path):
    path = tmp_path / "experiments" / "results.json"
    tutorial.record_result("lora", {"method": "LoRA r=32", "zero_shot_em": 0.0, "zero_shot_f1": 21.37,
                                    "n_eval": 20}, path=path)
    tutorial.record_result("lora", {"tuned_em": 55.0, "tuned_f1": 70.456, "train_seconds": 301.2,
                                    "trainable_params": 1474560, "train_steps": 100}, path=path)
    tutorial.record_result("ia3", {"method": "IA3", "tuned_em": 5.0, "tuned_f1": 12.0}, path=path)
    stored = json.loads(path.read_text())
    assert list(stored) == ["lora", "ia3"]
    assert stored["lora"]["zero_shot_f1"] == 21.37 and stored["lora"]["tuned_f1"] == 70.456
    table = tutorial.results_table(path=path).splitlines()
    assert table[0] == ("| run | trainable params | steps | train time (s) | eval questions | zero-shot EM | "
                        "zero-shot F1 | tuned EM | tuned F1 |")
    assert table[2] == "| LoRA r=32 | 1,474,560 | 100 | 301 | 20 | 0.0 | 21.4 | 55.0 | 70.5 |"
    assert table[3] == "| IA3 | – | – | – | – | – | – | 5.0 | 12.0 |"
    assert len(table) == 4


def test_results_table_empty_and_printing(tmp_path, capsys):
    assert "no results" in tutorial.results_table(path=tmp_path / "none.json")
    path = tmp_path / "r.json"
    tutorial.record_result("x", {"tuned_f1": 1.0}, path=path)
    tutorial.print_results_table(path)
    out = capsys.readouterr().out
    assert str(path) in out and "| x |" in out


def test_results_path_separates_quick_and_full(monkeypatch):
    assert tutorial.results_path(quick=False, root="/r") == Path("/r/experiments/tutorial_results.json")
    assert tutorial.results_path(quick=True, root="/r") == Path("/r/experiments/tutorial_results.quick.json")
    monkeypatch.setenv(tutorial.QUICK_ENV, "1")
    assert tutorial.results_path(root="/r").name == "tutorial_results.quick.json"


def test_predict_base_and_tuned_runs_both_and_restores_the_config(tmp_path):
    from omegaconf import OmegaConf

    from lora_tutorial.metrics import score_predictions
    from lora_tutorial.peft import disable_adapters
    from lora_tutorial.sft_model import SFTModel
    from lora_tutorial.tokenizer import tokenizer_from_hf_dir
    from lora_tutorial.training import build_trainer

    write_tiny_tokenizer(tmp_path / "tok")
    tok = tokenizer_from_hf_dir(tmp_path / "tok")
    tok.chat_format = "chatml"  # the tiny tokenizer has no chat template of its own
    records = [{"input": f"User: Context: The cat sat on the mat {i}. Question: Where?\n\nAssistant:",
                "output": "on the mat", "answers": ["on the mat", "the mat"]} for i in range(3)]
    path = _write_jsonl(tmp_path / "test.jsonl", records)
    cfg = default_config()
    OmegaConf.update(cfg, "model.data.test_ds.file_names", [str(path)])
    OmegaConf.update(cfg, "model.data.test_ds.micro_batch_size", 2)
    OmegaConf.update(cfg, "inference.tokens_to_generate", 4)
    gpt = tiny_model(tiny_llama_config(vocab_size=tok.vocab_size, max_seq_len=512))
    add_adapter(gpt, LoraPEFTConfig({"peft": {"lora_tuning": {"adapter_dim": RANK}}}), verbose=False)
    with torch.no_grad():
        for _, layer in ins.lora_layers(gpt):
            layer.lora_B.normal_(0, 0.5)
    model = SFTModel(cfg, gpt, tok)
    trainer = build_trainer(cfg, accelerator="cpu", enable_progress_bar=False)
    loader = model.build_dataloader(cfg.model.data.test_ds)
    before = dict(model.inference_cfg)

    out = tutorial.predict_base_and_tuned(model, trainer, loader)

    assert model.inference_cfg == before
    assert out["prompts"] == [model.build_dataset(cfg.model.data.test_ds)[i]["prompt"] for i in range(3)]
    assert out["golds"] == [r["answers"] for r in records]
    tuned, base = [], []
    for batch in loader:
        tuned += model.generate_answers(batch)
        with disable_adapters(gpt):
            base += model.generate_answers(batch, use_chat_template=True)
    assert out["answers"] == {"base (chat template)": base, "base + adapter": tuned}
    assert tuned != base  # the adapter is really on for one and off for the other
    for name, answers in out["answers"].items():
        assert out["scores"][name] == score_predictions(answers, out["golds"])
        assert out["seconds"][name] >= 0


@pytest.mark.usefixtures("keep_log_levels")
def test_trained_adapter_says_to_run_notebook_03_first():
    import dataclasses

    p = tutorial.notebook_params(quick=True, chdir=False, verbose=False)
    missing = dataclasses.replace(p, lora_log_dir="experiments/no_such_run_for_this_test")
    with pytest.raises(FileNotFoundError, match="run notebooks/03_training.ipynb first"):
        missing.trained_adapter()
