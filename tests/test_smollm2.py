"""The real base model: parity with HF transformers reading the same GGUF, tokenizer parity, generation."""

from __future__ import annotations

import pytest
import torch

from lora_tutorial.pretrained import resolve_model_path
from lora_tutorial.generation import generate

PROMPT = ("User: Context: The Eiffel Tower was completed in 1889 for the World's Fair in Paris. "
          "Question: When was the Eiffel Tower completed?\n\nAssistant:")
UNICODE = ["Grüße aus Köln — 12,345.67 €!", "日本語のテキスト and emoji 🚀🔥", "tabs\tand\nnewlines  double  spaces",
           "<|im_start|>user\nhi<|im_end|>"]


def test_default_model_shape(smollm2):
    model, tokenizer = smollm2
    c = model.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.rope_base == 100000.0 and c.tie_embeddings
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert model.num_parameters() == 134_515_008


def test_logits_match_hf_llama_on_a_real_prompt(smollm2, hf_smollm2):
    model, tokenizer = smollm2
    hf, _ = hf_smollm2
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-3


@pytest.mark.parametrize("text", [PROMPT, *UNICODE])
def test_tokenizer_ids_equal_hf_fast_tokenizer(smollm2, hf_smollm2, text):
    _, tokenizer = smollm2
    _, hf_tokenizer = hf_smollm2
    assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_chat_template_equals_hf(smollm2, hf_smollm2):
    _, tokenizer = smollm2
    _, hf_tokenizer = hf_smollm2
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert tokenizer.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tokenizer.apply_chat_template(with_system) == hf_tokenizer.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=True)


def test_answers_paris(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in generate(model, tokenizer, prompt, tokens_to_generate=20)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_a_prompt_answers_the_same_in_a_batch_as_alone(smollm2, penalty):
    """Left-padded batches (cached) give each prompt's own greedy answer, also with a repetition penalty: the
    pads of the shorter prompts are not "seen" tokens."""
    model, tokenizer = smollm2
    prompts = [PROMPT, tokenizer.apply_chat_template([{"role": "user", "content": "Name a primary color."}]),
               tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])]
    batched = generate(model, tokenizer, prompts, tokens_to_generate=12, repetition_penalty=penalty)
    alone = [generate(model, tokenizer, p, tokens_to_generate=12, repetition_penalty=penalty, use_cache=False)
             for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_hf_generate(smollm2, hf_smollm2, penalty):
    model, tokenizer = smollm2
    hf, _ = hf_smollm2
    ids = tokenizer.encode(PROMPT)
    ours = generate(model, tokenizer, PROMPT, tokens_to_generate=10, repetition_penalty=penalty)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=10, do_sample=False, repetition_penalty=penalty, eos_token_id=2,
                          pad_token_id=2)
    assert ours == tokenizer.decode(out[0, len(ids):].tolist())


def test_the_model_name_resolves_to_the_wheels_gguf():
    path = resolve_model_path("smollm2-135m-instruct")
    assert path.suffix == ".gguf" and path.is_file()
