"""Append-only answers log: a cut-off tail is ignored by readers and cut by the next writer, rows are never duplicated."""

from __future__ import annotations

import json

import pytest

from cfdpo.errors import CfdpoError
from cfdpo.generate import GenParams, row_key
from cfdpo.runio import JsonlLog, write_json


def test_truncated_tail_is_ignored_on_read_and_cut_on_append(tmp_path):
    p = tmp_path / "a.jsonl"
    log = JsonlLog(p)
    log.append([{"key": "a", "v": 1}, {"key": "b", "v": 2}])
    with open(p, "ab") as f:
        f.write(b'{"key": "c", "v"')  # a writer killed mid-row (or one still writing)
    cut = p.read_bytes()
    log2 = JsonlLog(p)
    assert log2.keys() == {"a", "b"}
    assert p.read_bytes() == cut  # opening only reads
    log2.append([{"key": "c", "v": 3}])
    assert [json.loads(line)["key"] for line in p.read_text().splitlines()] == ["a", "b", "c"]


def test_duplicate_keys_are_read_once(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"key": "a"}\n{"key": "a"}\n')
    assert len(JsonlLog(p).rows) == 1


def test_corrupt_middle_is_an_error_and_file_untouched(tmp_path):
    p = tmp_path / "a.jsonl"
    data = b'{"key": "a"}\nnot json\n{"key": "b"}\n'
    p.write_bytes(data)
    with pytest.raises(CfdpoError, match="corrupt row in the middle"):
        JsonlLog(p)
    assert p.read_bytes() == data


def test_write_json_is_atomic(tmp_path):
    p = tmp_path / "m.json"
    write_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]


def test_row_key_depends_on_every_part():
    g = GenParams(8, 0.7, 0.9)
    m = [{"role": "user", "content": "q"}]
    k = row_key("m", m, g, 0, 0)
    assert k == row_key("m", [dict(x) for x in m], GenParams(8, 0.7, 0.9), 0, 0)
    others = {row_key("m2", m, g, 0, 0), row_key("m", [{"role": "user", "content": "q2"}], g, 0, 0),
              row_key("m", m, GenParams(9, 0.7, 0.9), 0, 0), row_key("m", m, g, 1, 0), row_key("m", m, g, 0, 1)}
    assert k not in others and len(others) == 5
