"""Batched generation on tiny models: the KV cache, left padding (a prompt answers the same in a batch as alone,
with and without a repetition penalty), HF parity of the logits processors and of greedy decoding, and seeded
sampling that never touches torch's global random state."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from lora_tutorial import load_base_model
from lora_tutorial.generation import (_apply_repetition_penalty, _filter_top_k_top_p, _seen_tokens, generate,
                                      generate_ids, next_tokens, stop_token_ids)
from lora_tutorial.peft import LoraPEFTConfig, add_adapter

from helpers import (logits, random_ids, randomize_adapters, save_hf_llama, tiny_gpt2_config, tiny_llama_config,
                     tiny_model, tiny_tokenizer)

FAMILIES = [tiny_llama_config, tiny_gpt2_config]


def text_model(seed: int = 0):
    """A tiny random Llama over the tiny tokenizer's vocabulary (so ``generate`` can encode and decode)."""
    tok = tiny_tokenizer()
    return tiny_model(tiny_llama_config(vocab_size=tok.vocab_size, max_seq_len=128), seed=seed), tok


# ----------------------------------------------------------------------------------------------
# Cache and padding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_config", FAMILIES)
def test_kv_cache_decoding_equals_full_recompute(make_config):
    model = tiny_model(make_config())
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    with_cache = generate_ids(model, prompts, tokens_to_generate=12, use_cache=True)
    without = generate_ids(model, prompts, tokens_to_generate=12, use_cache=False)
    assert with_cache == without
    assert all(len(row) == 12 for row in with_cache)


def short_prompt_whose_answer_a_penalty_flips(model, penalty: float) -> tuple[list[int], int]:
    """A 3-token prompt and its greedy next token t (not in the prompt) such that penalising t would change the
    answer. Used as the pad id, t is then the token a pad wrongly counted as "seen" would penalise."""
    for seed in range(500):
        prompt = random_ids(1, 3, model.config.vocab_size, seed=1000 + seed)[0].tolist()
        last = logits(model, torch.tensor([prompt]))[0, -1]
        (v1, v2), (t, _) = last.topk(2)
        if t.item() in prompt or v1 <= 0:
            continue
        if v1 / penalty < v2 - 1e-3:
            return prompt, t.item()
    raise AssertionError("no suitable prompt found")


@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("make_config", FAMILIES)
def test_left_padded_batch_gives_each_prompt_alone(make_config, penalty):
    model = tiny_model(make_config(), seed=1)
    short, pad_id = short_prompt_whose_answer_a_penalty_flips(model, 1.3)
    prompts = [[5, 6, 7, 8, 9, 10, 11], short, [14, 15, 16, 17]]
    batched = generate_ids(model, prompts, tokens_to_generate=8, repetition_penalty=penalty, pad_id=pad_id)
    alone = [generate_ids(model, [p], tokens_to_generate=8, repetition_penalty=penalty, pad_id=pad_id)[0]
             for p in prompts]
    assert batched == alone
    assert alone[1][0] == pad_id  # premise: the padded row's answer starts with the pad token


def test_seen_tokens_ignore_left_pads():
    ids = torch.tensor([[0, 0, 5, 6], [7, 0, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    seen = _seen_tokens(ids, mask, vocab_size=10)
    assert seen[0].nonzero().flatten().tolist() == [5, 6]  # the pads (id 0) are not "seen"
    assert seen[1].nonzero().flatten().tolist() == [0, 7, 8, 9]  # a real 0 is


def test_generation_stops_at_stop_id():
    model = tiny_model(seed=2)
    free = generate_ids(model, [[1, 2, 3]], tokens_to_generate=10)[0]
    stop = free[3]
    cut = generate_ids(model, [[1, 2, 3]], tokens_to_generate=10, stop_ids=[stop])[0]
    assert cut == free[:free.index(stop)]


def test_generate_keeps_input_order_across_length_sorted_batches():
    model, tok = text_model()
    prompts = ["The cat sat on the mat. Where", "Paris", "The mat is red and the cat", "France has", "The"]
    together = generate(model, tok, prompts, tokens_to_generate=6, batch_size=2)
    assert together == [generate(model, tok, p, tokens_to_generate=6) for p in prompts]
    assert isinstance(generate(model, tok, "Paris", tokens_to_generate=2), str)


def test_stop_token_ids_are_eos_and_endoftext():
    tok = tiny_tokenizer()
    assert stop_token_ids(tok) == sorted({tok.eos_id, tok.token_to_id("<|endoftext|>")})


def test_generation_switches_dropout_off_and_restores_training_mode():
    model = tiny_model()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4, adapter_dropout=0.5), verbose=False)
    randomize_adapters(model, std=0.5)
    model.train()
    prompts = [[5, 6, 7], [8, 9]]
    first = generate_ids(model, prompts, tokens_to_generate=8)
    assert model.training
    model.eval()
    assert generate_ids(model, prompts, tokens_to_generate=8) == first


# ----------------------------------------------------------------------------------------------
# Parity with HF transformers
# ----------------------------------------------------------------------------------------------


def test_repetition_penalty_equals_hf_processor():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 7), generator=g)
    ours = _apply_repetition_penalty(scores, _seen_tokens(ids, None, 50), 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.7), (10, 0.5), (0, 0.999)])
