"""SQuAD: getting the files (download with a checksum, or a local copy), the prompt format and its inverses,
records grouped by article, stratified samples, and the tutorial's train / validation / test splits -- on tiny
hand-made SQuAD files and on the prepared real files in data/SQuAD/."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
from pathlib import Path

import pytest

from lora_tutorial import squad
from lora_tutorial.squad import (chat_message, format_prompt, load_squad, make_splits, prepare_squad, question_of,
                                 split_context, squad_to_records, stratified_sample)

REPO = Path(__file__).resolve().parents[1]
PREPARED = REPO / "data" / "SQuAD"

# --------------------------------------------------------------------------------------------------
# The prompt format and its inverses
# --------------------------------------------------------------------------------------------------


def test_format_prompt_is_nemos_squad_format_with_stray_whitespace_removed():
    assert (format_prompt("  The Broncos won. ", "Who won? ")
            == "User: Context: The Broncos won. Question: Who won?\n\nAssistant:")


def test_split_context_cuts_around_the_context_only():
    text = format_prompt("The Broncos won the game.", "Who won the game?")
    head, body, tail = split_context(text)
    assert head + body + tail == text
    assert (head, body, tail) == ("User: Context:", " The Broncos won the game.",
                                  " Question: Who won the game?\n\nAssistant:")
    assert split_context("no markers here") == ("", "no markers here", "")


def test_question_of_and_chat_message_invert_format_prompt():
    prompt = format_prompt("Paris is in France.", "Where is Paris? ")
    assert question_of(prompt) == "Where is Paris?"
    assert chat_message(prompt) == "Context: Paris is in France. Question: Where is Paris?"
    assert question_of("plain text") == "plain text"


# Five SQuAD training questions have this context: Kant's essay title contains " Question:".
ENLIGHTENMENT = ('In Kant\'s 1784 essay "Beantwortung der Frage: Was ist Aufklärung?" ("Answering the Question: '
                 'What is Enlightenment?") the German term became \'Aufklärung\'.')


def test_a_context_that_contains_question_marker_is_still_split_at_the_real_question():
    prompt = format_prompt(ENLIGHTENMENT, "What term became the German equivalent?")
    assert question_of(prompt) == "What term became the German equivalent?"
    head, body, tail = split_context(prompt)
    assert body == " " + ENLIGHTENMENT  # the whole context may be cut, none of it is glued to the question
    assert tail == " Question: What term became the German equivalent?\n\nAssistant:"


# --------------------------------------------------------------------------------------------------
# Tiny SQuAD files: acquisition and prepare_squad
# --------------------------------------------------------------------------------------------------


def tiny_squad(num_articles: int, questions_per_article: int, tag: str = "") -> dict:
    """A structurally valid SQuAD v1.1 object with known counts (two gold answers per question)."""
    articles = []
    for a in range(num_articles):
        context = f"Article {a} says the answer is answer{a}."
        qas = [{"answers": [{"answer_start": context.index("answer"), "text": f"answer{a}"},
                            {"answer_start": 0, "text": f"Article {a}"}],
                "question": f"What does article {a} say, take {q}? ", "id": f"{tag}q{a}-{q}"}
               for q in range(questions_per_article)]
        articles.append({"title": f"{tag}T{a}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"data": articles, "version": "1.1"}


TRAIN_SHAPE, DEV_SHAPE = (5, 3), (3, 2)  # (articles, questions per article)


@pytest.fixture
def tiny_squad_files(tmp_path, monkeypatch):
    """Tiny train (gzipped) and dev (plain) sources, with SQUAD_FILES patched to expect their counts and to
    download from file:// URLs."""
    source = tmp_path / "source"
    source.mkdir()
    train_bytes = json.dumps(tiny_squad(*TRAIN_SHAPE)).encode()
    dev_bytes = json.dumps(tiny_squad(*DEV_SHAPE, tag="d")).encode()
    (source / "train-v1.1.json.gz").write_bytes(gzip.compress(train_bytes))
    (source / "dev-v1.1.json").write_bytes(dev_bytes)
    (source / "train-v1.1.json").write_bytes(train_bytes)  # a plain twin for the download tests
    for split, raw, (articles, per) in [("train", train_bytes, TRAIN_SHAPE), ("dev", dev_bytes, DEV_SHAPE)]:
        spec = squad.SQUAD_FILES[split]
        monkeypatch.setitem(squad.SQUAD_FILES, split, dataclasses.replace(
            spec, url=(source / spec.filename).as_uri(), sha256=hashlib.sha256(raw).hexdigest(),
            num_questions=articles * per, num_articles=articles))
    monkeypatch.delenv(squad.SQUAD_SOURCE_ENV, raising=False)
    return {"source": source, "train": train_bytes, "dev": dev_bytes}


