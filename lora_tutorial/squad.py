"""SQuAD v1.1: getting the files, the prompt format, and the splits the tutorial trains and measures on.

The pipeline::

    train-v1.1.json / dev-v1.1.json        download (sha256-checked) or copy from a local folder
            |  prepare_squad()
            v
    data/SQuAD/squad_*.jsonl               NeMo's files: all of train and dev, and the first 200 / 20
    data/SQuAD/splits/*.jsonl              the tutorial's honest splits (see below)
    one JSON object per line: {"input": "User: Context: ... Question: ...\\n\\nAssistant:",
                               "output": "<first gold answer>", "answers": [...], "id": ...}

**Why three splits.** SQuAD lists questions article by article, so the first 500 dev questions all
come from one article (Super Bowl 50) and say little about SQuAD as a whole. And a score is only honest
on questions nobody used to choose settings. So ``prepare_squad`` also writes

* ``splits/validation.jsonl``: 500 questions drawn from 50 *training* articles that no training file
  uses. Every setting of the default recipe was chosen on these, and training validates on them.
* ``splits/test.jsonl``: 1,000 development questions drawn from all 48 dev articles. Never used to
  choose anything; the README's scores come from here.
* ``splits/train.jsonl``: every training question from the other 392 articles.

Samples are stratified (each article contributes in proportion to its size) and then shuffled with a
fixed seed, so that *any prefix* of a split is itself a random sample across articles: a notebook that
evaluates ``test.jsonl[:200]`` gets a smaller but still unbiased test. ``splits/manifest.json`` records
the seeds, the articles and every question id.

This module is the one owner of the prompt format (``format_prompt`` and its inverses).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .files import atomic_write, write_json, write_jsonl
from .progress import progress_bar
from .sft_data import allocate_samples

# --------------------------------------------------------------------------------------------------
# The prompt format (NeMo's SQuAD tutorial format)
# --------------------------------------------------------------------------------------------------

_USER, _ASSISTANT = "User: ", "\n\nAssistant:"
# The truncatable part of a prompt is the context, between these two markers. The body keeps its leading
# space (" The city ...") and the tail starts with " Question:", so each cut falls where the BPE
# pre-tokenizer splits anyway and tokenizing the pieces separately equals tokenizing the whole.
# The tail is the *last* " Question:": a context may quote one (SQuAD has Kant's "Answering the Question:
# What is Enlightenment?"), the question itself comes after the context.
_CONTEXT = re.compile(r"^(?P<head>.*?Context:)(?P<body>.*)(?P<tail> Question:.*)$", re.DOTALL)


def format_prompt(context: str, question: str) -> str:
    """``"User: Context: <context> Question: <question>\\n\\nAssistant:"``.

    Stray whitespace around the context and question is removed: about 3 % of SQuAD questions end with
    a space, which would otherwise land right before the answer cue.
    """
    return f"{_USER}Context: {context.strip()} Question: {question.strip()}{_ASSISTANT}"


def split_context(text: str) -> tuple[str, str, str]:
    """Split a prompt into (head, context body, tail) so that only the body may be shortened.

    ``SFTDataset`` takes this as its ``context_splitter``: a prompt too long for ``max_seq_length`` loses
    the end of its context, never the question. Text without the markers is all body.
    """
    match = _CONTEXT.match(text)
    if match is None:
        return "", text, ""
    return match["head"], match["body"], match["tail"]


def question_of(prompt: str) -> str:
    """The question of a prompt (the whole text when it has no "Question:" marker)."""
    start = prompt.rfind("Question:")
    if start < 0:
        return prompt
    return prompt[start + len("Question:"):].removesuffix(_ASSISTANT).strip()


def chat_wrapping(tokenizer) -> tuple[str, str]:
    """The text ``tokenizer``'s chat template puts before and after one user message (up to the reply)."""
    before, after = tokenizer.apply_chat_template([{"role": "user", "content": "\0"}]).split("\0")
    return before, after