def test_top_k_top_p_filter_equals_hf_warpers(top_k, top_p):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 60, generator=g) * 2
    ours = _filter_top_k_top_p(scores, top_k, top_p)
    theirs = scores.clone()
    if top_k:
        theirs = TopKLogitsWarper(top_k=top_k)(None, theirs)
    if top_p < 1.0:
        theirs = TopPLogitsWarper(top_p=top_p)(None, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], scores[~torch.isinf(ours)])  # kept logits are unchanged
    assert (~torch.isinf(ours)).sum(-1).min() >= 1


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_equals_hf_generate(tmp_path, penalty):
    hf = save_hf_llama(tmp_path)
    ours, tok = load_base_model(tmp_path)
    prompt = random_ids(1, 6, hf.config.vocab_size, seed=11)
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=15, do_sample=False,
                          repetition_penalty=penalty, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    theirs = out[0, prompt.shape[1]:].tolist()
    theirs = theirs[:theirs.index(tok.eos_id)] if tok.eos_id in theirs else theirs
    mine = generate_ids(ours, prompt.tolist(), tokens_to_generate=15, repetition_penalty=penalty,
                        stop_ids=[tok.eos_id], pad_id=tok.pad_id)[0]
    assert mine == theirs and len(mine) >= 3


def test_a_penalty_changes_what_is_generated():
    """So that the parity tests above cannot pass with the penalty silently ignored."""
    model = tiny_model(seed=3)
    prompt = [[5, 6, 7, 5, 6, 7]]
    assert (generate_ids(model, prompt, tokens_to_generate=20)
            != generate_ids(model, prompt, tokens_to_generate=20, repetition_penalty=3.0))


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone():
    model, tok = text_model()
    prompts = ["The cat sat", "Paris is the capital of"]
    state = torch.random.get_rng_state()
    first = generate(model, tok, prompts, tokens_to_generate=12, greedy=False, temperature=1.5, seed=7)
    again = generate(model, tok, prompts, tokens_to_generate=12, greedy=False, temperature=1.5, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first == again
    assert generate(model, tok, prompts, tokens_to_generate=12, greedy=False, temperature=1.5, seed=8) != first


def test_generate_ids_samples_from_the_given_generator_only():
    model = tiny_model()
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    state = torch.random.get_rng_state()
    runs = [generate_ids(model, prompts, tokens_to_generate=10, greedy=False, temperature=2.0,
                         generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("knobs", [dict(top_k=1), dict(top_p=1e-6)])
def test_sampling_restricted_to_one_token_is_greedy(knobs):
    model = tiny_model(seed=4)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    greedy = generate_ids(model, prompts, tokens_to_generate=10)
    sampled = generate_ids(model, prompts, tokens_to_generate=10, greedy=False, temperature=3.0,
                           generator=torch.Generator().manual_seed(0), **knobs)
    assert sampled == greedy


def test_end_ids_end_a_row_but_stay_in_its_output():
    model = tiny_model()
    prompts = [[5, 6, 7], [8, 9]]
    free = generate_ids(model, prompts, tokens_to_generate=8)
    end = free[0][2]  # what the first row says third: make it an "end" token
    ended = generate_ids(model, prompts, tokens_to_generate=8, end_ids=[end])
    assert ended[0] == free[0][:free[0].index(end) + 1]  # kept, and nothing after it
    cut = free[1].index(end) + 1 if end in free[1] else len(free[1])
    assert ended[1] == free[1][:cut]


def test_lora_merged_for_inference_gives_the_unmerged_logits_and_restores_the_weights_exactly():
    from lora_tutorial.peft.lora import lora_modules, merged_for_inference

    model = tiny_model()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4, alpha=8.0), verbose=False)
    randomize_adapters(model, seed=3)
    ids = random_ids(2, 9)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    unmerged = logits(model, ids)
    with merged_for_inference(model) as n:
        assert n == len(lora_modules(model)) and all(m.merged for m in lora_modules(model))
        torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    assert not any(m.merged for m in lora_modules(model))
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


def test_an_end_token_before_any_text_does_not_end_the_row():
    model = tiny_model()
    free = generate_ids(model, [[5, 6, 7]], tokens_to_generate=8)[0]
    first = free[0]
    # the first token is an "end" token but also "blank" (no text yet): the row goes on
    kept = generate_ids(model, [[5, 6, 7]], tokens_to_generate=8, end_ids=[first], blank_ids=[first])[0]
    later = free.index(first, 1) + 1 if first in free[1:] else len(free)
    assert kept == free[:later]


def test_an_end_token_that_holds_text_ends_the_row_at_once():
    model = tiny_model()
    free = generate_ids(model, [[5, 6, 7]], tokens_to_generate=8)[0]
    first = free[0]  # like "Paris\n": an end token (it holds a newline) that is not blank
    kept = generate_ids(model, [[5, 6, 7]], tokens_to_generate=8, end_ids=[first], blank_ids=[free[1]])[0]
    assert kept == free[:1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_choice_is_argmax_with_its_tie_and_nan_rules(dtype):
    logits = torch.randn(4, 49152).to(dtype)
    logits[1, [17, 4000]] = 50.0  # a tie: the first index wins
    logits[2, 123] = float("nan")  # NaN counts as the maximum, as in argmax
    logits[3] = 0.0  # all equal
    chosen = next_tokens(logits, greedy=True, temperature=1.0, top_k=0, top_p=1.0)
    assert torch.equal(chosen, logits.argmax(-1))
    assert chosen[1:].tolist() == [17, 123, 0]
