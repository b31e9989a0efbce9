"""Int8 weight-only quantization: exact against its own dequantized matrix, close to float32, still answers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_tutorial.generation import generate_ids
from lora_tutorial.peft import LoraPEFTConfig, add_adapter
from lora_tutorial.quantize import DECODE_ROWS, Int8Linear, quantize_int8

from helpers import assert_agrees_with_fp32_and_answers, tiny_llama_config, tiny_model


# the int8 kernel; then bf16 products with scaled outputs (fewer rows than inputs) or a scaled matrix (more)
@pytest.mark.parametrize("rows", [1, DECODE_ROWS, DECODE_ROWS + 1, 40, 80])
def test_int8_linear_multiplies_by_its_dequantized_matrix(rows):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True)
    q = Int8Linear(linear)
    x = torch.randn(rows, 64)
    reference = x.bfloat16().float() @ q.dequantized().float().T + linear.bias.detach()
    assert torch.allclose(q(x).float(), reference, atol=3e-2, rtol=2e-2)
    # and the dequantized matrix is the original up to half a quantization step plus bf16 rounding
    w = linear.weight.detach()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    error = (q.dequantized().float() - w).abs()
    assert (error <= 0.5 * step * 1.01 + w.abs() * 2**-8).all()
    assert error.max() > 0  # it did quantize


def test_quantize_int8_replaces_frozen_linears_and_keeps_adapters():
    model = tiny_model(tiny_llama_config())
    add_adapter(model, LoraPEFTConfig(None, target_modules=["attention_qkv"], adapter_dim=4, alpha=4,
                                      row_init_method="normal"), verbose=False)
    replaced = quantize_int8(model)
    n_layer = model.config.n_layer
    assert replaced == 4 * n_layer + 1  # qkv (inside LoRA), dense, fc1, fc2 per block, and the LM head
    assert all(type(m) is not nn.Linear for m in model.modules())
    lora = model.blocks[0].attention.attention_qkv
    assert isinstance(lora.base, Int8Linear) and lora.lora_A.dtype == torch.float32 and lora.lora_A.requires_grad
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    cached = generate_ids(model, prompts, tokens_to_generate=5)
    assert cached == generate_ids(model, prompts, tokens_to_generate=5, use_cache=False)


def test_int8_smollm2_agrees_with_float32_and_answers(smollm2):
    model, tokenizer = smollm2
    int8 = copy.deepcopy(model).requires_grad_(False)
    assert quantize_int8(int8) == 4 * model.config.n_layer + 1
    assert int8.wte.weight.dtype == torch.bfloat16
    assert_agrees_with_fp32_and_answers(model, int8, tokenizer, min_agreement=0.85)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_generate_cli_with_low_precision_weights(precision):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lora_tutorial", "generate", "--prompt",
                          "Which city is the capital of France?", "--precision", precision,
                          "--tokens-to-generate", "12"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout


def test_load_int8_model_caches_the_int8_matrices_and_reads_them_back(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    from test_pretrained import write_gguf_from_hf

    from helpers import save_hf_llama
    from lora_tutorial.checkpoint_names import CheckpointError
    from lora_tutorial.quantize import load_int8_model

    path = tmp_path / "tiny.gguf"
    write_gguf_from_hf(save_hf_llama(tmp_path / "hf", max_positions=64), path)
    monkeypatch.setenv("LORA_TUTORIAL_CACHE", str(tmp_path / "cache"))
    first, _ = load_int8_model(path, use_cache=True)
    (cached,) = (tmp_path / "cache").glob("*-int8-*.safetensors")
    header_length = int.from_bytes(cached.read_bytes()[:8], "little")
    assert (8 + header_length) % 64 == 0  # the data section starts 64-byte aligned
    stored = {k: v.clone() for k, v in load_file(str(cached)).items()}  # copies: the file is rewritten below
    assert len(stored) == 2 * (4 * first.config.n_layer + 1)  # int8 matrix + scales per quantized layer
    ids = torch.tensor([[3, 4, 5, 6]])
    second, _ = load_int8_model(path, use_cache=True)
    assert torch.equal(first(ids), second(ids))

    def rewrite(state: dict) -> None:  # a new file in place of the old one, never the mapped one rewritten
        save_file(state, str(tmp_path / "new.safetensors"))
        (tmp_path / "new.safetensors").replace(cached)

    # the second load read the file (it did not quantize again): a changed scale shows up in the model
    stored["lm_head.scale"] = stored["lm_head.scale"] * 2
    rewrite(stored)
    third, _ = load_int8_model(path, use_cache=True)
    assert torch.equal(third.lm_head.scale, stored["lm_head.scale"])
    # a cache file that does not fit the model is one error naming the file and the tensor
    del stored["blocks.1.mlp.mlp_fc2.weight_int8"]
    rewrite(stored)
    with pytest.raises(CheckpointError, match=r"\.safetensors: blocks\.1\.mlp\.mlp_fc2\.weight_int8 is missing"):
        load_int8_model(path, use_cache=True)


def test_a_bad_stored_layer_leaves_the_model_unchanged():
    from lora_tutorial.checkpoint_names import CheckpointError

    model = tiny_model(tiny_llama_config()).requires_grad_(False)
    stored = copy.deepcopy(model)
    quantize_int8(stored)
    state = {k: v for k, v in stored.state_dict().items() if k.endswith((".weight_int8", ".scale"))}
    state["lm_head.scale"] = state["lm_head.scale"][:-1]  # the last layer checked is the wrong size
    with pytest.raises(CheckpointError, match=r"lm_head\.scale is \(\d+,\) torch.bfloat16; expected"):
        quantize_int8(model, state, source="cache.safetensors")
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # nothing was replaced


def test_quantizing_in_row_chunks_gives_the_whole_matrix_recipe():
    from lora_tutorial.quantize import QUANTIZE_ROWS

    torch.manual_seed(0)
    linear = nn.Linear(16, 2 * QUANTIZE_ROWS + 5, bias=False)  # three chunks, the last a partial one
    q = Int8Linear(linear)
    w = linear.weight.detach().float()
    scale = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).to(torch.bfloat16)
    assert torch.equal(q.scale, scale)
    assert torch.equal(q.weight_int8, torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
