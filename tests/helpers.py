"""Small builders shared by tests: tiny random models and a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_tutorial.model import GPT, GPTConfig, init_weights


def tiny_llama_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=101, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, max_seq_len=64,
                rope_base=10000.0)
    base.update(overrides)
    return GPTConfig(**base)


def tiny_gpt2_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=101, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=64)
    base.update(overrides)
    return GPTConfig.gpt2_style(**base)


def tiny_model(config: GPTConfig, seed: int = 0) -> GPT:
    return init_weights(GPT(config), std=0.2, seed=seed).eval()


def write_tiny_tokenizer(directory: Path) -> None:
    """A real byte-level BPE tokenizer.json trained on a few sentences, plus its special-token map."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The cat sat on the mat.", "Paris is the capital of France."] * 10, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def assert_agrees_with_fp32_and_answers(fp32_model, model, tokenizer, min_agreement: float) -> None:
    """A lower-precision copy of the real model predicts the same next token as float32 at nearly every
    position of a real sentence, and still answers a simple question.

    (bf16 rounding alone ties "The" and "L" as first tokens of "What is the capital of France?", a
    0.08-nat decision in float32, so the question is one whose answer is not on a knife's edge.)
    """
    from lora_tutorial.generation import generate_ids

    ids = torch.tensor([tokenizer.encode("The Eiffel Tower is in Paris, the capital of France. It was built in "
                                         "1889 for the World's Fair and is 330 metres tall.")])
    with torch.no_grad():
        agreement = (fp32_model(ids).argmax(-1) == model(ids).argmax(-1)).float().mean().item()
    assert agreement >= min_agreement, agreement
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Which city is the capital of France?"}])
    answer = tokenizer.decode(generate_ids(model, [tokenizer.encode(chat)], tokens_to_generate=12,
                                           stop_ids=[tokenizer.eos_id])[0])
    assert "Paris" in answer, answer
