"""Every unsupported input to load_base_model gives one clear CheckpointError naming what is wrong."""

from __future__ import annotations

import json
from importlib import metadata

import numpy as np
import pytest
import torch

from lora_tutorial import CheckpointError, load_base_model
from lora_tutorial.checkpoints import unpermute_rope_rows

from helpers import write_tiny_tokenizer


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
    data = np.ones((4, 8), dtype=tensor_dtype)
    writer.add_tensor("token_embd.weight", data, raw_dtype=raw_type)
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


def test_hf_dir_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_base_model(tmp_path)


def test_hf_dir_with_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model_type 'bert' is not supported"):
        load_base_model(tmp_path)


def test_hf_dir_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_base_model(tmp_path)


def test_hf_dir_with_missing_weight(tmp_path):
    import transformers

    config = transformers.GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["transformer.h.0.mlp.c_fc.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="h.0.mlp.c_fc.weight' is missing"):
        load_base_model(tmp_path)


def test_missing_wheel_says_run_make_setup(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", not_installed)
    with pytest.raises(CheckpointError, match="make setup"):
        load_base_model("smollm2-135m-instruct")


def test_unpermute_turns_interleaved_pairs_into_halves():
    # One head of dim 4: llama.cpp rows are (pair0.x, pair0.y, pair1.x, pair1.y); HF wants (p0.x, p1.x, p0.y, p1.y).
    w = torch.arange(4.0)[:, None].expand(4, 3)
    assert unpermute_rope_rows(w, n_head=1)[:, 0].tolist() == [0.0, 2.0, 1.0, 3.0]
