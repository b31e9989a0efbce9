"""bf16 prompts and decoding steps through glued_blocks.py (C between PyTorch's products) agree with the
model's own PyTorch blocks, also under LoRA, and the path is taken only where the C code computes those blocks.

The C code runs where its library is built and the KV cache is bf16 (CPUs with AVX-512 and AMX: the
project's machine and its CI); elsewhere the agreement tests are skipped and the "not glued" tests run."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_tutorial import generation
from lora_tutorial.generation import generate_ids
from lora_tutorial.glued_blocks import GluedBlocks, glued_blocks, unglued_reason
from lora_tutorial.int8_kernel import library
from lora_tutorial.model import GPT
from lora_tutorial.peft import LoraPEFTConfig, PtuningPEFTConfig, add_adapter
from lora_tutorial.precision import cast_frozen_weights, cpu_has_amx

from helpers import (RunnerSpy, generation_cache, left_padded, needs_c_blocks, record_runners, tiny_gpt2_config,
                     tiny_llama_config, tiny_model)


def bf16_model(**overrides) -> GPT:
    """A tiny Llama-style model whose sizes the C pieces take (head_dim 32, grouped-query heads), frozen in bf16."""
    config = tiny_llama_config(**{"d_model": 128, "n_head": 4, "n_kv_head": 2, "d_ff": 96, "n_layer": 3, **overrides})
    model = tiny_model(config).requires_grad_(False)
    cast_frozen_weights(model, torch.bfloat16)
    return model




def close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 0.02) -> bool:
    """Within bf16 rounding, row by row (a wrong position, head group or mask is off by O(1))."""
    a, b = a.float().flatten(0, -2), b.float().flatten(0, -2)
    return bool(((a - b).norm(dim=-1) <= tolerance * b.norm(dim=-1) + 1e-6).all())


def compare_paths(model: GPT, prompts: list[list[int]], steps: int = 5) -> int:
    """Prompt and ``steps`` decoding steps glued and through the PyTorch blocks side by side; checks the
    hidden states of real tokens and the cache columns each writes. Returns how many passes were glued."""
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    glued_cache, plain_cache = generation_cache(model, len(prompts), width + steps), generation_cache(model, len(prompts), width + steps)
    spy = RunnerSpy(glued_blocks(model, glued_cache))
    glued_cache.run_blocks = spy
    tokens = ids
    with torch.no_grad():
        for step in range(steps + 1):
            start = plain_cache.length
            glued = model.hidden_states(tokens, attention_mask=mask, cache=glued_cache)
            plain = model.hidden_states(tokens, attention_mask=mask, cache=plain_cache)
            assert close(glued[real], plain[real]), step
            for layer in range(model.config.n_layer):
                for mine, theirs in ((glued_cache.keys, plain_cache.keys), (glued_cache.values, plain_cache.values)):
                    a = mine[layer][:, :, start:plain_cache.length].transpose(1, 2)[real]
                    b = theirs[layer][:, :, start:plain_cache.length].transpose(1, 2)[real]
                    assert close(a, b), (step, layer)
            tokens = (model.lm_head(plain[:, -1:]).argmax(-1) * 7 + step) % model.config.vocab_size
            real = torch.ones(tokens.shape, dtype=torch.bool)
            if mask is not None:
                mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
    return spy.calls


# SmolLM2's head shape (3 query heads per key/value head, head_dim 64) has attention code of its own.
SHAPES = {"generic": {}, "smollm2-heads": {"d_model": 384, "n_head": 6, "n_kv_head": 2}}
PROMPTS = {"one row": [[5, 6, 7, 8, 9, 10, 11]],
           "left-padded": [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]]}


@needs_c_blocks
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prompts", PROMPTS)
def test_glued_prompt_and_steps_agree_with_the_pytorch_blocks(prompts, shape):
    assert compare_paths(bf16_model(**SHAPES[shape]), PROMPTS[prompts]) == 6  # the prompt and 5 steps


@needs_c_blocks
def test_many_long_rows_agree_on_two_threads():
    """Enough rows for the C loops to run in parallel and for the layers' outputs to be large allocations
    (C must read each before PyTorch frees it)."""
    model = bf16_model(max_seq_len=160)
    prompts = [[t % 90 + 5 for t in range(90 + 3 * (i % 7))] for i in range(24)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert compare_paths(model, prompts, steps=2) == 3
    finally:
        torch.set_num_threads(threads)


@needs_c_blocks
def test_lora_layers_are_glued_and_agree():
    """The products are the model's own modules: a LoRA wrapper still applies (B initialised non-zero here,
    so that the adapter changes the outputs)."""
    model = bf16_model()
    add_adapter(model, LoraPEFTConfig(None, target_modules=["attention_qkv", "mlp_fc2"], adapter_dim=4, alpha=4,
                                      row_init_method="normal"), verbose=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.requires_grad_(False)
    assert unglued_reason(model, generation_cache(model, 1, 8)) == ""
    assert compare_paths(model, PROMPTS["left-padded"]) == 6


@needs_c_blocks
def test_generate_takes_the_glued_path_and_answers_as_the_pytorch_blocks(monkeypatch):
    model = bf16_model()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41]]
    runners = record_runners(monkeypatch)
    glued = generate_ids(model, prompts, tokens_to_generate=8)
    assert runners and isinstance(runners[0].runner, GluedBlocks) and runners[0].calls == 8  # prompt + 7 steps
    monkeypatch.setattr(generation, "block_runner", lambda model, cache: None)
    assert glued == generate_ids(model, prompts, tokens_to_generate=8)


@needs_c_blocks
def test_declines_gradients_another_model_and_a_full_cache():
    model = bf16_model()
    cache = generation_cache(model, 1, 4)
    runner = glued_blocks(model, cache)
    x, positions = torch.zeros(1, 3, 128), torch.arange(3)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert runner(model, x, positions, None, True) is None  # gradients on
        with torch.no_grad():
            assert runner(bf16_model(), x, positions, None, True) is None
            assert runner(model, torch.zeros(1, 5, 128), torch.arange(5)[None], None, True) is None  # 5 > 4 columns
            assert runner(model, x, positions, None, True) is not None
    with torch.no_grad():
        assert runner(model, torch.zeros(1, 1, 128), torch.tensor([[3]]), None, False) is None  # no autocast


def test_not_glued_where_the_c_code_would_compute_something_else():
    """Every model whose blocks the C pieces do not compute gets None, and says why."""
    plain = tiny_model(tiny_llama_config(d_model=128, n_head=4, n_kv_head=2, d_ff=96)).requires_grad_(False)
    assert "KV cache is not bf16" in unglued_reason(plain, generation_cache(plain, 1, 8))  # float32: float32 attention
    gpt2 = tiny_model(tiny_gpt2_config()).requires_grad_(False)
    cast_frozen_weights(gpt2, torch.bfloat16)
    assert unglued_reason(gpt2, generation_cache(gpt2, 1, 8)) == "only RoPE + RMSNorm + SwiGLU blocks without biases"
    narrow = bf16_model(n_head=8)  # head_dim 16
    assert "head_dim" in unglued_reason(narrow, generation_cache(narrow, 1, 8))
    long_cache = bf16_model()  # 64 rotary positions
    assert "longer than the rotary tables" in unglued_reason(long_cache, generation_cache(long_cache, 1, 65))
    if not cpu_has_amx():
        assert glued_blocks(bf16_model(), generation_cache(bf16_model(), 1, 8)) is None  # float32 attention there
        return
    hooked = bf16_model()
    hooked.blocks[1].attention.register_forward_hook(lambda *args: None)
    assert unglued_reason(hooked, generation_cache(hooked, 1, 8)) == "blocks.1.attention has a forward hook"
    hooked_layer = bf16_model()
    hooked_layer.blocks[0].attention.attention_qkv.register_forward_hook(lambda *args: None)
    assert (unglued_reason(hooked_layer, generation_cache(hooked_layer, 1, 8))
            == "blocks.0.attention.attention_qkv has a forward hook")
    wrapped = bf16_model()
    wrapped.blocks[2].mlp = torch.nn.Sequential(wrapped.blocks[2].mlp)
    assert unglued_reason(wrapped, generation_cache(wrapped, 1, 8)) == "blocks.2.mlp is a Sequential"
    if library() is None:
        assert "no compiled kernel" in unglued_reason(bf16_model(), generation_cache(bf16_model(), 1, 8))
    else:
        assert glued_blocks(bf16_model(), generation_cache(bf16_model(), 1, 8)) is not None


@needs_c_blocks
def test_the_real_model_in_bf16_answers_as_its_pytorch_blocks(smollm2):
    """SmolLM2 in bf16: a real prompt glued and through the PyTorch blocks, hidden states within bf16
    rounding (about 1 %), and the same greedy token wherever the choice is clear."""
    model, tokenizer = smollm2
    bf16 = copy.deepcopy(model).requires_grad_(False)
    cast_frozen_weights(bf16, torch.bfloat16)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Which city is the capital of France?"}])
    ids = torch.tensor([tokenizer.encode(chat)])
    glued_cache, plain_cache = generation_cache(bf16, 1, ids.shape[1] + 4), generation_cache(bf16, 1, ids.shape[1] + 4)
    glued_cache.run_blocks = spy = RunnerSpy(glued_blocks(bf16, glued_cache))
    token = ids
    with torch.no_grad():
        for _ in range(4):
            glued = bf16.hidden_states(token, cache=glued_cache)[:, -1:]
            plain = bf16.hidden_states(token, cache=plain_cache)[:, -1:]
            assert (glued - plain).norm() <= 0.03 * plain.norm()
            top2 = bf16.lm_head(plain).float().topk(2, dim=-1).values
            if top2[..., 0] - top2[..., 1] > 0.5:  # a clear choice: rounding cannot flip it
                assert bf16.lm_head(glued).argmax(-1) == bf16.lm_head(plain).argmax(-1)
            token = bf16.lm_head(plain).argmax(-1)
    assert spy.calls == 4  # the prompt and 3 steps


@needs_c_blocks
def test_a_layer_of_the_wrong_width_is_an_error_not_a_read_past_its_end():
    model = bf16_model()
    model.blocks[1].mlp.mlp_fc1 = torch.nn.Linear(128, 64, bias=False)  # SwiGLU expects 2 x 96 outputs
    with pytest.raises(ValueError, match=r"blocks.1.mlp.mlp_fc1 returned a \(1, 3, 64\) tensor; 3 rows of 192 expected"):
        generate_ids(model, [[5, 6, 7]], tokens_to_generate=2)


@needs_c_blocks
def test_a_prompt_in_two_parts_agrees():
    """A second prompt chunk after a first (cache start > 0, several tokens): prompt attention over the
    cache with GPT's causal mask."""
    model = bf16_model()
    first, second = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12, 13]])
    glued_cache, plain_cache = generation_cache(model, 1, 12), generation_cache(model, 1, 12)
    glued_cache.run_blocks = spy = RunnerSpy(glued_blocks(model, glued_cache))
    with torch.no_grad():
        for chunk in (first, second):
            glued = model.hidden_states(chunk, cache=glued_cache)
            plain = model.hidden_states(chunk, cache=plain_cache)
            assert close(glued, plain)
    assert spy.calls == 2
    for mine, theirs in zip(glued_cache.keys + glued_cache.values, plain_cache.keys + plain_cache.values):
        assert close(mine[:, :, :9].transpose(1, 2), theirs[:, :, :9].transpose(1, 2))


