"""Supervised fine-tuning (SFT) data: prompt/answer jsonl files -> token ids with answer-only labels.

Nothing here knows about SQuAD: a dataset reads any jsonl whose fields a prompt template names, and the
only task-specific piece, which part of a too-long prompt may be cut, comes in as a function
(``context_splitter``; ``squad.split_context`` for the tutorial)::

    {"input": "...", "output": "..."}              one jsonl line
            |  SFTDataset(files, tokenizer, prompt_template="{input} {output}")
            v
    prompt ids + answer ids (+ EOS)                labels = -100 on the prompt, the ids on the answer
            |  SFTCollator(pad_id)
            v
    right-padded tensors                           input_ids, labels, attention_mask (+ the texts)

Why "-100"? PyTorch's ``cross_entropy`` ignores targets equal to ``ignore_index=-100``. Giving the prompt
tokens that label means the model is only trained to *produce the answer*, not to reproduce the context
(the "answer-only loss" of instruction tuning). Labels are aligned with ``input_ids``; the model shifts
them by one position itself (token t predicts token t+1).
"""

from __future__ import annotations

import json
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label that ``torch.nn.functional.cross_entropy`` skips by default
ContextSplitter = Callable[[str], tuple[str, str, str]]  # text -> (head, truncatable body, tail)
PromptFormat = Callable[[str, str, str], tuple[str, str, str]]  # (prefix, body, suffix) -> the same, reformatted


def whole_text_is_body(text: str) -> tuple[str, str, str]:
    """The default splitter: any part of the truncation field may be cut (from its end)."""
    return "", text, ""


class TokenizerLike(Protocol):
    """What the dataset needs from a tokenizer (``lora_tutorial.tokenizer.Tokenizer`` fits)."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class PromptTemplate:
    """A template such as ``"{input} {output}"``, split where the loss starts.

    ``prompt_segments`` is the template before ``{output}`` with its trailing whitespace removed, and
    ``separator`` is that whitespace. The separator belongs to the *answer*: byte-level BPE glues a space
    to the word after it (``" Paris"`` is the single token ``"ĠParis"``), so ``" Paris"`` tokenized on its
    own gives the same ids as inside the full text, and the label mask falls exactly on the answer's tokens.
    """

    text: str
    prompt_segments: tuple[tuple[str, str | None], ...]  # (literal text, field name or None), in order
    separator: str

    @property
    def fields(self) -> list[str]:
        """The jsonl keys the template reads, ``output`` included."""
        return [name for _, name in self.prompt_segments if name] + ["output"]

    @classmethod
    def parse(cls, template: str) -> PromptTemplate:
        """Validate ``template``: plain ``{name}`` placeholders, and exactly one ``{output}``, at the end."""
        try:
            parsed = list(string.Formatter().parse(template))  # [(literal, field, spec, conversion), ...]
        except ValueError as err:
            raise ValueError(f"prompt_template {template!r}: {err}") from None
        if not parsed or parsed[-1][1] != "output":
            raise ValueError(f"prompt_template {template!r} must end with '{{output}}': the answer-only loss "
                             "splits the template into the prompt before {output} and the answer")
        segments = []
        for literal, name, spec, conversion in parsed[:-1]:
            if name is not None and (not name.isidentifier() or spec or conversion):
                raise ValueError(f"prompt_template {template!r}: placeholders must be plain {{field}} names, "
                                 f"got {{{name}{'!' + conversion if conversion else ''}"
                                 f"{':' + spec if spec else ''}}}")
            if name == "output":
                raise ValueError(f"prompt_template {template!r}: {{output}} may appear only once, at the end")
            segments.append((literal, name))
        # The text right before {output}: its trailing whitespace becomes the separator (class docstring).
        before_output = parsed[-1][0]
        stripped = before_output.rstrip()
        segments.append((stripped, None))
        return cls(template, tuple(segments), before_output[len(stripped):])


def _token_upper_bound(text: str) -> int:
    """A cheap bound on ``len(tokenizer.encode(text))`` without tokenizing.

    Every byte-level BPE token stands for at least one byte of UTF-8 text (a sentencepiece tokenizer may
    also add one "dummy prefix" token), so the token count is at most the byte count + 1.
    """
    return len(text.encode("utf-8")) + 1 if text else 0


@dataclass
class _Encoded:
    prompt_ids: list[int]
    answer_ids: list[int]
    prompt_text: str
    truncated: bool


def read_jsonl(path: str | Path, required: Sequence[str]) -> list[tuple[int, dict]]:
    """Parse a jsonl file strictly; return ``(line number, record)`` pairs.

    Every problem raises ``ValueError("<file>:<line>: ...")`` -- nothing is skipped silently, because a
    silently dropped example is a bug nobody sees. ``required`` are the keys that must be strings
    (``output`` must also be non-blank); ``answers``, when present, must be a list of non-empty strings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: jsonl file not found")
    examples = []
    # Read bytes and split on b"\n" only: JSON escapes newlines inside strings, whereas text-mode
    # ``splitlines`` would also break on characters like U+2028 that ensure_ascii=False leaves raw.
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                raise ValueError(f"{where}: blank line (one JSON object per line; only a final newline "
                                 "is allowed)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for key in required:
                if key not in record:
                    raise ValueError(f"{where}: missing field {key!r} (the prompt template needs "
                                     f"{', '.join(map(repr, required))})")
                if not isinstance(record[key], str):
                    raise ValueError(f"{where}: field {key!r} must be a string, "
                                     f"got {type(record[key]).__name__}")
            if not record["output"].strip():
                raise ValueError(f"{where}: empty 'output' (nothing to learn)")
            answers = record.get("answers")
            if answers is not None and not (isinstance(answers, list) and answers
                                            and all(isinstance(a, str) and a for a in answers)):
                raise ValueError(f"{where}: 'answers' must be a non-empty list of non-empty strings")
            examples.append((lineno, record))
    if not examples:
        raise ValueError(f"{path}:1: empty file, expected one JSON object per line")
    return examples


def _check_probabilities(probabilities: Sequence[float], num_files: int) -> list[float]:
    probabilities = [float(p) for p in probabilities]
    if len(probabilities) != num_files:
        raise ValueError(f"concat_sampling_probabilities has {len(probabilities)} values for {num_files} "
                         "files; give one probability per file")
    if any(p < 0 for p in probabilities):
        raise ValueError(f"concat_sampling_probabilities must be >= 0, got {probabilities}")
    if abs(sum(probabilities) - 1.0) > 1e-6:
        raise ValueError(f"concat_sampling_probabilities must sum to 1 (within 1e-6), got {probabilities} "
                         f"(sum {sum(probabilities)})")
    return probabilities


def allocate_samples(num_samples: int, probabilities: Sequence[float]) -> list[int]:
    """Split ``num_samples`` into per-file counts proportional to ``probabilities``, summing exactly.

    Largest-remainder rounding: everybody gets ``floor(p * n)``, the leftovers go to the largest
    fractional parts (ties to the earlier file). So 10 samples at [0.75, 0.25] give [8, 2] every time.
    """
    exact = [p * num_samples for p in probabilities]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: num_samples - sum(counts)]:
        counts[i] += 1
    return counts


