"""Data pipeline tests: acquisition, SQuAD preprocessing, the SFT dataset and its collator.

The dataset tests use a tiny byte-level BPE tokenizer trained here with Hugging Face ``tokenizers`` -- the
same kind of tokenizer as SmolLM2's, so the BPE boundary effects are real, without loading the model.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader

from lora_tutorial import data
from lora_tutorial.data import IGNORE_INDEX, SFTCollator, SFTDataset, prepare_squad

# The offline copy of SQuAD lives next to the repository (../shared/data/squad); SQUAD_SOURCE_DIR overrides.
SHARED_SQUAD = Path(os.environ.get("SQUAD_SOURCE_DIR")
                    or Path(__file__).resolve().parents[2] / "shared" / "data" / "squad")

# --------------------------------------------------------------------------------------------------
# A tiny real tokenizer
# --------------------------------------------------------------------------------------------------

CORPUS = [
    "User: Context: The Broncos defeated the Panthers in Super Bowl 50 at Levi's Stadium in Santa Clara.",
    "Question: Which team won Super Bowl 50?\n\nAssistant: Denver Broncos",
    "Architecturally, the school has a Catholic character. Atop the Main Building's gold dome is a statue.",
    "Question: What sits on top of the Main Building?\n\nAssistant: a golden statue of the Virgin Mary",
    "The city of Paris is the capital of France, on the Seine river, with about two million people.",
]


class TinyTokenizer:
    """The tokenizer interface of ``lora_tutorial.tokenizer`` (encode/decode, bos/eos/pad ids)."""

    def __init__(self) -> None:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(CORPUS, trainer)
        self.backend = backend
        self.pad_id, self.bos_id, self.eos_id = (backend.token_to_id(t) for t in ["<pad>", "<s>", "</s>"])

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


@pytest.fixture(scope="module")
def tok() -> TinyTokenizer:
    return TinyTokenizer()


def squad_input(context: str, question: str) -> str:
    return f"User: Context: {context} Question: {question}\n\nAssistant:"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r, ensure_ascii=False) for r in records])


def labelled(item: dict) -> list[int]:
    return [t for t in item["labels"] if t != IGNORE_INDEX]


# --------------------------------------------------------------------------------------------------
# Acquisition: local copies, download with a file:// URL
# --------------------------------------------------------------------------------------------------


def tiny_squad(num_articles: int, questions_per_article: int) -> dict:
    """A structurally valid SQuAD v1.1 object with known counts."""
    articles = []
    for a in range(num_articles):
        context = f"Article {a} says the answer is answer{a}."
        qas = [{"answers": [{"answer_start": context.index("answer"), "text": f"answer{a}"}],
                "question": f"What does article {a} say, take {q}? ", "id": f"q{a}-{q}"}
               for q in range(questions_per_article)]
        articles.append({"title": f"T{a}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"data": articles, "version": "1.1"}


@pytest.fixture
def tiny_squad_files(tmp_path, monkeypatch):
    """Tiny train (3 articles x 2 questions, gzipped) and dev (2 x 1, plain) sources, with SQUAD_FILES
    patched to expect those counts and to download from file:// URLs."""
    source = tmp_path / "source"
    source.mkdir()
    train_bytes = json.dumps(tiny_squad(3, 2)).encode()
    dev_bytes = json.dumps(tiny_squad(2, 1)).encode()
    (source / "train-v1.1.json.gz").write_bytes(gzip.compress(train_bytes))
    (source / "dev-v1.1.json").write_bytes(dev_bytes)
    (source / "train-v1.1.json").write_bytes(train_bytes)  # a plain twin for the download tests
    for split, raw, counts in [("train", train_bytes, (6, 3)), ("dev", dev_bytes, (2, 2))]:
        spec = data.SQUAD_FILES[split]
        monkeypatch.setitem(data.SQUAD_FILES, split, dataclasses.replace(
            spec, url=(source / spec.filename).as_uri(), sha256=hashlib.sha256(raw).hexdigest(),
            num_questions=counts[0], num_articles=counts[1]))
    monkeypatch.delenv(data.SQUAD_SOURCE_ENV, raising=False)
    return {"source": source, "train": train_bytes, "dev": dev_bytes}


def test_download_with_matching_checksum(tiny_squad_files, tmp_path):
    paths = data.download_squad(tmp_path / "d")
    assert paths["train"] == tmp_path / "d" / "SQuAD" / "train-v1.1.json"
    assert paths["train"].read_bytes() == tiny_squad_files["train"]
    assert paths["dev"].read_bytes() == tiny_squad_files["dev"]
    assert sorted(p.name for p in (tmp_path / "d" / "SQuAD").iterdir()) == ["dev-v1.1.json", "train-v1.1.json"]


