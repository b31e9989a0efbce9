"""The SFT dataset and its collator, with the tiny real byte-level BPE tokenizer (so the BPE boundary effects
that decide where the label mask falls are real): answer-only labels, truncation through a context splitter,
several files mixed by probability, the length order for generation, and strict jsonl reading."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lora_tutorial.sft_data import (IGNORE_INDEX, PromptTemplate, SFTCollator, SFTDataset, allocate_samples,
                                    build_sample_index, read_jsonl, whole_text_is_body)
from lora_tutorial.squad import format_prompt, split_context

from helpers import tiny_tokenizer, write_lines, write_records


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def labelled(item: dict) -> list[int]:
    return [t for t in item["labels"] if t != IGNORE_INDEX]


BRONCOS = {"input": format_prompt("The Broncos defeated the Panthers in Super Bowl 50.",
                                  "Which team won Super Bowl 50?"),
           "output": "Denver Broncos", "answers": ["Denver Broncos", "Broncos"], "id": "q1"}
STATUE = {"input": format_prompt("Atop the Main Building's gold dome is a golden statue of the Virgin Mary.",
                                 "What sits on top of the Main Building?"),
          "output": "a golden statue of the Virgin Mary"}


# --------------------------------------------------------------------------------------------------
# Template and labels
# --------------------------------------------------------------------------------------------------


def test_label_mask_covers_exactly_the_answer(tok, tmp_path):
    ds = SFTDataset(write_records(tmp_path / "a.jsonl", [BRONCOS, STATUE]), tok, context_splitter=split_context)
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


def test_prompt_template_fields_and_separator():
    template = PromptTemplate.parse("Q: {question}\nC: {context}\nA:\n {output}")
    assert template.fields == ["question", "context", "output"]
    assert template.separator == "\n "  # the whitespace before {output} belongs to the answer


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
    with pytest.raises(ValueError, match=re.escape(message)):
        SFTDataset(path, tok, prompt_template=template)


def test_truncation_field_must_be_in_the_template(tok, tmp_path):
    path = write_records(tmp_path / "a.jsonl", [BRONCOS])
    with pytest.raises(ValueError, match="truncation_field 'context'"):
        SFTDataset(path, tok, truncation_field="context")


# --------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------


def long_example(n_words: int, i: int) -> dict:
    context = " ".join(f"word{k}" for k in range(n_words)) + " The Broncos won."
    return {"input": format_prompt(context, f"Which team won game {i}?"), "output": "the Denver Broncos"}


def test_squad_splitter_truncation_keeps_question_and_answer(tok, tmp_path):
    records = [long_example(5, 0), long_example(60, 1), long_example(200, 2), BRONCOS]
    path = write_records(tmp_path / "a.jsonl", records)
    full = [SFTDataset(path, tok, max_seq_length=100_000)[i] for i in range(len(records))]
    max_len = len(full[0]["input_ids"]) + 10  # room for the shortest long example only
    assert len(full[1]["input_ids"]) > max_len and len(full[2]["input_ids"]) > max_len  # premise
    ds = SFTDataset(path, tok, max_seq_length=max_len, context_splitter=split_context)
    assert ds.num_truncated == 2
    for record, before, item in zip(records, full, ds):
        assert len(item["input_ids"]) <= max_len
        assert item["truncated"] == (len(before["input_ids"]) > max_len)
        assert labelled(item) == labelled(before)  # the answer (and EOS) are untouched
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


class OneAtATime:
    """The tiny tokenizer without ``encode_batch``: the dataset must fall back to ``encode``."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.bos_id, self.eos_id, self.pad_id = tok.bos_id, tok.eos_id, tok.pad_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


@pytest.mark.parametrize("slack", [-3, 0, 1, 10, 40])
def test_the_batched_truncation_count_equals_encoding_each_example(tok, tmp_path, slack):
    records = [long_example(n, i) for i, n in enumerate((0, 3, 9, 27, 60, 61, 62, 120, 200))]
    path = write_records(tmp_path / "a.jsonl", records)
    lengths = [len(SFTDataset(path, tok, max_seq_length=100_000)[i]["input_ids"]) for i in range(len(records))]
    max_len = sorted(lengths)[4] + slack  # some fit, some do not, one may fit exactly
    expected = sum(n > max_len for n in lengths)
    assert 0 < expected < len(records)
    batched = SFTDataset(path, tok, max_seq_length=max_len, context_splitter=split_context)
    one_by_one = SFTDataset(path, OneAtATime(tok), max_seq_length=max_len, context_splitter=split_context)
    assert batched.num_truncated == one_by_one.num_truncated == expected
    assert [item["truncated"] for item in batched] == [n > max_len for n in lengths]


