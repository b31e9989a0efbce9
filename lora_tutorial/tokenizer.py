"""Text <-> token ids for the base model.

SmolLM2 uses GPT-2's *byte-level BPE*: text is split into words and digits by a regular expression,
each word's UTF-8 bytes are mapped to printable characters (so every string can be encoded, emoji
included), and merge rules learned on a corpus glue frequent byte pairs into tokens. A GGUF file stores
the vocabulary (``tokenizer.ggml.tokens``) and the merge rules (``tokenizer.ggml.merges``); we rebuild
the tokenizer from them with Hugging Face's fast ``tokenizers`` library.

The instruct model was trained on chats in the ChatML format::

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    What is the capital of France?<|im_end|>
    <|im_start|>assistant

``apply_chat_template`` renders that; control tokens such as ``<|im_end|>`` are matched whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# GGUF token types (llama.cpp's enum): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_SPECIAL_TOKEN_TYPES = {2, 3, 4}


class Tokenizer:
    """A thin, explicit wrapper: ``encode``/``decode``, the BOS/EOS/pad ids, and the chat template."""

    def __init__(self, backend: HFTokenizer, bos_id: int | None, eos_id: int, pad_id: int | None = None,
                 chat_format: str = "chatml", default_system_prompt: str | None = None) -> None:
        self.backend = backend
        self.bos_id = bos_id if bos_id is not None else eos_id
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.chat_format = chat_format
        self.default_system_prompt = default_system_prompt

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_end|>``) become one id each."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def ids_where(self, test: Callable[[str], bool]) -> list[int]:
        """Every token id whose decoded text passes ``test`` (e.g. ``lambda t: "\\n" in t``: the newline tokens)."""
        pieces = self.backend.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return [i for i, piece in enumerate(pieces) if test(piece)]

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render ``[{"role": "user", "content": "..."}, ...]`` as ChatML text.

        Like SmolLM2's own template, a default system message is added when the chat has none.
        """
        if self.chat_format != "chatml":
            raise ValueError(f"apply_chat_template: no template for chat format {self.chat_format!r}")
        parts = []
        if self.default_system_prompt and (not messages or messages[0].get("role") != "system"):
            parts.append(f"<|im_start|>system\n{self.default_system_prompt}<|im_end|>\n")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"apply_chat_template: message {i} must be a dict with 'role' and 'content', "
                                 f"got {message!r}")
            parts.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: Sequence[str],
                   split_digits: bool = True) -> HFTokenizer:
    """Build a GPT-2-style byte-level BPE tokenizer from a vocabulary and merge rules.

    ``split_digits`` puts every digit in a token of its own, as the SmolLM tokenizer (llama.cpp's
    "smollm" pre-tokenizer) does; GPT-2 itself does not.
    """
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        digits = pre_tokenizers.Split(Regex(r"\d"), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(special_tokens))
    return backend


def tokenizer_from_gguf_fields(fields: dict) -> Tokenizer:
    """Tokenizer from the metadata of a GGUF file (a dict of plain Python values)."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer type {kind!r} is not supported; expected 'gpt2' (byte-level BPE)")
    tokens = fields["tokenizer.ggml.tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [tok for tok, t in zip(tokens, types) if t in _SPECIAL_TOKEN_TYPES]
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    backend = byte_level_bpe(vocab, merges, special, split_digits=pre in {"smollm", "starcoder", "refact"})
    template = fields.get("tokenizer.chat_template", "") or ""
    system = DEFAULT_SYSTEM_PROMPT if DEFAULT_SYSTEM_PROMPT in template else None
    return Tokenizer(backend, bos_id=fields.get("tokenizer.ggml.bos_token_id"),
                     eos_id=fields["tokenizer.ggml.eos_token_id"],
                     pad_id=fields.get("tokenizer.ggml.padding_token_id"),
                     chat_format="chatml" if "<|im_start|>" in template or not template else "none",
                     default_system_prompt=system)


def tokenizer_from_hf_dir(directory: str | Path) -> Tokenizer:
    """Tokenizer of a Hugging Face model directory: ``tokenizer.json``, else sentencepiece ``tokenizer.model``."""
    directory = Path(directory)
    special_map = _read_json(directory / "special_tokens_map.json")
    tok_config = _read_json(directory / "tokenizer_config.json")
    config = _read_json(directory / "config.json")
    if (directory / "tokenizer.json").exists():
        backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "tokenizer.model").exists():
        backend = _sentencepiece_backend(directory / "tokenizer.model")
    else:
        raise FileNotFoundError(f"{directory}: no tokenizer.json or tokenizer.model found; "
                                "a model directory needs one of them")

    def special_id(name: str) -> int | None:
        value = special_map.get(name) or tok_config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return backend.token_to_id(value)
        return config.get(f"{name}_id")

    eos = special_id("eos_token")
    if eos is None:
        raise ValueError(f"{directory}: cannot find the EOS token in special_tokens_map.json, "
                         "tokenizer_config.json or config.json (key 'eos_token' / 'eos_token_id')")
    template = tok_config.get("chat_template") or ""
    chat_format = "chatml" if "<|im_start|>" in template else "none"
    system = DEFAULT_SYSTEM_PROMPT if DEFAULT_SYSTEM_PROMPT in template else None
    return Tokenizer(backend, bos_id=special_id("bos_token"), eos_id=eos, pad_id=special_id("pad_token"),
                     chat_format=chat_format, default_system_prompt=system)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None


def _sentencepiece_backend(model_file: Path) -> HFTokenizer:
    """Convert a sentencepiece BPE ``tokenizer.model`` (Llama 1/2 style) into a ``tokenizers`` object."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # Recover merges the way HF's converter does: every pair of vocabulary pieces that forms another piece,
    # ranked by the score (= priority) of the merged piece.
    scored = []
    for piece, idx in vocab.items():
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in vocab and right in vocab:
                scored.append((sp.get_score(idx), vocab[left], vocab[right], left, right))
    scored.sort(key=lambda s: (-s[0], s[1], s[2]))
    merges = [(left, right) for _, _, _, left, right in scored]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()),
                                     fuse_unk=True, byte_fallback=True))
    from tokenizers import normalizers

    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    backend.add_special_tokens(specials)
    return backend