def test_download_checksum_mismatch_leaves_nothing(tiny_squad_files, tmp_path, monkeypatch):
    spec = data.SQUAD_FILES["train"]
    monkeypatch.setitem(data.SQUAD_FILES, "train", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.download_squad(tmp_path / "d")
    assert list((tmp_path / "d" / "SQuAD").iterdir()) == []  # no file, no .part leftover


class BrokenResponse:
    """A response that delivers one chunk and then loses the connection."""

    headers = {"Content-Length": "1000"}

    def __init__(self) -> None:
        self.chunks = [b"x" * 100]

    def read(self, size: int) -> bytes:
        if not self.chunks:
            raise ConnectionResetError("connection lost")
        return self.chunks.pop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url: BrokenResponse())
    dest = tmp_path / "out" / "x.json"
    with pytest.raises(ConnectionResetError):
        data.download_file("https://example.invalid/x.json", dest)
    assert list(dest.parent.iterdir()) == []  # neither x.json nor the partial .part file


def test_missing_url_leaves_nothing(tmp_path):
    dest = tmp_path / "out" / "x.json"
    with pytest.raises(OSError):  # urllib.error.URLError
        data.download_file((tmp_path / "missing.json").as_uri(), dest)
    assert not dest.exists()


def test_present_files_are_skipped(tiny_squad_files, tmp_path, monkeypatch):
    squad_dir = tmp_path / "d" / "SQuAD"
    squad_dir.mkdir(parents=True)
    for name in ["train-v1.1.json", "dev-v1.1.json"]:
        (squad_dir / name).write_text("kept")
    for split in ["train", "dev"]:  # any fetch would now fail
        monkeypatch.setitem(data.SQUAD_FILES, split, dataclasses.replace(
            data.SQUAD_FILES[split], url=(tmp_path / "nowhere.json").as_uri()))
    data.download_squad(tmp_path / "d")
    assert (squad_dir / "train-v1.1.json").read_text() == "kept"


def test_local_source_plain_and_gzipped_via_env(tiny_squad_files, tmp_path, monkeypatch):
    (tiny_squad_files["source"] / "train-v1.1.json").unlink()  # only the .gz remains for train
    monkeypatch.setenv(data.SQUAD_SOURCE_ENV, str(tiny_squad_files["source"]))
    for split in ["train", "dev"]:  # prove that nothing is downloaded
        monkeypatch.setitem(data.SQUAD_FILES, split, dataclasses.replace(
            data.SQUAD_FILES[split], url=(tmp_path / "nowhere.json").as_uri()))
    paths = data.download_squad(tmp_path / "d")
    assert paths["train"].read_bytes() == tiny_squad_files["train"]  # gunzipped
    assert paths["dev"].read_bytes() == tiny_squad_files["dev"]


def test_local_source_with_wrong_counts_is_rejected(tiny_squad_files, tmp_path, monkeypatch):
    spec = data.SQUAD_FILES["dev"]
    monkeypatch.setitem(data.SQUAD_FILES, "dev", dataclasses.replace(spec, num_questions=3))
    with pytest.raises(ValueError, match="2 questions, expected 2 / 3"):
        data.download_squad(tmp_path / "d", source=tiny_squad_files["source"])
    assert not (tmp_path / "d" / "SQuAD" / "dev-v1.1.json").exists()
    assert [p.name for p in (tmp_path / "d" / "SQuAD").iterdir()] == ["train-v1.1.json"]


def test_local_source_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-v1.1.json.gz"):
        data.download_squad(tmp_path / "d", source=tmp_path)


