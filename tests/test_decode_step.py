"""Decoding steps of an int8 model through decode_block.c agree with the model's own PyTorch blocks, and the
fused path is taken only where the C code computes exactly those blocks.

The C code runs where the int8 kernel is built and the KV cache is bf16 (CPUs with AVX-512 and AMX: the
project's machine and its CI); elsewhere the agreement tests are skipped and the "not fused" tests run."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from lora_tutorial import generation
from lora_tutorial.decode_step import FUSED, GLUED, BlockRunner, block_runner, decoding_path, unfused_reason
from lora_tutorial.generation import generate_ids
from lora_tutorial.glued_blocks import GluedBlocks
from lora_tutorial.int8_kernel import MAX_ROWS, library
from lora_tutorial.model import GPT
from lora_tutorial.peft import LoraPEFTConfig, PtuningPEFTConfig, add_adapter
from lora_tutorial.precision import cast_frozen_weights, cpu_has_amx
from lora_tutorial.quantize import quantize_int8

from helpers import (RunnerSpy, generation_cache, left_padded, needs_c_blocks, record_runners, tiny_llama_config,
                     tiny_model)


def int8_model(**overrides) -> GPT:
    """A tiny Llama-style model whose sizes decode_block.c takes (head_dim 32, grouped-query heads), in int8."""
    config = tiny_llama_config(**{"d_model": 128, "n_head": 4, "n_kv_head": 2, "d_ff": 96, "n_layer": 3, **overrides})
    model = tiny_model(config).requires_grad_(False)
    quantize_int8(model)
    return model




# SmolLM2's head shape (3 query heads per key/value head, head_dim 64) has code of its own in decode_block.c;
# groups of more than 4 query heads are attended in parts; one query head per key/value head is plain MHA.
SHAPES = {"generic": {}, "smollm2-heads": {"d_model": 384, "n_head": 6, "n_kv_head": 2},
          "group-of-8": {"d_model": 256, "n_head": 8, "n_kv_head": 1}, "no-groups": {"n_kv_head": 4}}


@needs_c_blocks
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prompts", [
    [[5, 6, 7, 8, 9, 10, 11]],                       # one row: no mask at all
    [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]],  # left padding: a mask, positions per row
])
def test_fused_steps_agree_with_the_pytorch_blocks(prompts, shape):
    model = int8_model(**SHAPES[shape])
    ids, mask = left_padded(prompts)
    fused_cache, plain_cache = generation_cache(model, len(prompts), 20), generation_cache(model, len(prompts), 20)
    spy = RunnerSpy(BlockRunner(model, fused_cache))  # no fallback: the prompt runs the PyTorch blocks
    fused_cache.run_blocks = spy
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=fused_cache)
        model(ids, attention_mask=mask, cache=plain_cache)
        tokens = torch.tensor([[21], [22], [23]][:len(prompts)])
        for step in range(6):
            if mask is not None:
                mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
            fused = model.hidden_states(tokens, attention_mask=mask, cache=fused_cache)
            plain = model.hidden_states(tokens, attention_mask=mask, cache=plain_cache)
            # bf16 rounding apart, nothing more (a wrong head group, position or mask is off by O(1))
            assert (fused - plain).norm() <= 0.02 * plain.norm(), step
            column = fused_cache.length - 1
            for layer in range(model.config.n_layer):
                for mine, theirs in ((fused_cache.keys, plain_cache.keys), (fused_cache.values, plain_cache.values)):
                    a, b = mine[layer][:, :, column].float(), theirs[layer][:, :, column].float()
                    assert (a - b).norm() <= 0.02 * b.norm(), (step, layer)
            tokens = (tokens * 7 + step) % model.config.vocab_size
    assert spy.calls == 6  # every decoding step went through C; the prompt did not


@needs_c_blocks
def test_sixteen_long_padded_rows_agree_with_the_pytorch_blocks():
    """Enough rows and columns for the attention to run on several threads, prompts of other lengths."""
    model = int8_model(max_seq_len=128)
    prompts = [list(range(5, 5 + 60 + 3 * (i % 5))) for i in range(MAX_ROWS)]
    ids, mask = left_padded(prompts)
    fused_cache, plain_cache = generation_cache(model, MAX_ROWS, 80), generation_cache(model, MAX_ROWS, 80)
    spy = RunnerSpy(BlockRunner(model, fused_cache))  # no fallback: the prompt runs the PyTorch blocks
    fused_cache.run_blocks = spy
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask, cache=fused_cache)
            model(ids, attention_mask=mask, cache=plain_cache)
            mask = torch.cat([mask, torch.ones(MAX_ROWS, 1, dtype=mask.dtype)], dim=1)
            tokens = torch.arange(MAX_ROWS)[:, None] + 30
            fused = model.hidden_states(tokens, attention_mask=mask, cache=fused_cache)
            plain = model.hidden_states(tokens, attention_mask=mask, cache=plain_cache)
    finally:
        torch.set_num_threads(threads)
    assert spy.calls == 1
    assert ((fused - plain).norm(dim=-1) <= 0.02 * plain.norm(dim=-1)).all()  # every row on its own


@needs_c_blocks
def test_gradients_a_virtual_prompt_and_another_model():
    """With gradients on the PyTorch blocks would compute otherwise: not fused. A p-tuning prompt changes
    only the prefill: fused, and the same answers. A runner asked by another model declines."""
    model = int8_model()
    cache = generation_cache(model, 1, 8)
    spy = RunnerSpy(BlockRunner(model, cache))  # no fallback: the prompt runs the PyTorch blocks
    cache.run_blocks = spy
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), cache=cache)
    model(torch.tensor([[8]]), cache=cache)  # gradients on
    assert spy.calls == 0
    other = int8_model()
    with torch.no_grad():
        assert spy.runner(other, torch.zeros(1, 1, 128), torch.zeros(1, 1, dtype=torch.long), None) is None

    prompted = int8_model()
    add_adapter(prompted, PtuningPEFTConfig(None, virtual_tokens=3, bottleneck_dim=16, embedding_dim=8),
                verbose=False)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    fused = generate_ids(prompted, prompts, tokens_to_generate=6)
    with torch.no_grad():
        assert isinstance(block_runner(prompted, generation_cache(prompted, 2, 9)), BlockRunner)  # plain blocks
    plain_runner = generation.block_runner
    try:
        generation.block_runner = lambda model, cache: None
        assert fused == generate_ids(prompted, prompts, tokens_to_generate=6)
    finally:
        generation.block_runner = plain_runner


@needs_c_blocks
def test_generate_takes_the_fused_path_and_answers_as_the_pytorch_blocks(monkeypatch):
    model = int8_model()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41]]
    runners = record_runners(monkeypatch)
    fused = generate_ids(model, prompts, tokens_to_generate=8)
    assert runners and runners[0].calls == 8  # 8 tokens: the prompt (glued), then 7 fused steps
    assert isinstance(runners[0].runner, BlockRunner)
    monkeypatch.setattr(generation, "block_runner", lambda model, cache: None)
    assert fused == generate_ids(model, prompts, tokens_to_generate=8)


@needs_c_blocks
def test_a_finished_generation_frees_its_cache_at_once(monkeypatch):
    """The cache holds its runner: were the runner to hold the cache, each call's KV cache would wait for
    the garbage collector (peak RSS grew by ~50 MB per batch-16 call before this was a weak reference)."""
    model, caches = int8_model(), []

    def recording_runner(model, cache):
        caches.append(weakref.ref(cache))
        return block_runner(model, cache)

    monkeypatch.setattr(generation, "block_runner", recording_runner)
    gc.collect()
    gc.disable()
    try:
        generate_ids(model, [[5, 6, 7]], tokens_to_generate=4)
        assert caches and caches[0]() is None
    finally:
        gc.enable()


@needs_c_blocks
def test_more_rows_than_the_kernel_takes_fall_back_to_the_glued_blocks():
    model = int8_model()
    cache = generation_cache(model, MAX_ROWS + 1, 8)
    runner = block_runner(model, cache)
    assert isinstance(runner.fallback, GluedBlocks)
    runner.fallback = spy = RunnerSpy(runner.fallback)
    cache.run_blocks = runner
    with torch.no_grad():
        model(torch.full((MAX_ROWS + 1, 3), 5), cache=cache)
        assert runner._step(model, torch.zeros(MAX_ROWS + 1, 1, 128), torch.zeros(MAX_ROWS + 1, 1, dtype=torch.long),
                            None) is None
        out = model(torch.full((MAX_ROWS + 1, 1), 6), cache=cache)
    assert spy.calls == 2 and out.shape == (MAX_ROWS + 1, 1, model.config.vocab_size)  # the prompt and the step


def test_not_fused_where_the_c_code_would_compute_something_else():
    """Every model the C code does not compute exactly gets None, and says why."""
    if library() is None:
        model = int8_model()
        assert block_runner(model, generation_cache(model, 1, 8)) is None
        assert "no compiled kernel" in unfused_reason(model, generation_cache(model, 1, 8))
        return
    plain = tiny_model(tiny_llama_config(d_model=128, n_head=4, n_kv_head=2, d_ff=96)).requires_grad_(False)
    assert "KV cache is not bf16" in unfused_reason(plain, generation_cache(plain, 1, 8))  # float32: float32 attention
    cast_frozen_weights(plain, torch.bfloat16)
    if cpu_has_amx():
        assert unfused_reason(plain, generation_cache(plain, 1, 8)) == "blocks.0.attention.attention_qkv is a Linear"
    lora = tiny_model(tiny_llama_config(d_model=128, n_head=4, n_kv_head=2, d_ff=96))
    add_adapter(lora, LoraPEFTConfig(None, target_modules=["attention_qkv"], adapter_dim=4, alpha=4,
                                     row_init_method="normal"), verbose=False)
    quantize_int8(lora)
    if cpu_has_amx():
        assert unfused_reason(lora, generation_cache(lora, 1, 8)) == "blocks.0.attention.attention_qkv is a LoRALinear"
    hooked = int8_model()
    hooked.blocks[2].mlp.register_forward_hook(lambda *args: None)
    if cpu_has_amx():
        assert unfused_reason(hooked, generation_cache(hooked, 1, 8)) == "blocks.2.mlp has a forward hook"
    long_cache = int8_model()  # 64 rotary positions
    assert "longer than the rotary tables" in unfused_reason(long_cache, generation_cache(long_cache, 1, 65))
    if cpu_has_amx():  # a bf16 model: the glued blocks
        assert decoding_path(plain) == f"{GLUED} (not fused: {unfused_reason(plain, generation_cache(plain, 1, 8))})"
        assert decoding_path(int8_model(), rows=MAX_ROWS + 1) == f"{GLUED} (not fused: more than {MAX_ROWS} rows)"
    if cpu_has_amx():
        assert decoding_path(int8_model()) == FUSED
    narrow = int8_model(n_head=8)  # head_dim 16
    assert "head_dim" in unfused_reason(narrow, generation_cache(narrow, 1, 8))
    assert block_runner(narrow, generation_cache(narrow, 1, 8)) is None


@needs_c_blocks
def test_the_real_int8_model_decodes_as_its_pytorch_blocks(smollm2):
    """SmolLM2 in int8: the fused path predicts the same greedy tokens on a real question, and its hidden
    states stay within bf16 rounding of the PyTorch blocks' (about 1 %; PyTorch's own int8 kernel differs
    from ours by as much)."""
    model, tokenizer = smollm2
    int8 = copy.deepcopy(model).requires_grad_(False)
    quantize_int8(int8)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Which city is the capital of France?"}])
    ids = torch.tensor([tokenizer.encode(chat)])
    fused_cache, plain_cache = generation_cache(int8, 1, ids.shape[1] + 4), generation_cache(int8, 1, ids.shape[1] + 4)
    fused_cache.run_blocks = spy = RunnerSpy(block_runner(int8, fused_cache))
    with torch.no_grad():
        token = int8(ids, cache=fused_cache, last_only=True).argmax(-1)
        int8(ids, cache=plain_cache)
        for _ in range(3):
            fused = int8.hidden_states(token, cache=fused_cache)
            plain = int8.hidden_states(token, cache=plain_cache)
            assert (fused - plain).norm() <= 0.03 * plain.norm()
            top2 = int8.lm_head(plain).float().topk(2, dim=-1).values
            if top2[..., 0] - top2[..., 1] > 0.5:  # a clear choice: rounding cannot flip it
                assert int8.lm_head(fused).argmax(-1) == int8.lm_head(plain).argmax(-1)
            token = int8.lm_head(plain).argmax(-1)
    assert isinstance(spy.runner, BlockRunner) and spy.calls == 4  # the prompt (glued), then 3 fused steps
