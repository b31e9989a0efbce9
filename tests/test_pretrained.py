"""Loading pretrained models: the one name table for HF and GGUF (checked against transformers and gguf's own
name maps), a tiny GGUF written the llama.cpp way and read back with HF's logits, bf16 loading, and one clear
CheckpointError for every unsupported input."""

from __future__ import annotations

import json
from importlib import metadata

import numpy as np
import pytest
import torch

from lora_tutorial import CheckpointError, load_base_model, pretrained
from lora_tutorial.checkpoint_names import GGUF, HF, LLAMA_NAMES, llama_names, llama_state_dict, unpermute_rope_rows
from lora_tutorial.pretrained import build_model, cache_dir, read_gguf

from helpers import (logits, random_ids, save_hf_gpt2, save_hf_llama, tiny_llama_config, tiny_model,
                     tiny_tokenizer, write_tiny_tokenizer)

# ----------------------------------------------------------------------------------------------
# The name table
# ----------------------------------------------------------------------------------------------


def _hf_llama(tie: bool = True):
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("tie", [True, False])
def test_our_names_are_the_models_and_the_hf_names_are_transformers(tie):
    config = tiny_llama_config(n_layer=3, vocab_size=50, tie_embeddings=tie)
    names = llama_names(config, HF)
    ours = set(tiny_model(config).state_dict())
    if tie:
        ours.discard("lm_head.weight")  # the tied head is the embedding table: not a tensor of its own
    assert set(names) == ours
    hf_keys = {k.removeprefix("model.") for k in _hf_llama(tie).state_dict()}
    if tie:
        hf_keys.discard("lm_head.weight")
    assert {n for parts in names.values() for n in parts} == hf_keys


def test_gguf_names_are_what_gguf_maps_the_hf_names_to():
    import gguf

    config = tiny_llama_config(n_layer=3, tie_embeddings=False)
    reference = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layer)
    hf, ggml = llama_names(config, HF), llama_names(config, GGUF)
    assert hf.keys() == ggml.keys()
    for ours in hf:
        assert [reference.get_name(n, try_suffixes=(".weight",)) for n in hf[ours]] == list(ggml[ours]), ours


def test_llama_state_dict_stacks_fused_parts_in_row_order():
    hf = _hf_llama()
    raw = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    config = tiny_llama_config(n_layer=3, vocab_size=50)
    state = llama_state_dict(raw, config, HF, "test")
    attn, mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    torch.testing.assert_close(state["blocks.1.attention.attention_qkv.weight"],
                               torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    torch.testing.assert_close(state["blocks.1.mlp.mlp_fc1.weight"],
                               torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    torch.testing.assert_close(state["blocks.1.mlp.mlp_fc2.weight"], mlp.down_proj.weight)
    assert set(state) == set(llama_names(config, HF))

    missing = dict(raw)
    del missing["layers.2.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"src: tensor 'layers\.2\.self_attn\.k_proj\.weight' is missing"):
        llama_state_dict(missing, config, HF, "src")
    with pytest.raises(CheckpointError, match=r"src: unexpected tensors \['layers\.0\.extra'\]"):
        llama_state_dict({**raw, "layers.0.extra": torch.zeros(1)}, config, HF, "src")


def test_every_table_entry_fuses_parts_of_equal_count_in_hf_and_gguf():
    for ours, (hf, ggml) in LLAMA_NAMES.items():
        assert len(hf) == len(ggml), ours


# ----------------------------------------------------------------------------------------------
# GGUF: llama.cpp's rotary row order, a tiny file read back with HF's logits, the conversion cache
# ----------------------------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q_proj / k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_turns_interleaved_pairs_into_halves():
    # One head of dim 4: llama.cpp rows are (pair0.x, pair0.y, pair1.x, pair1.y); HF wants (p0.x, p1.x, p0.y, p1.y).
    w = torch.arange(4.0)[:, None].expand(4, 3)
    assert unpermute_rope_rows(w, n_head=1)[:, 0].tolist() == [0.0, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("n_head", [1, 3])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    w = torch.randn(n_head * 8, 5, generator=torch.Generator().manual_seed(0))
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), n_head))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, n_head), w)