def test_local_source_with_broken_structure(tiny_squad_files, tmp_path):
    broken = tiny_squad(2, 1)
    del broken["data"][1]["paragraphs"][0]["qas"][0]["answers"]
    (tiny_squad_files["source"] / "dev-v1.1.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"data\[1\]\.paragraphs\[0\]\.qas\[0\].*answers"):
        data.download_squad(tmp_path / "d", source=tiny_squad_files["source"])


def test_prepare_squad_on_tiny_files(tiny_squad_files, tmp_path):
    paths = prepare_squad(tmp_path / "d", source=tiny_squad_files["source"])
    val = [json.loads(line) for line in paths["val"].read_text().splitlines()]
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(train) == 6 and len(val) == 2
    # the question's trailing space is stripped; the record layout is the seed's (+ answers/id)
    assert val[1] == {"input": squad_input("Article 1 says the answer is answer1.",
                                           "What does article 1 say, take 0?"),
                      "output": "answer1", "answers": ["answer1"], "id": "q1-0"}
    assert set(train[0]) == {"input", "output", "id"}
    assert paths["short_train"].read_text() == paths["train"].read_text()  # fewer than 200 lines: all


# --------------------------------------------------------------------------------------------------
# Preprocessing the real SQuAD copy (a few seconds, once per module)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squad(tmp_path_factory):
    if not (SHARED_SQUAD / "dev-v1.1.json.gz").exists():  # a missing copy must fail, not skip
        pytest.fail(f"no local SQuAD copy at {SHARED_SQUAD}; set SQUAD_SOURCE_DIR")
    data_dir = tmp_path_factory.mktemp("data")
    paths = prepare_squad(data_dir, source=SHARED_SQUAD)
    return {"dir": data_dir, "paths": paths,
            "bytes": {name: path.read_bytes() for name, path in paths.items()}}


def read_jsonl_lines(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.decode("utf-8").split("\n")[:-1]]


@pytest.mark.slow
def test_squad_counts_and_short_subsets(squad):
    lines = {name: raw.decode("utf-8").split("\n") for name, raw in squad["bytes"].items()}
    for name, raw in squad["bytes"].items():
        assert raw.endswith(b"\n") and lines[name][-1] == ""  # one final newline, no blank line
    assert len(lines["train"]) - 1 == data.SQUAD_FILES["train"].num_questions == 87_599
    assert len(lines["val"]) - 1 == data.SQUAD_FILES["dev"].num_questions == 10_570
    assert lines["short_train"][:-1] == lines["train"][:200]
    assert lines["short_val"][:-1] == lines["val"][:20]


@pytest.mark.slow
def test_squad_val_lines_match_the_source(squad):
    squad_json = json.loads(gzip.decompress((SHARED_SQUAD / "dev-v1.1.json.gz").read_bytes()))
    expected = [(p["context"], qa) for article in squad_json["data"]
                for p in article["paragraphs"] for qa in p["qas"]]
    val = read_jsonl_lines(squad["bytes"]["val"])
    assert len(val) == len(expected)
    for line, (context, qa) in zip(val, expected):
        golds = [a["text"] for a in qa["answers"]]
        assert line == {"input": squad_input(context.strip(), qa["question"].strip()),
                        "output": golds[0], "answers": golds, "id": qa["id"]}
        assert all(gold in context for gold in line["answers"])


@pytest.mark.slow
def test_squad_every_val_answer_occurs_in_its_context(squad):
    for line in read_jsonl_lines(squad["bytes"]["val"]):
        context = line["input"][len("User: Context: "): line["input"].rindex(" Question: ")]
        assert all(gold in context for gold in line["answers"]), line["id"]


@pytest.mark.slow
def test_squad_prepare_is_idempotent(squad):
    paths = prepare_squad(squad["dir"], source=SHARED_SQUAD)
    assert {name: path.read_bytes() for name, path in paths.items()} == squad["bytes"]
    assert not [p for p in (squad["dir"] / "SQuAD").iterdir() if p.name.startswith(".")]  # no temp files


# --------------------------------------------------------------------------------------------------
# SFTDataset: template, labels, truncation
# --------------------------------------------------------------------------------------------------

BRONCOS = {"input": squad_input("The Broncos defeated the Panthers in Super Bowl 50.", "Which team won Super Bowl 50?"),
           "output": "Denver Broncos", "answers": ["Denver Broncos", "Broncos"], "id": "q1"}
STATUE = {"input": squad_input("Atop the Main Building's gold dome is a golden statue of the Virgin Mary.",
                               "What sits on top of the Main Building?"),
          "output": "a golden statue of the Virgin Mary"}


def test_label_mask_covers_exactly_the_answer(tok, tmp_path):
    ds = SFTDataset(write_records(tmp_path / "a.jsonl", [BRONCOS, STATUE]), tok)
    for item, record in zip(ds, [BRONCOS, STATUE]):
        prompt_len = item["prompt_len"]
        assert item["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]  # aligned, not shifted
        assert labelled(item)[-1] == tok.eos_id
        assert tok.decode(labelled(item)[:-1]) == " " + record["output"]
        assert tok.decode(item["input_ids"][:prompt_len]) == record["input"] == item["prompt"]
        # the pieces were tokenized separately, yet equal tokenizing the whole text at once
        assert item["input_ids"] == tok.encode(record["input"] + " " + record["output"]) + [tok.eos_id]
    assert ds[1]["answers"] == [STATUE["output"]]  # no "answers" field: the output is the only gold
    assert ds[0]["answers"] == BRONCOS["answers"] and ds[0]["id"] == "q1" and ds[0]["input"] == BRONCOS["input"]
    assert ds.num_truncated == 0


def test_bos_eos_and_full_loss(tok, tmp_path):
    path = write_records(tmp_path / "a.jsonl", [BRONCOS])
    plain = SFTDataset(path, tok)[0]
    bos = SFTDataset(path, tok, add_bos=True, add_eos=False)[0]
    assert bos["input_ids"] == [tok.bos_id] + plain["input_ids"][:-1]
    assert bos["prompt_len"] == plain["prompt_len"] + 1 and bos["labels"][0] == IGNORE_INDEX
    assert tok.decode(labelled(bos)) == " Denver Broncos"
    full = SFTDataset(path, tok, answer_only_loss=False)[0]
    assert full["labels"] == full["input_ids"] == plain["input_ids"]


def test_custom_template_with_other_fields(tok, tmp_path):
    record = {"question": "Which team won?", "context": "The Broncos won.", "output": "Broncos"}
    path = write_records(tmp_path / "a.jsonl", [record])
    ds = SFTDataset(path, tok, prompt_template="Q: {question}\nC: {context}\nA: {output}",
                    truncation_field="context")
    item = ds[0]
    assert item["prompt"] == "Q: Which team won?\nC: The Broncos won.\nA:"
    assert tok.decode(labelled(item)[:-1]) == " Broncos"
    assert item["input"] is None and item["answers"] == ["Broncos"]


@pytest.mark.parametrize("template, message", [
    ("{input}", "must end with '{output}'"),
    ("{output} {input}", "must end with '{output}'"),
    ("{input} {output} ", "must end with '{output}'"),
    ("{output} {input} {output}", "only once"),
    ("{input:>10} {output}", "plain {field} names"),
    ("{0} {output}", "plain {field} names"),
])
def test_bad_templates(tok, tmp_path, template, message):
    path = write_records(tmp_path / "a.jsonl", [BRONCOS])
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        SFTDataset(path, tok, prompt_template=template)


def test_truncation_field_must_be_in_the_template(tok, tmp_path):
    path = write_records(tmp_path / "a.jsonl", [BRONCOS])
    with pytest.raises(ValueError, match="truncation_field 'context'"):
        SFTDataset(path, tok, truncation_field="context")


def long_example(n_words: int, i: int) -> dict:
    context = " ".join(f"word{k}" for k in range(n_words)) + " The Broncos won."
    return {"input": squad_input(context, f"Which team won game {i}?"), "output": "the Denver Broncos"}


def test_truncation_keeps_question_and_answer(tok, tmp_path):
    records = [long_example(5, 0), long_example(60, 1), long_example(200, 2), BRONCOS]
    path = write_records(tmp_path / "a.jsonl", records)
    full = [SFTDataset(path, tok, max_seq_length=100_000)[i] for i in range(len(records))]
    max_len = len(full[0]["input_ids"]) + 10  # room for the shortest long example only
    assert len(full[1]["input_ids"]) > max_len and len(full[2]["input_ids"]) > max_len  # premise
    ds = SFTDataset(path, tok, max_seq_length=max_len)
    assert ds.num_truncated == 2
    for record, before, item in zip(records, full, ds):
        assert len(item["input_ids"]) <= max_len
        assert item["truncated"] == (len(before["input_ids"]) > max_len)
        # the answer (and EOS) are untouched
        assert labelled(item) == labelled(before)
        # the prompt is: the same prefix, a shortened context, the same question suffix
        prefix, rest = record["input"].split("Context:", 1)
        context, suffix = rest.split(" Question:", 1)
        assert item["prompt"].startswith(prefix + "Context:")
        assert item["prompt"].endswith(" Question:" + suffix)
        kept = item["prompt"][len(prefix + "Context:"): -len(" Question:" + suffix)]
        assert context.startswith(kept)  # cut from the end of the context only
        assert tok.decode(item["input_ids"][: item["prompt_len"]]) == item["prompt"]
        if item["truncated"]:
            assert len(item["input_ids"]) == max_len  # the context fills exactly the room left
        else:
            assert item["input_ids"] == before["input_ids"]


def test_truncation_of_a_plain_field(tok, tmp_path):
    record = {"input": "word " * 50 + "end", "output": "Broncos"}
    path = write_records(tmp_path / "a.jsonl", [record])
    item = SFTDataset(path, tok, max_seq_length=20)[0]
    assert len(item["input_ids"]) == 20
    assert record["input"].startswith(item["prompt"])
    assert tok.decode(labelled(item)[:-1]) == " Broncos"


def test_example_that_cannot_fit_names_file_and_line(tok, tmp_path):
    question = "Which " + "very " * 40 + "team won?"
    path = write_records(tmp_path / "long.jsonl", [BRONCOS, {"input": squad_input("short", question),
                                                             "output": "Broncos"}])
    with pytest.raises(ValueError, match=r"long\.jsonl:2: .*does not fit in max_seq_length=30"):
        SFTDataset(path, tok, max_seq_length=30)
    no_truncation = write_records(tmp_path / "b.jsonl", [long_example(100, 0)])
    with pytest.raises(ValueError, match=r"b\.jsonl:1: .*max_seq_length=30"):
        SFTDataset(no_truncation, tok, max_seq_length=30, truncation_field=None)


# --------------------------------------------------------------------------------------------------
# Several files: concatenation and sampling probabilities
# --------------------------------------------------------------------------------------------------


def tagged_files(tmp_path: Path, sizes: dict[str, int]) -> list[Path]:
    return [write_records(tmp_path / f"{name}.jsonl",
                          [{"input": f"Question {name}{i}?", "output": "yes", "id": f"{name}{i}"}
                           for i in range(size)])
            for name, size in sizes.items()]


def test_files_are_concatenated_in_order(tok, tmp_path):
    ds = SFTDataset(tagged_files(tmp_path, {"a": 3, "b": 2}), tok)
    assert [item["id"] for item in ds] == ["a0", "a1", "a2", "b0", "b1"]


def test_sampling_probabilities_mix_files(tok, tmp_path):
    files = tagged_files(tmp_path, {"a": 10, "b": 5})
    ds = SFTDataset(files, tok, concat_sampling_probabilities=[0.7, 0.3], num_samples=100, seed=7)
    ids = [item["id"] for item in ds]
    assert len(ids) == 100
    per_file = collections.Counter(i[0] for i in ids)
    assert per_file == {"a": 70, "b": 30}  # 0.7 * 100 and 0.3 * 100, exactly
    # each file is walked epoch by epoch: b's 5 rows appear 30 / 5 = 6 times each
    assert collections.Counter(i for i in ids if i[0] == "b") == {f"b{k}": 6 for k in range(5)}
    # deterministic with the seed, different with another seed, and the files are interleaved
    again = [item["id"] for item in SFTDataset(files, tok, concat_sampling_probabilities=[0.7, 0.3],
                                               num_samples=100, seed=7)]
    other = [item["id"] for item in SFTDataset(files, tok, concat_sampling_probabilities=[0.7, 0.3],
                                               num_samples=100, seed=8)]
    assert ids == again and ids != other
    assert any(i[0] == "b" for i in ids[:50])  # shuffled together, not 70 a's then 30 b's


def test_allocate_samples_uses_largest_remainders():
    # 10 * [0.75, 0.25] = [7.5, 2.5]: floors [7, 2], one left over, tie -> earlier file
    assert data.allocate_samples(10, [0.75, 0.25]) == [8, 2]
    # 7 * [0.5, 0.3, 0.2] = [3.5, 2.1, 1.4]: floors [3, 2, 1], one left -> largest remainder (0.5)
    assert data.allocate_samples(7, [0.5, 0.3, 0.2]) == [4, 2, 1]


@pytest.mark.parametrize("probabilities, message", [
    ([1.0], "1 values for 2 files"),
    ([0.6, 0.6], "must sum to 1"),
    ([0.5, 0.5 - 2e-6], "must sum to 1"),
    ([1.5, -0.5], ">= 0"),
])
def test_bad_sampling_probabilities(tok, tmp_path, probabilities, message):
    with pytest.raises(ValueError, match=message):
        SFTDataset(tagged_files(tmp_path, {"a": 2, "b": 2}), tok, concat_sampling_probabilities=probabilities)


def test_probabilities_within_tolerance_are_accepted(tok, tmp_path):
    ds = SFTDataset(tagged_files(tmp_path, {"a": 2, "b": 2}), tok, concat_sampling_probabilities=[0.5, 0.5 - 5e-7])
    assert len(ds) == 4  # no num_samples: as many draws as there are examples


# --------------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------------


def test_collate_right_pads_dynamically(tok, tmp_path):
    ds = SFTDataset(write_records(tmp_path / "a.jsonl", [BRONCOS, STATUE, long_example(3, 0)]), tok)
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=ds.collate_fn)))
    lengths = [len(item["input_ids"]) for item in ds]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    for b, item in enumerate(ds):
        n = lengths[b]
        assert batch["input_ids"][b, :n].tolist() == item["input_ids"]
        assert batch["labels"][b, :n].tolist() == item["labels"]
        assert batch["input_ids"][b, n:].eq(tok.pad_id).all()
        assert batch["labels"][b, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert batch["prompt_lens"].tolist() == [item["prompt_len"] for item in ds]
    assert batch["prompts"] == [BRONCOS["input"], STATUE["input"], long_example(3, 0)["input"]]
    assert batch["answers"] == [BRONCOS["answers"], [STATUE["output"]], ["the Denver Broncos"]]
    assert batch["outputs"] == [BRONCOS["output"], STATUE["output"], "the Denver Broncos"]


def test_collator_uses_the_given_pad_id(tok, tmp_path):
    ds = SFTDataset(write_records(tmp_path / "a.jsonl", [BRONCOS, STATUE]), tok)
    short, long = sorted([ds[0], ds[1]], key=lambda item: len(item["input_ids"]))
    assert len(short["input_ids"]) < len(long["input_ids"])  # premise
    batch = SFTCollator(pad_id=12345)([short, long])
    assert batch["input_ids"][0, len(short["input_ids"]):].eq(12345).all()
    assert batch["input_ids"].shape == (2, len(long["input_ids"]))
    with pytest.raises(ValueError, match="empty batch"):
        SFTCollator(0)([])


# --------------------------------------------------------------------------------------------------
# Bad input: every problem names its file and line
# --------------------------------------------------------------------------------------------------

GOOD = json.dumps(BRONCOS)


@pytest.mark.parametrize("lines, line_no, message", [
    ([GOOD, GOOD, '{"input": "x", "output": '], 3, "invalid JSON"),
    ([GOOD, json.dumps({"output": "Broncos"})], 2, "missing field 'input'"),
    ([json.dumps({"input": "x"})], 1, "missing field 'output'"),
    ([GOOD, json.dumps({"input": ["x"], "output": "y"})], 2, "'input' must be a string"),
    ([json.dumps({"input": "x", "output": 5})], 1, "'output' must be a string"),
    ([GOOD, json.dumps({"input": "x", "output": "  "})], 2, "empty 'output'"),
    ([GOOD, "", GOOD], 2, "blank line"),
    ([GOOD, GOOD, ""], 3, "blank line"),  # two newlines at the end: a blank last line
    ([GOOD, "[1, 2]"], 2, "expected a JSON object"),
    ([json.dumps({"input": "x", "output": "y", "answers": []})], 1, "'answers' must be"),
    ([json.dumps({"input": "x", "output": "y", "answers": "y"})], 1, "'answers' must be"),
])
def test_bad_input_names_file_and_line(tok, tmp_path, lines, line_no, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as err:
        SFTDataset([write_records(tmp_path / "good.jsonl", [BRONCOS]), path], tok)
    assert f"{path}:{line_no}:" in str(err.value)
    assert message in str(err.value)


def test_invalid_utf8_names_the_line(tok, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + json.dumps({"input": "caf\u00e9", "output": "y"},
                                                          ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid UTF-8")):
        SFTDataset(path, tok)


def test_empty_file(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: empty file")):
        SFTDataset(path, tok)


def test_missing_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        SFTDataset(tmp_path / "nope.jsonl", tok)


def test_final_newline_is_optional(tok, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(GOOD + "\n" + GOOD)  # no newline after the last line
    assert len(SFTDataset(path, tok)) == 2


def test_unicode_line_separator_inside_a_field_is_not_a_line_break(tok, tmp_path):
    record = dict(BRONCOS, input=squad_input("Super Bowl\u2028 50 was won by the Broncos.", "Who won?"))
    path = write_records(tmp_path / "a.jsonl", [record, BRONCOS])  # ensure_ascii=False keeps U+2028 raw
    ds = SFTDataset(path, tok)
    assert len(ds) == 2 and ds[0]["prompt"] == record["input"]