def build_sample_index(file_sizes: Sequence[int], probabilities: Sequence[float], num_samples: int,
                       seed: int) -> list[tuple[int, int]]:
    """``num_samples`` (file, row) pairs mixing the files by ``probabilities``, reproducible from ``seed``.

    Each file contributes its exact share (see ``allocate_samples``), walking through seeded permutations
    of its rows (a file asked for more rows than it has is repeated, epoch by epoch); then the draws of all
    files are shuffled together, so a batch mixes them too.
    """
    rng = random.Random(seed)
    draws = []
    for f, (size, count) in enumerate(zip(file_sizes, allocate_samples(num_samples, probabilities))):
        rows: list[int] = []
        while len(rows) < count:
            epoch = list(range(size))
            rng.shuffle(epoch)
            rows.extend(epoch)
        draws.extend((f, row) for row in rows[:count])
    rng.shuffle(draws)
    return draws


class SFTDataset(Dataset):
    """Prompt/answer examples from jsonl files, tokenized for causal-LM fine-tuning.

    Each item is a dict::

        input_ids   [bos] + prompt ids + answer ids + [eos]        (at most ``max_seq_length`` ids)
        labels      -100 on bos and prompt, the ids on answer + eos (or a copy of input_ids when
                    ``answer_only_loss=False``); aligned with input_ids, not shifted
        prompt_len  how many leading ids are prompt (bos included): input_ids[:prompt_len] is what a
                    generator is fed at evaluation time
        prompt      the prompt text (after truncation), output / answers / input / id: the raw fields

    ``num_truncated`` is how many examples (file lines) are longer than ``max_seq_length`` and get their
    ``truncation_field`` body cut; it is logged once as a warning when not zero. ``context_splitter``
    says which part of that field may be cut (``squad.split_context``: the context, never the question).
    ``limit`` keeps the first N examples (after mixing, when ``num_samples`` is given).
    ``prompt_format`` rewrites the rendered prompt, given as (prefix, truncatable body, suffix): e.g.
    ``squad.chat_format(tokenizer)`` puts it into the base model's chat template.

    Examples are read and validated when the dataset is built (errors name file and line) and tokenized
    lazily in ``__getitem__`` -- tokenizing all of SQuAD train up front would take half a minute. Which
    examples need truncation is still known up front: an example whose UTF-8 byte count already fits in
    ``max_seq_length`` cannot have more tokens than that, so only the few long ones are tokenized early.
    """

    def __init__(
        self,
        file_names: str | Path | Sequence[str | Path],
        tokenizer: TokenizerLike,
        max_seq_length: int = 2048,
        prompt_template: str = "{input} {output}",
        add_bos: bool = False,
        add_eos: bool = True,
        truncation_field: str | None = "input",
        answer_only_loss: bool = True,
        concat_sampling_probabilities: Sequence[float] | None = None,
        num_samples: int | None = None,
        seed: int = 1234,
        limit: int | None = None,
        context_splitter: ContextSplitter = whole_text_is_body,
        prompt_format: PromptFormat | None = None,
    ) -> None:
        if isinstance(file_names, (str, Path)):
            file_names = [file_names]
        self.file_names = [Path(f) for f in file_names]
        if not self.file_names:
            raise ValueError("SFTDataset needs at least one jsonl file")
        if max_seq_length < 1:
            raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.template = PromptTemplate.parse(prompt_template)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.answer_only_loss = answer_only_loss
        self.truncation_field = self._check_truncation_field(truncation_field)
        self.context_splitter = context_splitter
        self.prompt_format = prompt_format
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit}")
        if concat_sampling_probabilities is not None:  # validate before the (slower) file reading
            concat_sampling_probabilities = _check_probabilities(concat_sampling_probabilities,
                                                                 len(self.file_names))
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")

        self.examples = [read_jsonl(f, self.template.fields) for f in self.file_names]
        sizes = [len(rows) for rows in self.examples]
        if concat_sampling_probabilities is None and num_samples is None:
            self.index = [(f, row) for f, size in enumerate(sizes) for row in range(size)]
        else:  # without explicit probabilities, files are weighted by their sizes
            probabilities = concat_sampling_probabilities or [size / sum(sizes) for size in sizes]
            self.index = build_sample_index(sizes, probabilities, num_samples or sum(sizes), seed)
        self.index = self.index[:limit]  # the first ``limit`` examples (all when None)

        self.num_truncated = self._count_truncated()
        if self.num_truncated:
            logger.warning("%s: %d of %d examples are longer than max_seq_length=%d tokens; the end of their "
                           "%r body is cut", ", ".join(f.name for f in self.file_names), self.num_truncated,
                           len(set(self.index)), max_seq_length, self.truncation_field)

    def _check_truncation_field(self, field: str | None) -> str | None:
        names = [name for _, name in self.template.prompt_segments if name]
        if field is not None and names.count(field) != 1:
            raise ValueError(f"truncation_field {field!r} must appear exactly once in the prompt part of "
                             f"prompt_template {self.template.text!r}")
        return field

    def _where(self, f: int, row: int) -> str:
        return f"{self.file_names[f]}:{self.examples[f][row][0]}"

    def _count_truncated(self) -> int:
        """How many distinct examples (file lines) must be truncated; raises for those that cannot fit.

        Most examples are short enough in bytes to fit for certain. The others are tokenized here, a
        chunk at a time (the Rust tokenizer's ``encode_batch`` counts 20,000 SQuAD examples in a few
        seconds, where one ``encode`` call each took ten; chunks keep its large output small), and only
        those really too long go through ``_encode``."""
        specials = int(self.add_bos) + int(self.add_eos)
        candidates = []
        for f, row in sorted(set(self.index)):
            if sum(map(_token_upper_bound, self._pieces(f, row))) + specials > self.max_seq_length:
                candidates.append((f, row))  # may not fit: count its tokens
        too_long = []
        for start in range(0, len(candidates), 128):
            chunk = candidates[start:start + 128]
            counts = [len(ids) for ids in self._encode_many([p for where in chunk for p in self._pieces(*where)])]
            too_long += [where for i, where in enumerate(chunk)
                         if sum(counts[4 * i:4 * i + 4]) + specials > self.max_seq_length]
        return sum(self._encode(f, row).truncated for f, row in too_long)

    def _pieces(self, f: int, row: int) -> list[str]:
        """The four texts ``_encode`` tokenizes: prompt prefix, truncatable body, suffix, answer."""
        record = self.examples[f][row][1]
        return [*self._render_prompt(record), self.template.separator + record["output"]]

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text (empty text: no ids), batched when the tokenizer can batch."""
        batch = getattr(self.tokenizer, "encode_batch", None)
        ids = batch(texts) if batch is not None else [self.tokenizer.encode(t) if t else [] for t in texts]
        return [i if t else [] for i, t in zip(ids, texts)]

    def _render_prompt(self, record: dict) -> tuple[str, str, str]:
        """The prompt as (prefix, truncatable body, suffix) text."""
        left, right, body = [], [], ""
        side = left
        for literal, name in self.template.prompt_segments:
            side.append(literal)
            if name is None:
                continue
            if name == self.truncation_field:
                head, body, tail = self.context_splitter(record[name])
                left.append(head)
                side = right
                side.append(tail)
            else:
                side.append(record[name])
        pieces = "".join(left), body, "".join(right)
        return self.prompt_format(*pieces) if self.prompt_format else pieces

    def _encode(self, f: int, row: int) -> _Encoded:
        """Tokenize one example piece by piece, cutting the body's last tokens if the whole is too long."""
        record = self.examples[f][row][1]
        tok = self.tokenizer
        prefix, body, suffix = self._render_prompt(record)
        encode = lambda text: tok.encode(text) if text else []  # noqa: E731 (encode("") -> [])
        prefix_ids, body_ids, suffix_ids = encode(prefix), encode(body), encode(suffix)
        answer_ids = encode(self.template.separator + record["output"])
        bos = [tok.bos_id] if self.add_bos else []
        eos = [tok.eos_id] if self.add_eos else []
        fixed = len(bos) + len(prefix_ids) + len(suffix_ids) + len(answer_ids) + len(eos)
        room = self.max_seq_length - fixed
        if room < 0:
            raise ValueError(f"{self._where(f, row)}: example does not fit in max_seq_length="
                             f"{self.max_seq_length} even with an empty {self.truncation_field!r} body "
                             f"({fixed} tokens outside it); raise max_seq_length or shorten the example")
        truncated = len(body_ids) > room
        if truncated:
            body_ids = body_ids[:room]
            body = tok.decode(body_ids)
        return _Encoded(bos + prefix_ids + body_ids + suffix_ids, answer_ids + eos, prefix + body + suffix,
                        truncated)

    def __len__(self) -> int:
        return len(self.index)

    def token_length(self, i: int, with_answer: bool = True) -> int:
        """How many tokens item ``i`` has (its prompt alone unless ``with_answer``): what ordering examples
        by length needs. Tokenizes the one example, so it is cheap enough to call on demand."""
        f, row = self.index[i]
        encoded = self._encode(f, row)
        return len(encoded.prompt_ids) + (len(encoded.answer_ids) if with_answer else 0)

    def indices_by_length(self) -> list[int]:
        """Item indices ordered by prompt length: batches of neighbours need little padding, which is
        what batched generation wants."""
        return sorted(range(len(self.index)), key=lambda i: self.token_length(i, with_answer=False))

    def __getitem__(self, i: int) -> dict[str, Any]:
        f, row = self.index[i]
        record = self.examples[f][row][1]
        enc = self._encode(f, row)
        input_ids = enc.prompt_ids + enc.answer_ids
        if self.answer_only_loss:
            labels = [IGNORE_INDEX] * len(enc.prompt_ids) + list(enc.answer_ids)
        else:
            labels = list(input_ids)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "prompt_len": len(enc.prompt_ids),
            "prompt": enc.prompt_text,
            "truncated": enc.truncated,
            "input": record.get("input"),
            "output": record["output"],
            "answers": list(record.get("answers") or [record["output"]]),
            "id": record.get("id"),
        }


class SFTCollator:
    """Stack items into right-padded tensors, as long as the longest item of the batch (dynamic padding).

    Right padding suits training: real tokens start at position 0 so positions match those of an unpadded
    sequence, and the padded tail is excluded twice -- ``attention_mask`` 0 and ``labels`` -100.
    (Batched *generation* wants left padding instead, so all prompts end at the same column.)
    ``pad_to_multiple_of`` rounds the length up: on a CPU, oneDNN compiles a matrix-multiply kernel for
    every new shape (tens of milliseconds each), so a few dozen lengths are much faster than hundreds.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: Sequence[dict]) -> dict[str, Any]:
        if not batch:
            raise ValueError("SFTCollator: empty batch")
        longest = max(len(item["input_ids"]) for item in batch)
        longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of  # round up
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for b, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[b, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.tensor(item["labels"], dtype=torch.long)
            attention_mask[b, :n] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "prompt_lens": torch.tensor([item["prompt_len"] for item in batch], dtype=torch.long),
            "prompts": [item["prompt"] for item in batch],
            "answers": [item["answers"] for item in batch],
            "outputs": [item["output"] for item in batch],
        }