def test_the_default_splitter_cuts_the_end_of_the_whole_field(tok, tmp_path):
    record = long_example(200, 0)
    path = write_records(tmp_path / "a.jsonl", [record])
    item = SFTDataset(path, tok, max_seq_length=60)[0]
    assert whole_text_is_body(record["input"]) == ("", record["input"], "")
    assert item["truncated"] and len(item["input_ids"]) == 60
    assert record["input"].startswith(item["prompt"]) and "Question:" not in item["prompt"]  # the question is lost
    assert "Question:" in SFTDataset(path, tok, max_seq_length=60, context_splitter=split_context)[0]["prompt"]


def test_truncation_of_a_plain_field(tok, tmp_path):
    record = {"input": "word " * 50 + "end", "output": "Broncos"}
    path = write_records(tmp_path / "a.jsonl", [record])
    item = SFTDataset(path, tok, max_seq_length=20)[0]
    assert len(item["input_ids"]) == 20
    assert record["input"].startswith(item["prompt"])
    assert tok.decode(labelled(item)[:-1]) == " Broncos"


def test_truncation_warning_counts_the_examples(tok, tmp_path, caplog):
    path = write_records(tmp_path / "a.jsonl", [long_example(200, 0), BRONCOS, long_example(300, 1)])
    with caplog.at_level("WARNING", logger="lora_tutorial.sft_data"):
        SFTDataset(path, tok, max_seq_length=80, context_splitter=split_context)
    assert "2 of 3 examples are longer than max_seq_length=80" in caplog.text


def test_example_that_cannot_fit_names_file_and_line(tok, tmp_path):
    question = "Which " + "very " * 40 + "team won?"
    path = write_records(tmp_path / "long.jsonl", [BRONCOS, {"input": format_prompt("short", question),
                                                             "output": "Broncos"}])
    with pytest.raises(ValueError, match=r"long\.jsonl:2: .*does not fit in max_seq_length=30"):
        SFTDataset(path, tok, max_seq_length=30, context_splitter=split_context)
    no_truncation = write_records(tmp_path / "b.jsonl", [long_example(100, 0)])
    with pytest.raises(ValueError, match=r"b\.jsonl:1: .*max_seq_length=30"):
        SFTDataset(no_truncation, tok, max_seq_length=30, truncation_field=None)


# --------------------------------------------------------------------------------------------------
# Several files, limit, length order
# --------------------------------------------------------------------------------------------------


def tagged_files(tmp_path: Path, sizes: dict[str, int]) -> list[Path]:
    return [write_records(tmp_path / f"{name}.jsonl",
                          [{"input": f"Question {name}{i}?" + " word" * i, "output": "yes", "id": f"{name}{i}"}
                           for i in range(size)])
            for name, size in sizes.items()]


def test_files_are_concatenated_in_order(tok, tmp_path):
    ds = SFTDataset(tagged_files(tmp_path, {"a": 3, "b": 2}), tok)
    assert [item["id"] for item in ds] == ["a0", "a1", "a2", "b0", "b1"]


def test_limit_keeps_the_first_examples(tok, tmp_path):
    files = tagged_files(tmp_path, {"a": 3, "b": 2})
    assert [item["id"] for item in SFTDataset(files, tok, limit=4)] == ["a0", "a1", "a2", "b0"]
    mixed = SFTDataset(files, tok, concat_sampling_probabilities=[0.5, 0.5], num_samples=10, seed=1)
    limited = SFTDataset(files, tok, concat_sampling_probabilities=[0.5, 0.5], num_samples=10, seed=1, limit=3)
    assert [item["id"] for item in limited] == [item["id"] for item in mixed][:3]  # limit applies after mixing
    with pytest.raises(ValueError, match="limit"):
        SFTDataset(files, tok, limit=0)


def test_sampling_probabilities_mix_files(tok, tmp_path):
    files = tagged_files(tmp_path, {"a": 10, "b": 5})
    ds = SFTDataset(files, tok, concat_sampling_probabilities=[0.7, 0.3], num_samples=100, seed=7)
    ids = [item["id"] for item in ds]
    assert len(ids) == 100
    assert collections.Counter(i[0] for i in ids) == {"a": 70, "b": 30}  # 0.7 * 100 and 0.3 * 100, exactly
    # each file is walked epoch by epoch: b's 5 rows appear 30 / 5 = 6 times each
    assert collections.Counter(i for i in ids if i[0] == "b") == {f"b{k}": 6 for k in range(5)}
    again = [item["id"] for item in SFTDataset(files, tok, concat_sampling_probabilities=[0.7, 0.3],
                                               num_samples=100, seed=7)]
    other = [item["id"] for item in SFTDataset(files, tok, concat_sampling_probabilities=[0.7, 0.3],
                                               num_samples=100, seed=8)]
    assert ids == again and ids != other
    assert any(i[0] == "b" for i in ids[:50])  # shuffled together, not 70 a's then 30 b's


