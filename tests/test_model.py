"""The GPT model on tiny random configs: parity with HF transformers (logits, padding, the fused QKV split),
the loss, the parameter count, and the PEFT record a fresh model starts with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_tutorial import load_base_model
from lora_tutorial.model import GPT, GPTConfig

from helpers import TINY_LLAMA_PARAMS, logits, random_ids, save_hf_gpt2, save_hf_llama, tiny_llama_config, tiny_model


def _save(family, path):
    return save_hf_llama(path) if family == "llama" else save_hf_gpt2(path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_match_hf_transformers(tmp_path, family):
    hf = _save(family, tmp_path)
    ours, tokenizer = load_base_model(tmp_path)
    assert ours.config.position == ("rope" if family == "llama" else "learned")
    ids = random_ids(2, 20, hf.config.vocab_size)
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-3
    assert tokenizer.decode(tokenizer.encode("The cat sat.")) == "The cat sat."
    assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_matches_hf_with_attention_mask(tmp_path, family):
    hf = _save(family, tmp_path)
    ours, _ = load_base_model(tmp_path)
    ids = random_ids(2, 12, hf.config.vocab_size, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # row 0 is left-padded by 5
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        mine = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max().item() < 1e-3


def test_qkv_sizes_split_the_fused_projection_into_hf_q_k_v(tmp_path):
    hf = save_hf_llama(tmp_path)
    ours, _ = load_base_model(tmp_path)
    x = torch.randn(3, 5, ours.config.d_model, generator=torch.Generator().manual_seed(0))
    attn = hf.model.layers[1].self_attn
    with torch.no_grad():
        q, k, v = ours.blocks[1].attention.attention_qkv(x).split(ours.config.qkv_sizes, dim=-1)
        torch.testing.assert_close(q, attn.q_proj(x))
        torch.testing.assert_close(k, attn.k_proj(x))
        torch.testing.assert_close(v, attn.v_proj(x))


def test_last_only_and_hidden_states_agree_with_the_full_forward():
    model = tiny_model()
    ids = random_ids(2, 9)
    full = logits(model, ids)
    torch.testing.assert_close(logits(model, ids, last_only=True), full[:, -1:])
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model.hidden_states(ids)), full)


def test_loss_equals_cross_entropy_of_full_logits():
    model = tiny_model()
    ids = random_ids(2, 10, seed=4)
    labels = ids.clone()
    labels[:, :6] = -100  # answer-only: the first 6 tokens are the prompt
    out = model(ids)
    expected = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model.loss(ids, labels), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="every label is -100"):
        model.loss(ids, torch.full_like(ids, -100))


def test_num_parameters_counts_tied_weights_once_by_hand():
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight
    assert model.num_parameters() == TINY_LLAMA_PARAMS
    untied = tiny_model(tiny_llama_config(tie_embeddings=False))
    assert untied.num_parameters() == TINY_LLAMA_PARAMS + 101 * 32  # plus a head of its own
    model.blocks[0].norm_1.weight.requires_grad_(False)
    assert model.num_parameters(trainable_only=True) == TINY_LLAMA_PARAMS - 32


def test_a_fresh_model_has_an_empty_peft_record_of_its_own():
    a, b = GPT(tiny_llama_config()), GPT(tiny_llama_config(), name_or_path="somewhere")
    assert a.peft_configs == [] and a.virtual_prompt is None and a.n_virtual_tokens == 0
    a.peft_configs.append("x")
    assert b.peft_configs == []  # not a shared class-level list
    assert (a.name_or_path, b.name_or_path) == ("", "somewhere")


def test_a_full_kv_cache_is_an_error():
    model = tiny_model()
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(random_ids(1, 4), cache=cache)
        with pytest.raises(ValueError, match="KVCache is full"):
            model(random_ids(1, 1), cache=cache)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=9, n_kv_head=2)
    with pytest.raises(ValueError, match="d_model"):
        GPTConfig(d_model=100, n_head=9, n_kv_head=3)



def test_activations_checkpointing_gives_the_same_loss_and_gradients():
    from lora_tutorial.peft import LoraPEFTConfig, add_adapter

    model = tiny_model()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4, alpha=8.0, row_init_method="normal"), verbose=False)
    model.train()
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[:, :5] = -100

    def loss_and_grads(checkpointing: bool):
        model.zero_grad()
        model.activations_checkpointing = checkpointing
        loss = model.loss(ids, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = loss_and_grads(False)
    ckpt_loss, ckpt = loss_and_grads(True)
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys() and all(torch.allclose(plain[n], ckpt[n], atol=1e-6) for n in plain)