def chat_format(tokenizer) -> Callable[[str, str, str], tuple[str, str, str]]:
    """A ``prompt_format`` for ``SFTDataset``: the prompt as one user message of ``tokenizer``'s chat
    template, the answer as the assistant's reply (the format an instruct model was trained on)."""
    before, after = chat_wrapping(tokenizer)

    def reformat(prefix: str, body: str, suffix: str) -> tuple[str, str, str]:
        # SQuAD's own "User: " / "Assistant:" markers give way to the template's. They sit at the two ends
        # of the prompt, whichever pieces those are (a prompt that was not split is all prefix or body).
        pieces = [prefix, body, suffix]
        filled = [i for i, piece in enumerate(pieces) if piece] or [0]
        pieces[filled[0]] = pieces[filled[0]].removeprefix(_USER)
        pieces[filled[-1]] = pieces[filled[-1]].removesuffix(_ASSISTANT).rstrip()
        return before + pieces[0], pieces[1], pieces[2] + after
    return reformat


def chat_message(prompt: str) -> str:
    """A prompt as the content of one chat message ("Context: ... Question: ..."), for the base model's
    chat template: the fair way to ask an instruct model zero-shot."""
    return prompt.removeprefix(_USER).removesuffix(_ASSISTANT).strip()


# --------------------------------------------------------------------------------------------------
# Acquisition: download (checked against the official sha256) or copy from a local folder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SquadFile:
    """One official SQuAD v1.1 file: where it lives, its checksum and what it must contain."""

    split: str  # "train" or "dev"
    filename: str
    url: str
    sha256: str
    num_questions: int
    num_articles: int


_EXPLORER = "https://rajpurkar.github.io/SQuAD-explorer/dataset"
SQUAD_FILES: dict[str, SquadFile] = {
    "train": SquadFile("train", "train-v1.1.json", f"{_EXPLORER}/train-v1.1.json",
                       "3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955", 87_599, 442),
    "dev": SquadFile("dev", "dev-v1.1.json", f"{_EXPLORER}/dev-v1.1.json",
                     "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9", 10_570, 48),
}
SQUAD_SOURCE_ENV = "SQUAD_SOURCE_DIR"  # environment variable naming a folder with local SQuAD copies