@needs_c_blocks
def test_a_virtual_prompt_is_glued_and_answers_as_the_pytorch_blocks(monkeypatch):
    """p-tuning's virtual tokens sit in front of every prompt (in the cache, the positions and the mask)."""
    model = bf16_model()
    add_adapter(model, PtuningPEFTConfig(None, virtual_tokens=3, bottleneck_dim=16, embedding_dim=8), verbose=False)
    model.requires_grad_(False)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    runners = record_runners(monkeypatch)
    glued = generate_ids(model, prompts, tokens_to_generate=6)
    assert runners and runners[0].calls == 6
    monkeypatch.setattr(generation, "block_runner", lambda model, cache: None)
    assert glued == generate_ids(model, prompts, tokens_to_generate=6)


class Float32Wrapper(torch.nn.Module):
    """A linear layer whose output stays float32 under autocast (as a post-norm bottleneck adapter's does)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).float() * 1.5


@needs_c_blocks
def test_a_layer_that_returns_float32_leaves_the_pass_to_the_pytorch_blocks():
    """C would have to round that output to bf16, which the PyTorch blocks do not: the runner declines (the
    same answers as without it), remembers why, and declines every later call at once."""
    model = bf16_model()
    model.blocks[2].attention.attention_dense = Float32Wrapper(model.blocks[2].attention.attention_dense)
    ids = torch.tensor([[5, 6, 7, 8]])
    glued_cache, plain_cache = generation_cache(model, 1, 6), generation_cache(model, 1, 6)
    glued_cache.run_blocks = spy = RunnerSpy(glued_blocks(model, glued_cache))
    with torch.no_grad():
        for tokens in (ids, torch.tensor([[9]])):
            assert torch.equal(model.hidden_states(tokens, cache=glued_cache),
                               model.hidden_states(tokens, cache=plain_cache))
    assert spy.calls == 0
    assert spy.runner.unfit == "blocks.2.attention.attention_dense returns another dtype than bf16"
