"""analysis.py on tiny models and hand-made files: ΔW measured from what the layers do, singular values against
numpy, ranks of hand-built updates, the merge check, the parameter budget counted by hand, token lengths against
the tokenizer, and the training log read by optimizer step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_tutorial import analysis
from lora_tutorial.peft import (LoraPEFTConfig, PtuningPEFTConfig, add_adapter, disable_adapters, merge_lora,
                                unmerge_lora)
from lora_tutorial.peft.checkpoint import adapter_state_dict
from lora_tutorial.sft_data import SFTDataset
from lora_tutorial.squad import format_prompt

from helpers import (METRICS_CSV, TINY_LLAMA_PARAMS, TINY_LORA_R4, lora_model, random_ids, tiny_llama_config,
                     tiny_model, tiny_tokenizer, write_records)

RANK, ALPHA = 4, 8


def measured_delta(layer) -> torch.Tensor:
    """ΔW as the layer's behaviour shows it: what it adds to the frozen layer's output for each basis vector."""
    eye = torch.eye(layer.base.in_features)
    with torch.no_grad():
        return (layer(eye) - layer.base(eye)).T.double()


# ----------------------------------------------------------------------------------------------
# ΔW norms, singular values, ranks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_norms_equal_the_change_the_layers_make(rslora):
    model = lora_model(rank=RANK, alpha=ALPHA, rslora=rslora)
    rows = analysis.delta_weight_norms(model)
    layers = dict(analysis.named_lora_layers(model))
    assert [r["name"] for r in rows] == list(layers) == [
        "blocks.0.attention.attention_qkv", "blocks.0.mlp.mlp_fc1", "blocks.1.attention.attention_qkv",
        "blocks.1.mlp.mlp_fc1"]
    for r in rows:
        layer = layers[r["name"]]
        delta = measured_delta(layer)
        assert r["delta_norm"] == pytest.approx(delta.norm().item(), rel=1e-4)
        w = layer.base.weight.detach().double().norm().item()
        assert r["weight_norm"] == pytest.approx(w, rel=1e-6)
        assert r["relative"] == pytest.approx(delta.norm().item() / w, rel=1e-4)
        assert (r["layer"], r["target"]) == (int(r["name"].split(".")[1]), r["name"].split(".")[-1])


def test_delta_norms_are_the_same_while_merged():
    model = lora_model()
    before = analysis.delta_weight_norms(model)
    merge_lora(model)
    try:
        during = analysis.delta_weight_norms(model)
    finally:
        unmerge_lora(model)
    for a, b in zip(before, during):
        assert b["delta_norm"] == pytest.approx(a["delta_norm"], rel=1e-6)
        assert b["weight_norm"] == pytest.approx(a["weight_norm"], rel=1e-4)


def test_fresh_lora_has_zero_delta_and_rank_zero():
    model = tiny_model()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=RANK), verbose=False)
    assert all(r["delta_norm"] == 0 for r in analysis.delta_weight_norms(model))
    layer = analysis.named_lora_layers(model)[0][1]
    assert analysis.rank_for_energy(analysis.singular_values(layer.delta_weight())) == 0


def test_singular_values_equal_numpys_and_hold_the_frobenius_norm():
    model = lora_model()
    delta = measured_delta(analysis.named_lora_layers(model)[0][1])
    sv = analysis.singular_values(delta)
    np.testing.assert_allclose(sv.numpy(), np.linalg.svd(delta.numpy(), compute_uv=False), rtol=1e-10, atol=1e-12)
    assert torch.all(sv[:-1] >= sv[1:])  # largest first
    assert (sv > 1e-5 * sv[0]).sum().item() == RANK  # B A has rank r (the rest is rounding)
    assert (sv ** 2).sum().item() == pytest.approx(delta.norm().item() ** 2, rel=1e-9)


def test_rank_for_energy_on_known_values():
    values = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: cumulative 9/14, 13/14, 1
    assert analysis.rank_for_energy(values, 0.5) == 1
    assert analysis.rank_for_energy(values, 9 / 14) == 1
    assert analysis.rank_for_energy(values, 0.9) == 2
    assert analysis.rank_for_energy(values, 1.0) == 3
    with pytest.raises(ValueError, match="energy"):
        analysis.rank_for_energy(values, 0)


def test_rank_usage_of_updates_with_hand_built_ranks():
    """Layer 0's qkv update gets rank 1 and layer 1's rank 3 (B with 1 and 3 non-zero columns); mlp_fc1 rank 2."""
    model = lora_model(rank=RANK)
    layers = dict(analysis.named_lora_layers(model))
    with torch.no_grad():
        for name, used in (("blocks.0.attention.attention_qkv", 1), ("blocks.1.attention.attention_qkv", 3),
                           ("blocks.0.mlp.mlp_fc1", 2), ("blocks.1.mlp.mlp_fc1", 2)):
            layers[name].lora_B[:, used:] = 0
    rows = analysis.rank_usage(model, energy=1.0)
    assert rows == [("attention_qkv", 2, RANK, 1, 3, 3), ("mlp_fc1", 2, RANK, 2, 2, 2)]


# ----------------------------------------------------------------------------------------------
# Merge check, parameter budget, adapter tensors
# ----------------------------------------------------------------------------------------------


def test_merged_outputs_agree_and_model_is_left_unmerged():
    model = lora_model()
    weights = {n: m.base.weight.detach().clone() for n, m in analysis.named_lora_layers(model)}
    ids = random_ids(2, 10)
    check = analysis.merged_outputs_agree(model, ids)
    assert check["agree"] and check["layers"] == 4
    assert check["tolerance"] == pytest.approx(1e-4 + 1e-5 * check["max_logit"])
    assert check["merged_vs_unmerged"] < 1e-4 and check["after_unmerge"] < 1e-4
    assert all(not m.merged for _, m in analysis.named_lora_layers(model))
    for name, m in analysis.named_lora_layers(model):
        torch.testing.assert_close(m.base.weight, weights[name], atol=1e-6, rtol=0)
    # And the adapter really changes the logits (so "agree" is not trivially true).
    with torch.no_grad():
        tuned = model(ids)
        with disable_adapters(model):
            base = model(ids)
    assert (tuned - base).abs().max() > 1e-3


def test_merged_outputs_agree_needs_lora():
    with pytest.raises(ValueError, match="no LoRA"):
        analysis.merged_outputs_agree(tiny_model(), torch.zeros(1, 3, dtype=torch.long))


def test_parameter_budget_by_hand():
    model = tiny_model()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4, target_modules=["all"]), verbose=False)
    lora = 2 * sum(TINY_LORA_R4.values())
    assert (TINY_LLAMA_PARAMS, lora) == (18_752, 2_944)
    # full fine-tune: 16 bytes (value, gradient, two AdamW moments) per parameter;
    # LoRA: 4 bytes per frozen base parameter + 16 per adapter parameter
    assert analysis.parameter_budget(model) == [
        ("full fine-tune", 18_752, 100.0, pytest.approx(300_032 / 2**30)),
        ("lora", 2_944, pytest.approx(100 * 2_944 / 18_752), pytest.approx((75_008 + 47_104) / 2**30))]


def test_parameter_budget_names_combined_methods_and_counts_only_what_trains():
    model = tiny_model()
    add_adapter(model, [LoraPEFTConfig(None, adapter_dim=4, target_modules=["all"]),
                        PtuningPEFTConfig(None, virtual_tokens=3, bottleneck_dim=16, embedding_dim=8)], verbose=False)
    name, trainable, percent, _ = analysis.parameter_budget(model)[1]
    assert name == "lora+ptuning" and trainable == 2_944 + 712  # p-tuning: 3x8 + 8x16+16 + 16x32+32
    assert analysis.parameter_budget(model)[0][1] == TINY_LLAMA_PARAMS  # the adapters are not "base"


def test_grouped_adapter_rows_in_layer_order():
    model = tiny_model(tiny_llama_config(n_layer=12))
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=RANK, target_modules=["attention_qkv"]), verbose=False)
    grouped = analysis.grouped_adapter_rows(adapter_state_dict(model))
    # A: (4, 32) = 128 numbers per layer, B: (64, 4) = 256, over 12 layers
    assert grouped == [("blocks.*.attention.attention_qkv.lora_A", 12, (4, 32), 128, 1_536),
                       ("blocks.*.attention.attention_qkv.lora_B", 12, (64, 4), 256, 3_072)]
    assert sum(g[4] for g in grouped) == model.num_parameters(trainable_only=True)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


RECORDS = [{"input": format_prompt("The cat sat on the mat.", "Where did the cat sit?"), "output": "on the mat",
            "answers": ["on the mat", "mat"], "title": "Cats"},
           {"input": format_prompt("The cat sat on the mat.", "Who sat?"), "output": "The cat", "title": "Cats"},
           {"input": format_prompt("Paris is the capital of France.", "What is the capital?"), "output": "Paris",
            "title": "France"}]


def test_token_lengths_equal_the_tokenizers_counts(tmp_path):
    tok = tiny_tokenizer()
    dataset = SFTDataset(write_records(tmp_path / "x.jsonl", RECORDS), tok)
    lengths = analysis.token_lengths(dataset)
    for i, r in enumerate(RECORDS):
        assert lengths["prompt"][i] == len(tok.encode(r["input"]))
        assert lengths["answer"][i] == len(tok.encode(" " + r["output"])) + 1  # + EOS
        assert lengths["total"][i] == len(tok.encode(r["input"] + " " + r["output"])) + 1


def test_length_summary_by_hand():
    assert analysis.length_summary({"answer": [3, 1, 2, 10]}) == [("answer", 1, 3, 4.0, 10)]


def test_subset_summary_counts_articles_and_paragraphs():
    # 3 questions, 2 articles, 2 paragraphs, answers of 3, 2 and 1 words
    assert analysis.subset_summary(RECORDS) == {"questions": 3, "articles": 2, "paragraphs": 2,
                                                "mean answer words": 2.0}


def test_read_records_keeps_order_and_limit(tmp_path):
    path = write_records(tmp_path / "x.jsonl", RECORDS)
    assert analysis.read_records(path) == RECORDS and analysis.read_records(path, limit=2) == RECORDS[:2]


# ----------------------------------------------------------------------------------------------
# Training logs
# ----------------------------------------------------------------------------------------------



def test_read_metrics_maps_rows_by_trained_steps(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS_CSV)
    assert analysis.read_metrics(tmp_path) == {
        "lr": [(1, 0.001), (2, 0.0005)], "train_loss": [(1, 2.5), (2, 2.0)],
        "val_em": [(0, 5.0), (2, 20.0)], "val_f1": [(0, 10.0), (2, 30.0)], "val_loss": [(0, 3.0), (2, 2.2)]}
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        analysis.read_metrics(tmp_path / "missing")