def write_gguf_from_hf(hf, path) -> None:
    """A llama GGUF file as llama.cpp's converter writes it: GGUF names, q/k rows permuted, BPE metadata."""
    import gguf

    c = hf.config
    tok = json.loads(tiny_tokenizer().backend.to_str())
    vocab = sorted({**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}.items(),
                   key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else c.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    config = tiny_llama_config(vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings)
    hf_state = {k.removeprefix("model."): v.detach().numpy() for k, v in hf.state_dict().items()}
    for ours, hf_names in llama_names(config, HF).items():
        gguf_names = llama_names(config, GGUF)[ours]
        for hf_name, gguf_name in zip(hf_names, gguf_names):
            w = hf_state[hf_name]
            if hf_name.endswith("q_proj.weight"):
                w = llama_cpp_permute(w, c.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                w = llama_cpp_permute(w, c.num_key_value_heads)
            writer.add_tensor(gguf_name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_written_like_llama_cpp_gives_hf_logits_and_is_cached(tmp_path, monkeypatch):
    hf = save_hf_llama(tmp_path / "hf", max_positions=64)
    path = tmp_path / "tiny.gguf"
    write_gguf_from_hf(hf, path)
    monkeypatch.setenv("LORA_TUTORIAL_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"

    ours, tokenizer = load_base_model(path, use_cache=True)  # by default only the known model names are cached
    assert ours.config.tie_embeddings and ours.config.n_kv_head == 2
    ids = random_ids(2, 20, hf.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
    assert tokenizer.encode("The cat sat.") == tiny_tokenizer().encode("The cat sat.")
    assert tokenizer.eos_id == tiny_tokenizer().eos_id

    cached = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 1  # the conversion was stored...
    again, _ = load_base_model(path, use_cache=True)  # ...and the second load reads it
    assert again.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    # the metadata (config, vocabulary) is cached too: a second load never parses the GGUF again
    assert len(list((tmp_path / "cache").glob("*-meta.json"))) == 1
    monkeypatch.setattr(pretrained, "read_gguf", lambda p: pytest.fail("the GGUF was parsed again"))
    third, tokenizer3 = load_base_model(path, use_cache=True)
    assert third.config == ours.config
    assert tokenizer3.encode("The cat sat.") == tokenizer.encode("The cat sat.")
    alone = pretrained.load_tokenizer(path, use_cache=True)  # the tokenizer alone: from the cache too
    assert alone.encode("The cat sat.") == tokenizer.encode("The cat sat.")
    monkeypatch.setattr(pretrained, "read_gguf", read_gguf)
    cached[0].unlink()
    load_base_model(path)  # by default a file that is not a known model name is not cached
    assert not list((tmp_path / "cache").glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------
# Hugging Face directories, dtype, build_model
# ----------------------------------------------------------------------------------------------


def test_bf16_load_keeps_norm_gains_float32_and_agrees_with_float32(tmp_path):
    save_hf_llama(tmp_path)
    fp32, _ = load_base_model(tmp_path)
    bf16, _ = load_base_model(tmp_path, dtype=torch.bfloat16)
    for name, p in bf16.named_parameters():
        assert p.dtype == (torch.bfloat16 if p.dim() >= 2 else torch.float32), name
    assert bf16.lm_head.weight is bf16.wte.weight  # still tied
    assert bf16.rope_cos.dtype == torch.float32
    ids = random_ids(2, 20, bf16.config.vocab_size)
    agreement = (logits(fp32, ids).argmax(-1) == logits(bf16, ids).argmax(-1)).float().mean().item()
    assert agreement > 0.9
    assert fp32.name_or_path == str(tmp_path)  # adapter files record where the base came from


def test_build_model_names_a_misshapen_weight():
    config = tiny_llama_config()
    state = dict(tiny_model(config).state_dict())
    del state["lm_head.weight"]
    state["blocks.0.mlp.mlp_fc2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.mlp_fc2\.weight: shape \(3, 3\), expected \(32, 48\)"):
        build_model(config, state, torch.float32)
    del state["blocks.0.mlp.mlp_fc2.weight"]
    with pytest.raises(CheckpointError, match="missing.*blocks.0.mlp.mlp_fc2.weight"):
        build_model(config, state, torch.float32)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_base_model("/nonexistent/model.gguf")


def test_unknown_file_type(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unsupported model file"):
        load_base_model(f)


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x07" * 40)
    with pytest.raises(CheckpointError, match="broken.gguf: not a readable GGUF"):
        load_base_model(f, use_cache=False)


def _write_gguf(path, arch="llama", tensor_dtype=np.float32, raw_type=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c", "ab"])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(0)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=tensor_dtype), raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_with_other_architecture(tmp_path):
    f = tmp_path / "falcon.gguf"
    _write_gguf(f, arch="falcon")
    with pytest.raises(CheckpointError, match="architecture 'falcon' is not supported"):
        load_base_model(f, use_cache=False)


def test_gguf_with_unsupported_tensor_type(tmp_path):
    import gguf

    f = tmp_path / "int8.gguf"
    _write_gguf(f, tensor_dtype=np.int8, raw_type=gguf.GGMLQuantizationType.I8)
    with pytest.raises(CheckpointError, match="token_embd.weight has type I8"):
        load_base_model(f, use_cache=False)


def test_gguf_missing_a_tensor_names_it(tmp_path):
    f = tmp_path / "partial.gguf"
    _write_gguf(f)  # only the embedding table of a one-layer model
    with pytest.raises(CheckpointError, match=r"partial.gguf: tensor 'output_norm.weight' is missing"):
        load_base_model(f, use_cache=False)


def test_hf_dir_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_base_model(tmp_path)


def test_hf_dir_with_unsupported_architecture(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model_type 'bert' is not supported"):
        load_base_model(tmp_path)


def test_hf_dir_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_base_model(tmp_path)


@pytest.mark.parametrize("save, dropped, named", [
    (save_hf_gpt2, "transformer.h.0.mlp.c_fc.weight", r"h\.0\.mlp\.c_fc\.weight' is missing"),
    (save_hf_llama, "model.layers.1.mlp.up_proj.weight", r"tensor 'layers\.1\.mlp\.up_proj\.weight' is missing"),
])
def test_an_hf_dir_missing_a_weight_names_it(tmp_path, save, dropped, named):
    from safetensors.torch import load_file, save_file

    save(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights[dropped]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=named):
        load_base_model(tmp_path)


def test_hf_dir_without_tokenizer(tmp_path):
    save_hf_llama(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_base_model(tmp_path)


def test_missing_wheel_says_run_make_setup(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", not_installed)
    with pytest.raises(CheckpointError, match="make setup"):
        load_base_model("smollm2-135m-instruct")


def test_tiny_tokenizer_dir_round_trips(tmp_path):
    from lora_tutorial.tokenizer import tokenizer_from_hf_dir

    write_tiny_tokenizer(tmp_path)
    tok = tokenizer_from_hf_dir(tmp_path)
    text = "The cat sat on the mat. Grüße 🚀"
    assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(tok.token_to_id(t) for t in
                                                         ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))


def test_hf_config_without_a_required_key_names_it(tmp_path):
    save_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: missing key 'intermediate_size'"):
        load_base_model(tmp_path)


def test_load_tokenizer_of_a_file_that_is_not_gguf(tmp_path):
    from lora_tutorial import load_tokenizer

    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x07" * 40)
    with pytest.raises(CheckpointError, match="broken.gguf: not a readable GGUF"):
        load_tokenizer(f)


def test_build_model_skips_init_only_while_building_and_keeps_every_weight():
    from torch import nn

    config = tiny_llama_config()
    state = {k: v for k, v in tiny_model(config).state_dict().items()
             if not (config.tie_embeddings and k == "lm_head.weight")}
    before = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    built = build_model(config, state, torch.float32)
    assert (nn.Linear.reset_parameters, nn.Embedding.reset_parameters) == before  # restored
    for name, tensor in state.items():
        assert torch.equal(built.state_dict()[name], tensor), name
    assert built.rope_cos.device.type == "cpu" and not built.rope_cos.is_meta


def test_building_a_model_imports_no_compiler_machinery():
    """Random init on "meta" tensors imports torch._dynamo and sympy (~75 MiB kept by every decoding
    process); build_model must not trigger it. In a fresh process, since other tests import them."""
    import subprocess
    import sys

    code = """
import sys, torch
from lora_tutorial.model import GPT, GPTConfig
from lora_tutorial.pretrained import build_model
config = GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, max_seq_len=64)
state = {k: v for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
build_model(config, state, torch.float32)
print(sorted(m for m in ("sympy", "torch._dynamo") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