def test_build_sample_index_covers_each_file_before_repeating():
    index = build_sample_index([4, 3], [0.5, 0.5], 10, seed=0)
    assert len(index) == 10
    rows = {f: [row for g, row in index if g == f] for f in (0, 1)}
    # 5 draws each: file 0 (4 rows) is one whole pass plus one row, file 1 (3 rows) one pass plus two rows
    assert sorted(collections.Counter(rows[0]).values()) == [1, 1, 1, 2]
    assert sorted(collections.Counter(rows[1]).values()) == [1, 2, 2]
    assert build_sample_index([4, 3], [0.5, 0.5], 10, seed=0) == index


def test_allocate_samples_uses_largest_remainders():
    # 10 * [0.75, 0.25] = [7.5, 2.5]: floors [7, 2], one left over, tie -> earlier file
    assert allocate_samples(10, [0.75, 0.25]) == [8, 2]
    # 7 * [0.5, 0.3, 0.2] = [3.5, 2.1, 1.4]: floors [3, 2, 1], one left -> largest remainder (0.5)
    assert allocate_samples(7, [0.5, 0.3, 0.2]) == [4, 2, 1]


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


def test_indices_by_length_orders_by_prompt_length(tok, tmp_path):
    records = [long_example(n, i) for i, n in enumerate([30, 2, 50, 10, 2])]
    ds = SFTDataset(write_records(tmp_path / "a.jsonl", records), tok)
    order = ds.indices_by_length()
    assert sorted(order) == list(range(5))
    lengths = [ds[i]["prompt_len"] for i in order]
    assert lengths == sorted(lengths)
    assert order[-1] == 2 and set(order[:2]) == {1, 4}


def test_token_length_is_the_items_length(tok, tmp_path):
    records = [long_example(n, i) for i, n in enumerate([3, 40])] + [BRONCOS]
    ds = SFTDataset(write_records(tmp_path / "a.jsonl", records), tok, max_seq_length=60,
                    context_splitter=split_context)
    for i in range(len(ds)):
        assert ds.token_length(i) == len(ds[i]["input_ids"])  # after truncation, EOS included
        assert ds.token_length(i, with_answer=False) == ds[i]["prompt_len"]


# --------------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------------


def test_collate_right_pads_dynamically(tok, tmp_path):
    ds = SFTDataset(write_records(tmp_path / "a.jsonl", [BRONCOS, STATUE, long_example(3, 0)]), tok)
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=SFTCollator(tok.pad_id))))
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


def test_a_right_padded_batch_gives_each_examples_own_loss(tok, tmp_path):
    """Right padding plus -100 labels: the batch loss is the token-weighted mean of the examples' own losses."""
    from helpers import tiny_llama_config, tiny_model

    model = tiny_model(tiny_llama_config(vocab_size=tok.vocab_size, max_seq_len=128))
    ds = SFTDataset(write_records(tmp_path / "a.jsonl", [BRONCOS, STATUE]), tok)
    batch = SFTCollator(tok.pad_id)([ds[0], ds[1]])
    with torch.no_grad():
        together = model.loss(batch["input_ids"], batch["labels"]).item()
        alone = [model.loss(torch.tensor([ds[i]["input_ids"]]), torch.tensor([ds[i]["labels"]])).item()
                 for i in range(2)]
    counts = [len(labelled(ds[i])) for i in range(2)]
    assert together == pytest.approx(sum(loss * n for loss, n in zip(alone, counts)) / sum(counts), rel=1e-5)


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


def test_read_jsonl_returns_line_numbers(tmp_path):
    path = write_records(tmp_path / "a.jsonl", [BRONCOS, STATUE])
    assert read_jsonl(path, ["input", "output"]) == [(1, BRONCOS), (2, STATUE)]


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
    record = dict(BRONCOS, input=format_prompt("Super Bowl\u2028 50 was won by the Broncos.", "Who won?"))
    path = write_records(tmp_path / "a.jsonl", [record, BRONCOS])  # ensure_ascii=False keeps U+2028 raw
    ds = SFTDataset(path, tok)
    assert len(ds) == 2 and ds[0]["prompt"] == record["input"]