def download_file(url: str, dest: str | Path, sha256: str | None = None, chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest`` with a progress bar, checking the sha256 of the bytes if given.

    The checksum is computed while streaming, before the file is renamed into place, so a corrupted or
    tampered download raises ``ValueError`` and leaves nothing behind.
    """
    dest = Path(dest)
    digest = hashlib.sha256()
    with urllib.request.urlopen(url) as response, atomic_write(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with progress_bar(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := response.read(chunk_size):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(f"checksum mismatch for {url}: sha256 {digest.hexdigest()}, expected {sha256}; "
                             f"the download was discarded (nothing written to {dest})")
    return dest


def _find_local_copy(source: Path, filename: str) -> Path:
    """``<source>/<filename>`` or its gzipped twin ``<filename>.gz``."""
    for candidate in (source / filename, source / f"{filename}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{source}: neither {filename} nor {filename}.gz found in the SQuAD source folder")


def _read_maybe_gzipped(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def _parse_json_bytes(raw: bytes, path: Path) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def copy_local_squad(source_file: Path, dest: Path, spec: SquadFile) -> Path:
    """Copy (and gunzip) a local SQuAD file to ``dest`` after checking its structure and counts.

    A local copy may legitimately differ byte-for-byte from the official file (the shared copy is a
    faithful reconstruction, see its SOURCE.md), so it is validated by *content*: the v1.1 JSON structure
    and the official numbers of articles and questions.
    """
    raw = _read_maybe_gzipped(source_file)
    validate_squad(_parse_json_bytes(raw, source_file), spec, source_file)
    with atomic_write(dest, "wb") as out:
        out.write(raw)
    return dest


def download_squad(data_dir: str | Path, source: str | Path | None = None) -> dict[str, Path]:
    """Get ``train-v1.1.json`` and ``dev-v1.1.json`` into ``<data_dir>/SQuAD/``; return their paths.

    Files already present are kept. Otherwise they are copied from ``source`` (or the folder in the
    ``SQUAD_SOURCE_DIR`` environment variable) when one is given -- plain ``.json`` or ``.json.gz`` --
    and downloaded from the SQuAD explorer site, with the official sha256 checked, when none is.
    """
    squad_dir = Path(data_dir) / "SQuAD"
    source = source if source is not None else os.environ.get(SQUAD_SOURCE_ENV) or None
    paths = {}
    for split, spec in SQUAD_FILES.items():
        dest = squad_dir / spec.filename
        if dest.exists():
            print(f"{dest}: already present, kept")
        elif source is not None:
            local = _find_local_copy(Path(source), spec.filename)
            print(f"{dest}: copying from {local}")
            copy_local_squad(local, dest, spec)
        else:
            print(f"{dest}: downloading {spec.url}")
            try:
                download_file(spec.url, dest, sha256=spec.sha256)
            except urllib.error.URLError as err:  # no network, a proxy, a 404 ...
                raise FileNotFoundError(
                    f"{dest}: could not download {spec.url} ({err}); without network access, put "
                    f"{spec.filename} (or {spec.filename}.gz) in a folder and pass it as --source or in "
                    f"the {SQUAD_SOURCE_ENV} environment variable") from err
        paths[split] = dest
    return paths


def validate_squad(squad: Any, spec: SquadFile, path: str | Path) -> None:
    """Check the SQuAD v1.1 layout ``data[].paragraphs[].qas[].answers[].text`` and the official counts."""
    def fail(where: str, what: str) -> None:
        raise ValueError(f"{path}: not a SQuAD v1.1 {spec.split} file: {where}: {what}")

    if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
        fail("top level", "expected an object with a 'data' list")
    num_questions = 0
    for a, article in enumerate(squad["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            fail(f"data[{a}]", "expected an object with a 'paragraphs' list")
        for p, paragraph in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph.get("context"), str) or not isinstance(paragraph.get("qas"), list):
                fail(where, "expected a 'context' string and a 'qas' list")
            for q, qa in enumerate(paragraph["qas"]):
                answers = qa.get("answers")
                if not isinstance(qa.get("question"), str) or not isinstance(qa.get("id"), str):
                    fail(f"{where}.qas[{q}]", "expected 'question' and 'id' strings")
                if not answers or not all(isinstance(x, dict) and isinstance(x.get("text"), str) and x["text"]
                                          for x in answers):
                    fail(f"{where}.qas[{q}]", "expected a non-empty 'answers' list of {'text': ...}")
                num_questions += 1
    counts = (len(squad["data"]), num_questions)
    if counts != (spec.num_articles, spec.num_questions):
        fail("counts", f"{counts[0]:,} articles / {counts[1]:,} questions, "
                       f"expected {spec.num_articles:,} / {spec.num_questions:,}")


def load_squad(path: str | Path, split: str) -> dict:
    """Read and validate an official-format SQuAD v1.1 JSON file (``split`` is "train" or "dev")."""
    path = Path(path)
    squad = _parse_json_bytes(_read_maybe_gzipped(path), path)
    validate_squad(squad, SQUAD_FILES[split], path)
    return squad


# --------------------------------------------------------------------------------------------------
# SQuAD JSON -> SFT records, and the splits
# --------------------------------------------------------------------------------------------------


def squad_to_records(squad: dict, with_answers: bool = True) -> list[list[dict]]:
    """SFT records grouped by article, in file order: train on ``answers[0]``, keep all golds for EM/F1.

    Besides NeMo's ``input`` and ``output``, each record keeps the question ``id`` and the article
    ``title`` (for looking at results by article); the dataset reads only the fields its template names.
    """
    articles = []
    for article in squad["data"]:
        records = []
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                golds = [answer["text"] for answer in qa["answers"]]
                record = {"input": format_prompt(paragraph["context"], qa["question"]), "output": golds[0]}
                if with_answers:
                    record["answers"] = golds
                record["id"] = qa["id"]
                record["title"] = article.get("title", "")
                records.append(record)
        articles.append(records)
    return articles


def stratified_sample(articles: Sequence[Sequence[dict]], n: int, seed: int) -> list[dict]:
    """``n`` records drawn from ``articles`` in proportion to their sizes, then shuffled (seeded).

    Every article contributes ``round(n * size / total)`` questions (largest remainders, so the counts
    add up to ``n``); the result is shuffled so that any prefix is a random sample across articles.
    """
    total = sum(len(a) for a in articles)
    if not 0 < n <= total:
        raise ValueError(f"stratified_sample: cannot draw {n} of {total} records")
    rng = random.Random(seed)
    drawn = []
    for records, count in zip(articles, allocate_samples(n, [len(a) / total for a in articles])):
        drawn += rng.sample(list(records), count)
    rng.shuffle(drawn)
    return drawn


SHORT_TRAIN_SIZE, SHORT_VAL_SIZE = 200, 20  # NeMo tutorial's quick subsets: the first N questions
VALIDATION_ARTICLES, VALIDATION_SIZE, TEST_SIZE = 50, 500, 1000
VALIDATION_SEED, TEST_SEED = 2016, 2018


def make_splits(train_articles: list[list[dict]], dev_articles: list[list[dict]]) -> tuple[dict[str, list[dict]], dict]:
    """The tutorial's train / validation / test splits (module docstring) and their manifest.

    Validation articles are drawn from the training articles that the NeMo short subset does not
    touch (it is the first 200 questions, so the first article); the training split is every other
    training article.
    """
    used_by_short, seen = 0, 0
    while seen < SHORT_TRAIN_SIZE:
        seen += len(train_articles[used_by_short])
        used_by_short += 1
    candidates = list(range(used_by_short, len(train_articles)))
    held_out = sorted(random.Random(VALIDATION_SEED).sample(candidates, VALIDATION_ARTICLES))
    validation = stratified_sample([train_articles[a] for a in held_out], VALIDATION_SIZE, VALIDATION_SEED)
    train = [r for a, records in enumerate(train_articles) if a not in held_out for r in records]
    test = stratified_sample(dev_articles, TEST_SIZE, TEST_SEED)
    manifest = {
        "validation": {"seed": VALIDATION_SEED, "from": "train-v1.1.json",
                       "articles": [train_articles[a][0]["title"] for a in held_out],
                       "ids": [r["id"] for r in validation]},
        "test": {"seed": TEST_SEED, "from": "dev-v1.1.json", "articles": len(dev_articles),
                 "ids": [r["id"] for r in test]},
        "train": {"from": "train-v1.1.json", "articles": len(train_articles) - len(held_out),
                  "questions": len(train)},
    }
    return {"train": train, "validation": validation, "test": test}, manifest


def prepare_squad(data_dir: str | Path = "data", source: str | Path | None = None) -> dict[str, Path]:
    """Download or copy SQuAD v1.1, then write every jsonl file the tutorial uses; return their paths.

    Keys: ``train``, ``val`` (all of dev), ``short_train``, ``short_val`` (NeMo's files) and
    ``split_train``, ``split_validation``, ``split_test`` (the tutorial's splits). Running it again
    rewrites the same bytes: every sample is seeded.
    """
    raw = download_squad(data_dir, source=source)
    squad_dir = Path(data_dir) / "SQuAD"
    train_articles = squad_to_records(load_squad(raw["train"], "train"), with_answers=False)
    dev_articles = squad_to_records(load_squad(raw["dev"], "dev"), with_answers=True)
    train = [r for records in train_articles for r in records]
    dev = [r for records in dev_articles for r in records]
    with_golds = [[{**r, "answers": [r["output"]]} for r in records] for records in train_articles]
    splits, manifest = make_splits(with_golds, dev_articles)
    outputs = {
        "train": (train, squad_dir / "squad_train.jsonl"),
        "val": (dev, squad_dir / "squad_val.jsonl"),
        "short_train": (train[:SHORT_TRAIN_SIZE], squad_dir / "squad_short_train.jsonl"),
        "short_val": (dev[:SHORT_VAL_SIZE], squad_dir / "squad_short_val.jsonl"),
        **{f"split_{name}": (records, squad_dir / "splits" / f"{name}.jsonl") for name, records in splits.items()},
    }
    paths = {}
    for name, (records, path) in outputs.items():
        paths[name] = write_jsonl(records, path)
        print(f"{name:>16}: {len(records):>6,} questions -> {path}")
    write_json(manifest, squad_dir / "splits" / "manifest.json")
    return paths


__all__ = ["format_prompt", "split_context", "question_of", "chat_message", "chat_format", "chat_wrapping",
           "prepare_squad", "download_squad", "load_squad", "stratified_sample", "make_splits", "SQUAD_FILES"]
