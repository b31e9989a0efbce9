"""The GPT model on tiny random configs: parity with HF transformers, KV cache, padding, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from lora_tutorial import load_base_model
from lora_tutorial.generation import generate_ids
from lora_tutorial.model import GPT, GPTConfig

from helpers import random_ids, tiny_gpt2_config, tiny_llama_config, tiny_model, write_tiny_tokenizer

transformers.logging.set_verbosity_error()


def _save_hf_llama(tmp_path, seed=0):
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # non-trivial norm gains so a swapped/ignored norm weight shows up
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    return hf


def _save_hf_gpt2(tmp_path, seed=0):
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or "bias" in name:
                p.uniform_(-0.5, 1.5)
    hf.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    return hf


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_match_hf_transformers(tmp_path, family):
    hf = _save_hf_llama(tmp_path) if family == "llama" else _save_hf_gpt2(tmp_path)
    ours, tokenizer = load_base_model(tmp_path)
    assert ours.config.position == ("rope" if family == "llama" else "learned")
    ids = random_ids(2, 20, 300)
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-3
    assert tokenizer.decode(tokenizer.encode("The cat sat.")) == "The cat sat."
    assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_matches_hf_with_attention_mask(tmp_path, family):
    hf = _save_hf_llama(tmp_path) if family == "llama" else _save_hf_gpt2(tmp_path)
    ours, _ = load_base_model(tmp_path)
    ids = random_ids(2, 12, 300, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # row 0 is left-padded by 5
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        mine = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max().item() < 1e-3


@pytest.mark.parametrize("make_config", [tiny_llama_config, tiny_gpt2_config])
def test_kv_cache_decoding_equals_full_recompute(make_config):
    model = tiny_model(make_config())
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    with_cache = generate_ids(model, prompts, tokens_to_generate=12, use_cache=True)
    without = generate_ids(model, prompts, tokens_to_generate=12, use_cache=False)
    assert with_cache == without
    assert all(len(row) == 12 for row in with_cache)


@pytest.mark.parametrize("make_config", [tiny_llama_config, tiny_gpt2_config])
def test_left_padded_batch_gives_each_prompt_alone(make_config):
    model = tiny_model(make_config(), seed=1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    batched = generate_ids(model, prompts, tokens_to_generate=8)
    alone = [generate_ids(model, [p], tokens_to_generate=8)[0] for p in prompts]
    assert batched == alone


def test_generation_stops_at_stop_id():
    model = tiny_model(tiny_llama_config(), seed=2)
    free = generate_ids(model, [[1, 2, 3]], tokens_to_generate=10)[0]
    stop = free[3]
    cut = generate_ids(model, [[1, 2, 3]], tokens_to_generate=10, stop_ids=[stop])[0]
    assert cut == free[:free.index(stop)]


def test_loss_equals_cross_entropy_of_full_logits():
    model = tiny_model(tiny_llama_config())
    ids = random_ids(2, 10, 101, seed=4)
    labels = ids.clone()
    labels[:, :6] = -100  # answer-only: the first 6 tokens are the prompt
    logits = model(ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(model.loss(ids, labels), expected, atol=1e-5)
    with pytest.raises(ValueError, match="every label is -100"):
        model.loss(ids, torch.full_like(ids, -100))


def test_fused_projection_names_exist_for_peft():
    for config in (tiny_llama_config(), tiny_gpt2_config()):
        block = GPT(config).blocks[0]
        assert block.attention.attention_qkv.out_features == (config.n_head + 2 * config.n_kv_head) * config.head_dim
        assert block.mlp.mlp_fc1.out_features == (2 if config.mlp == "swiglu" else 1) * config.d_ff
        assert isinstance(block.attention.attention_dense, torch.nn.Linear)
        assert isinstance(block.mlp.mlp_fc2, torch.nn.Linear)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=9, n_kv_head=2)