def test_download_with_matching_checksum(tiny_squad_files, tmp_path):
    paths = squad.download_squad(tmp_path / "d")
    assert paths["train"] == tmp_path / "d" / "SQuAD" / "train-v1.1.json"
    assert paths["train"].read_bytes() == tiny_squad_files["train"]
    assert paths["dev"].read_bytes() == tiny_squad_files["dev"]
    assert sorted(p.name for p in (tmp_path / "d" / "SQuAD").iterdir()) == ["dev-v1.1.json", "train-v1.1.json"]


def test_download_checksum_mismatch_leaves_nothing(tiny_squad_files, tmp_path, monkeypatch):
    spec = squad.SQUAD_FILES["train"]
    monkeypatch.setitem(squad.SQUAD_FILES, "train", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(ValueError, match="checksum mismatch"):
        squad.download_squad(tmp_path / "d")
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
    monkeypatch.setattr(squad.urllib.request, "urlopen", lambda url: BrokenResponse())
    dest = tmp_path / "out" / "x.json"
    with pytest.raises(ConnectionResetError):
        squad.download_file("https://example.invalid/x.json", dest)
    assert list(dest.parent.iterdir()) == []  # neither x.json nor the partial .part file


def test_missing_url_leaves_nothing(tmp_path):
    dest = tmp_path / "out" / "x.json"
    with pytest.raises(OSError):  # urllib.error.URLError
        squad.download_file((tmp_path / "missing.json").as_uri(), dest)
    assert not dest.exists()


def test_present_files_are_skipped(tiny_squad_files, tmp_path, monkeypatch):
    squad_dir = tmp_path / "d" / "SQuAD"
    squad_dir.mkdir(parents=True)
    for name in ["train-v1.1.json", "dev-v1.1.json"]:
        (squad_dir / name).write_text("kept")
    for split in ["train", "dev"]:  # any fetch would now fail
        monkeypatch.setitem(squad.SQUAD_FILES, split, dataclasses.replace(
            squad.SQUAD_FILES[split], url=(tmp_path / "nowhere.json").as_uri()))
    squad.download_squad(tmp_path / "d")
    assert (squad_dir / "train-v1.1.json").read_text() == "kept"


def test_local_source_plain_and_gzipped_via_env(tiny_squad_files, tmp_path, monkeypatch):
    (tiny_squad_files["source"] / "train-v1.1.json").unlink()  # only the .gz remains for train
    monkeypatch.setenv(squad.SQUAD_SOURCE_ENV, str(tiny_squad_files["source"]))
    for split in ["train", "dev"]:  # prove that nothing is downloaded
        monkeypatch.setitem(squad.SQUAD_FILES, split, dataclasses.replace(
            squad.SQUAD_FILES[split], url=(tmp_path / "nowhere.json").as_uri()))
    paths = squad.download_squad(tmp_path / "d")
    assert paths["train"].read_bytes() == tiny_squad_files["train"]  # gunzipped
    assert paths["dev"].read_bytes() == tiny_squad_files["dev"]


def test_local_source_with_wrong_counts_is_rejected(tiny_squad_files, tmp_path, monkeypatch):
    spec = squad.SQUAD_FILES["dev"]
    monkeypatch.setitem(squad.SQUAD_FILES, "dev", dataclasses.replace(spec, num_questions=7))
    with pytest.raises(ValueError, match="3 articles / 6 questions, expected 3 / 7"):
        squad.download_squad(tmp_path / "d", source=tiny_squad_files["source"])
    assert not (tmp_path / "d" / "SQuAD" / "dev-v1.1.json").exists()
    assert [p.name for p in (tmp_path / "d" / "SQuAD").iterdir()] == ["train-v1.1.json"]


def test_local_source_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-v1.1.json.gz"):
        squad.download_squad(tmp_path / "d", source=tmp_path)


def test_local_source_with_broken_structure(tiny_squad_files, tmp_path):
    broken = tiny_squad(*DEV_SHAPE, tag="d")
    del broken["data"][1]["paragraphs"][0]["qas"][0]["answers"]
    (tiny_squad_files["source"] / "dev-v1.1.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"data\[1\]\.paragraphs\[0\]\.qas\[0\].*answers"):
        squad.download_squad(tmp_path / "d", source=tiny_squad_files["source"])


def test_squad_to_records_groups_by_article_in_file_order():
    articles = squad_to_records(tiny_squad(3, 2))
    assert [[r["id"] for r in records] for records in articles] == [["q0-0", "q0-1"], ["q1-0", "q1-1"],
                                                                    ["q2-0", "q2-1"]]
    assert articles[1][0] == {"input": format_prompt("Article 1 says the answer is answer1.",
                                                     "What does article 1 say, take 0?"),
                              "output": "answer1", "answers": ["answer1", "Article 1"], "id": "q1-0",
                              "title": "T1"}
    assert all("answers" not in r for records in squad_to_records(tiny_squad(3, 2), with_answers=False)
               for r in records)


def test_stratified_sample_is_proportional_seeded_and_shuffled():
    articles = [[{"id": f"{a}-{i}"} for i in range(size)] for a, size in enumerate([10, 30, 60])]
    drawn = stratified_sample(articles, 20, seed=3)
    per_article = collections.Counter(r["id"].split("-")[0] for r in drawn)
    assert per_article == {"0": 2, "1": 6, "2": 12}  # 20 x (10, 30, 60) / 100
    assert len({r["id"] for r in drawn}) == 20  # without replacement
    assert stratified_sample(articles, 20, seed=3) == drawn
    assert stratified_sample(articles, 20, seed=4) != drawn
    assert [r["id"].split("-")[0] for r in drawn] != sorted(r["id"].split("-")[0] for r in drawn)  # shuffled
    with pytest.raises(ValueError, match="cannot draw 101 of 100"):
        stratified_sample(articles, 101, seed=0)


def test_prepare_squad_on_tiny_files(tiny_squad_files, tmp_path, monkeypatch):
    # The real split sizes do not fit 15 questions: scale them down (2 validation articles of 4 questions...).
    for name, value in [("SHORT_TRAIN_SIZE", 2), ("SHORT_VAL_SIZE", 3), ("VALIDATION_ARTICLES", 2),
                        ("VALIDATION_SIZE", 4), ("TEST_SIZE", 4)]:
        monkeypatch.setattr(squad, name, value)
    paths = prepare_squad(tmp_path / "d", source=tiny_squad_files["source"])
    assert set(paths) == {"train", "val", "short_train", "short_val", "split_train", "split_validation",
                          "split_test"}
    read = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert len(read["train"]) == 15 and len(read["val"]) == 6
    assert [r["id"] for r in read["short_train"]] == ["q0-0", "q0-1"]
    assert read["short_val"] == read["val"][:3]
    # the question's trailing space is stripped; train keeps no gold list, dev keeps all golds
    assert read["val"][2] == {"input": format_prompt("Article 1 says the answer is answer1.",
                                                     "What does article 1 say, take 0?"),
                              "output": "answer1", "answers": ["answer1", "Article 1"], "id": "dq1-0",
                              "title": "dT1"}
    assert set(read["train"][0]) == {"input", "output", "id", "title"}

    article_of = {r["id"]: r["id"].split("-")[0] for r in read["train"] + read["val"]}
    validation_articles = {article_of[r["id"]] for r in read["split_validation"]}
    assert len(validation_articles) == 2 and "q0" not in validation_articles  # the short subset's article
    assert {r["id"] for r in read["split_train"]} == {r["id"] for r in read["train"]
                                                      if article_of[r["id"]] not in validation_articles}
    assert len(read["split_test"]) == 4 and all(r["id"].startswith("dq") for r in read["split_test"])
    assert all(r["answers"] == [r["output"]] for r in read["split_validation"])  # train questions: one gold
    manifest = json.loads((tmp_path / "d" / "SQuAD" / "splits" / "manifest.json").read_text())
    assert manifest["validation"]["ids"] == [r["id"] for r in read["split_validation"]]
    assert manifest["test"]["ids"] == [r["id"] for r in read["split_test"]]
    assert sorted(manifest["validation"]["articles"]) == sorted(f"T{a[1:]}" for a in validation_articles)
    # a second run rewrites the same bytes and leaves no temporary file behind
    before = {name: path.read_bytes() for name, path in paths.items()}
    again = prepare_squad(tmp_path / "d", source=tiny_squad_files["source"])
    assert {name: path.read_bytes() for name, path in again.items()} == before
    assert not [p for p in (tmp_path / "d" / "SQuAD").rglob(".*")]


# --------------------------------------------------------------------------------------------------
# The prepared real files (written by `make data`)
# --------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make data` (python -m lora_tutorial prepare-data) first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def real():
    """The official SQuAD JSON (as prepare_squad copied it) and every prepared jsonl file."""
    train_json = load_squad(PREPARED / "train-v1.1.json", "train")
    dev_json = load_squad(PREPARED / "dev-v1.1.json", "dev")
    files = {name: read_jsonl(PREPARED / f"squad_{name}.jsonl") for name in ("train", "val", "short_train",
                                                                             "short_val")}
    files.update({f"split_{name}": read_jsonl(PREPARED / "splits" / f"{name}.jsonl")
                  for name in ("train", "validation", "test")})
    manifest = json.loads((PREPARED / "splits" / "manifest.json").read_text())
    article = {}  # question id -> ("train" | "dev", article index)
    for split, data in (("train", train_json), ("dev", dev_json)):
        for a, art in enumerate(data["data"]):
            for paragraph in art["paragraphs"]:
                for qa in paragraph["qas"]:
                    article[qa["id"]] = (split, a)
    return {"train_json": train_json, "dev_json": dev_json, "files": files, "manifest": manifest,
            "article": article}


def article_sizes(data: dict) -> list[int]:
    return [sum(len(p["qas"]) for p in art["paragraphs"]) for art in data["data"]]


@pytest.mark.slow
def test_the_offline_source_is_official_squad_and_is_what_prepare_copied(squad_source, tmp_path):
    paths = squad.download_squad(tmp_path, source=squad_source)
    for split, path in paths.items():
        data = load_squad(path, split)  # the official structure and counts (442 / 48 articles...)
        assert len(data["data"]) == squad.SQUAD_FILES[split].num_articles
        assert path.read_bytes() == (PREPARED / path.name).read_bytes()


@pytest.mark.slow
def test_counts_and_short_subsets(real):
    files = real["files"]
    assert len(files["train"]) == squad.SQUAD_FILES["train"].num_questions == 87_599
    assert len(files["val"]) == squad.SQUAD_FILES["dev"].num_questions == 10_570
    assert files["short_train"] == files["train"][:200]
    assert files["short_val"] == files["val"][:20]
    for name in ("squad_train.jsonl", "splits/test.jsonl"):
        raw = (PREPARED / name).read_bytes()
        assert raw.endswith(b"\n") and not raw.endswith(b"\n\n")  # one final newline, no blank line


@pytest.mark.slow
def test_val_lines_match_the_source(real):
    expected = [(p["context"], qa) for article in real["dev_json"]["data"]
                for p in article["paragraphs"] for qa in p["qas"]]
    val = real["files"]["val"]
    assert len(val) == len(expected)
    for line, (context, qa) in zip(val, expected):
        golds = [a["text"] for a in qa["answers"]]
        fields = {k: line[k] for k in ("input", "output", "answers", "id")}
        assert fields == {"input": f"User: Context: {context.strip()} Question: {qa['question'].strip()}"
                                   "\n\nAssistant:",
                          "output": golds[0], "answers": golds, "id": qa["id"]}
        assert all(gold in context for gold in line["answers"])


@pytest.mark.slow
def test_validation_articles_are_held_out_of_training(real):
    files, article = real["files"], real["article"]
    validation = files["split_validation"]
    assert len(validation) == 500
    held_out = {article[r["id"]] for r in validation}
    assert len(held_out) == 50 and all(split == "train" for split, _ in held_out)
    train_articles = {article[r["id"]] for r in files["split_train"]}
    assert held_out.isdisjoint(train_articles)
    assert held_out.isdisjoint({article[r["id"]] for r in files["short_train"]})  # NeMo's quick subset
    # the training split is every question of every other training article
    sizes = article_sizes(real["train_json"])
    assert train_articles == {("train", a) for a in range(len(sizes))} - held_out
    assert len(files["split_train"]) == 87_599 - sum(sizes[a] for _, a in held_out)
    # stratified: each held-out article gives round(500 x its share), within one question
    total = sum(sizes[a] for _, a in held_out)
    counts = collections.Counter(article[r["id"]] for r in validation)
    assert all(abs(counts[(s, a)] - 500 * sizes[a] / total) < 1 for s, a in held_out)
    assert all(r["answers"] == [r["output"]] for r in validation)


@pytest.mark.slow
def test_test_split_samples_every_dev_article(real):
    test, article = real["files"]["split_test"], real["article"]
    assert len(test) == 1000 == len({r["id"] for r in test})
    assert all(article[r["id"]][0] == "dev" for r in test)
    sizes = article_sizes(real["dev_json"])
    counts = collections.Counter(article[r["id"]][1] for r in test)
    assert set(counts) == set(range(48))
    assert all(abs(counts[a] - 1000 * sizes[a] / 10_570) < 1 for a in range(48))
    # shuffled: even the first 100 questions come from many articles (SQuAD order would give one or two)
    assert len({article[r["id"]] for r in test[:100]}) >= 25
    by_id = {r["id"]: r for r in real["files"]["val"]}
    assert all(r == by_id[r["id"]] for r in test)  # the dev records themselves, with every gold


@pytest.mark.slow
def test_manifest_describes_the_files(real):
    manifest, files = real["manifest"], real["files"]
    assert manifest["validation"]["ids"] == [r["id"] for r in files["split_validation"]]
    assert manifest["test"]["ids"] == [r["id"] for r in files["split_test"]]
    titles = [art["title"] for art in real["train_json"]["data"]]
    held_out = {real["article"][r["id"]][1] for r in files["split_validation"]}
    assert sorted(manifest["validation"]["articles"]) == sorted(titles[a] for a in held_out)
    assert manifest["train"]["questions"] == len(files["split_train"])
    assert manifest["train"]["articles"] == 442 - 50 and manifest["test"]["articles"] == 48


@pytest.mark.slow
def test_make_splits_is_deterministic_and_gives_the_prepared_files(real):
    train_articles = [[{**r, "answers": [r["output"]]} for r in records]
                      for records in squad_to_records(real["train_json"], with_answers=False)]
    dev_articles = squad_to_records(real["dev_json"])
    first, manifest = make_splits(train_articles, dev_articles)
    second, manifest_again = make_splits(train_articles, dev_articles)
    assert first == second and manifest == manifest_again
    assert manifest == real["manifest"]
    for name in ("train", "validation", "test"):
        assert [r["id"] for r in first[name]] == [r["id"] for r in real["files"][f"split_{name}"]], name


def test_chat_format_puts_the_prompt_into_the_chat_template_and_keeps_the_context_cuttable(tmp_path):
    from lora_tutorial import load_tokenizer
    from lora_tutorial.sft_data import SFTDataset
    from lora_tutorial.squad import chat_format, chat_message, format_prompt, split_context

    tokenizer = load_tokenizer()
    record = {"input": format_prompt("Paris is the capital of France. " * 40, "Which city is the capital?"),
              "output": "Paris"}
    expected = tokenizer.apply_chat_template([{"role": "user", "content": chat_message(record["input"])}])
    prefix, body, suffix = chat_format(tokenizer)(*split_context(record["input"]))
    assert prefix + body + suffix == expected
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record) + "\n")
    short = SFTDataset([path], tokenizer, max_seq_length=120, prompt_template="{input}{output}",
                       context_splitter=split_context, prompt_format=chat_format(tokenizer))[0]
    assert short["prompt"].startswith(prefix) and short["prompt"].endswith(suffix)  # only the context was cut
    assert tokenizer.decode(short["input_ids"][short["prompt_len"]:]) == "Paris"
    # a prompt that was not split (truncation_field: null) loses SQuAD's markers all the same
    whole = chat_format(tokenizer)(record["input"], "", "")
    assert "".join(whole) == expected


def test_a_failed_download_says_how_to_work_offline(tmp_path, monkeypatch):
    import urllib.error

    from lora_tutorial import squad

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.delenv(squad.SQUAD_SOURCE_ENV, raising=False)
    monkeypatch.setattr(squad.urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError, match=r"could not download .*name resolution.*--source.*SQUAD_SOURCE_DIR"):
        squad.download_squad(tmp_path)
    assert not list((tmp_path / "SQuAD").glob("*.json"))
