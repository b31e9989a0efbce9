"""Atomic writes: a reader sees the old file or the complete new one, never half of one, and no temporary
file is left behind -- also when the writer fails or is interrupted."""

from __future__ import annotations

import json
import stat

import pytest

from lora_tutorial.files import atomic_path, atomic_write, write_json, write_jsonl, write_text


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    dest = tmp_path / "out.jsonl"
    dest.write_text("old\n")
    with pytest.raises(type(error)):
        with atomic_write(dest) as out:
            out.write("new, but only ha")
            raise error
    assert dest.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_nothing_is_visible_before_the_block_ends(tmp_path):
    dest = tmp_path / "sub" / "weights.bin"
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"abc")
        assert not dest.exists() and tmp.parent == dest.parent  # same folder: the rename is atomic
    assert dest.read_bytes() == b"abc"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644  # an ordinary data file, not a 0600 temporary
    assert [p.name for p in dest.parent.iterdir()] == ["weights.bin"]


def test_write_jsonl_is_utf8_one_object_per_line_and_repeatable(tmp_path):
    records = [{"input": "Köln — ok", "n": 1}, {"input": "line\u2028separator", "n": 2}]
    path = write_jsonl(records, tmp_path / "a.jsonl")
    raw = path.read_bytes()
    assert raw.split(b"\n")[:-1] == [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records]
    assert raw.endswith(b"\n") and "Köln".encode() in raw  # no \\u escapes
    assert write_jsonl(iter(records), tmp_path / "b.jsonl").read_bytes() == raw


def test_write_json_and_write_text(tmp_path):
    data = {"b": [1, 2], "a": "é"}
    assert json.loads(write_json(data, tmp_path / "d.json").read_text(encoding="utf-8")) == data
    assert write_text("x\ny", tmp_path / "t.txt").read_text() == "x\ny"
