"""Shared fixtures. The real base model is loaded once per test session (about 4 s from the cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# OMP_NUM_THREADS (when set) wins: on a shared machine the suite must not take every core.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, os.cpu_count() or 1))

SHARED_SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct base, fp32, eval mode. Do not modify it."""
    from lora_tutorial import load_base_model

    return load_base_model()


@pytest.fixture(scope="session")
def hf_smollm2():
    """HF transformers' own LlamaForCausalLM loaded from the same GGUF file: the reference implementation."""
    import transformers
    from lora_tutorial.pretrained import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def squad_source() -> Path:
    """The offline SQuAD copy beside the checkout (or $SQUAD_SOURCE_DIR)."""
    path = Path(os.environ.get("SQUAD_SOURCE_DIR") or SHARED_SQUAD)
    if not (path / "dev-v1.1.json.gz").exists() and not (path / "dev-v1.1.json").exists():
        pytest.fail(f"SQuAD source not found at {path}; set SQUAD_SOURCE_DIR")
    return path
