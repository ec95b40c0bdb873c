from __future__ import annotations

import json

import pytest

from cfdpo.errors import CfdpoError
from cfdpo.prompts import load_prompts, split


def test_builtin_general_set_is_large_diverse_and_unique():
    ps = load_prompts("general")
    assert len(ps) >= 300
    assert len({p["prompt"].lower() for p in ps}) == len(ps)
    assert len({p["category"] for p in ps}) >= 4


def test_builtin_everyday_set_is_new_short_and_varied():
    ps = load_prompts("everyday")
    general = {p["prompt"].lower() for p in load_prompts("general")}
    assert len(ps) >= 150 and not {p["prompt"].lower() for p in ps} & general
    assert len({p["category"] for p in ps}) >= 4 and max(len(p["prompt"]) for p in ps) <= 120


def test_builtin_news_set_mentions_people():
    ps = load_prompts("news")
    assert len(ps) >= 100
    assert all(name in p["prompt"] for p in ps for name in p["people"])


def test_split_is_deterministic_and_disjoint():
    ps = load_prompts("general")
    a_train, a_eval = split(ps, 100, 50, seed=3)
    b_train, b_eval = split(list(reversed(ps)), 100, 50, seed=3)
    assert [p["id"] for p in a_train] == [p["id"] for p in b_train]
    assert [p["id"] for p in a_eval] == [p["id"] for p in b_eval]
    assert not {p["id"] for p in a_train} & {p["id"] for p in a_eval}
    assert len(a_train) == 100 and len(a_eval) == 50
    c_train, _ = split(ps, 100, 50, seed=4)
    assert [p["id"] for p in c_train] != [p["id"] for p in a_train]


def test_split_too_large():
    with pytest.raises(CfdpoError, match="only 2 prompts"):
        split([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}], 2, 1)


def test_user_files(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text("\n".join(json.dumps({"prompt": f"question {i}?"}) for i in range(3)) + "\n")
    assert [p["id"] for p in load_prompts(str(j))] == ["p00001", "p00002", "p00003"]
    c = tmp_path / "p.csv"
    c.write_text("id,prompt\na,Why?\nb,How?\n")
    assert [p["prompt"] for p in load_prompts(str(c))] == ["Why?", "How?"]


@pytest.mark.parametrize("name,content,msg", [
    ("empty.jsonl", b"", "no prompts found"),
    ("blank.jsonl", b'{"prompt": "   "}\n', "is empty"),
    ("dup.jsonl", b'{"prompt": "a"}\n{"prompt": "a"}\n', "repeats the prompt of row 1"),
    ("latin1.jsonl", '{"prompt": "caf\u00e9"}\n'.encode("latin-1"), "not valid UTF-8"),
    ("nocol.csv", b"text\nhello\n", "no 'prompt' field"),
    ("bad.jsonl", b'{"prompt": \n', "invalid JSON"),
    ("p.txt", b"hello\n", "unsupported prompt file type"),
])
def test_bad_prompt_files(tmp_path, name, content, msg):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(CfdpoError, match=msg):
        load_prompts(str(p))


def test_missing_source():
    with pytest.raises(CfdpoError, match="not a builtin set"):
        load_prompts("no/such/file.jsonl")


def test_validation_prompts_come_after_training_and_leave_both_splits_unchanged():
    from cfdpo.prompts import validation_split

    ps = load_prompts("general")
    train, held_out = split(ps, 100, 50, seed=3)
    val = validation_split(list(reversed(ps)), 100, 50, 8, seed=3)
    assert len(val) == 8
    assert not {p["id"] for p in val} & ({p["id"] for p in train} | {p["id"] for p in held_out})
    assert [p["id"] for p in val] == [p["id"] for p in validation_split(ps, 100, 50, 8, seed=3)]
    assert [p["id"] for p in val][:4] == [p["id"] for p in validation_split(ps, 100, 50, 4, seed=3)]
    assert [p["id"] for p in validation_split(ps, 100, 50, None, seed=3)] == [p["id"] for p in val]  # default 8


def test_default_validation_takes_what_the_set_has_left_and_an_explicit_size_must_fit():
    from cfdpo.prompts import validation_split

    rows = [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(12)]
    assert len(validation_split(rows, 8, 2, None)) == 2
    assert validation_split(rows, 10, 2, None) == []
    with pytest.raises(CfdpoError, match=r"^prompts.validation_size: .* = 13 but the set has only 12 prompts; "
                                         r"expected at most 2$"):
        validation_split(rows, 8, 2, 3)


def test_extra_held_out_prompts_follow_validation_and_leave_every_split_unchanged():
    from cfdpo.prompts import extra_held_out, validation_split

    ps = load_prompts("general")
    train, held_out = split(ps, 100, 50, seed=3)
    val = validation_split(ps, 100, 50, 8, seed=3)
    extra = extra_held_out(list(reversed(ps)), 100, 50, len(val), 76, seed=3)
    assert len(extra) == len({p["id"] for p in extra}) == 76
    assert not {p["id"] for p in extra} & {p["id"] for p in train + held_out + val}
    assert [p["id"] for p in extra][:10] == [p["id"] for p in extra_held_out(ps, 100, 50, 8, 10, seed=3)]
    assert split(ps, 100, 50, seed=3) == (train, held_out)
    with pytest.raises(CfdpoError, match=r"^evaluation.extra_prompts: .* = 340 but the set has only 339 prompts; "
                                         r"expected at most 181$"):
        extra_held_out(ps, 100, 50, 8, 182, seed=3)


def test_validation_size_must_be_smaller_than_train_size():
    from cfdpo.recipe import parse_recipe

    data = {"behaviour": {"name": "x", "treatment": "Be brief.", "scorer": {"name": "length", "desired": "lower"}},
            "variants": ["enc"], "prompts": {"train_size": 8, "validation_size": 8}}
    with pytest.raises(CfdpoError, match=r"^recipe: prompts.validation_size: 8 is not smaller than train_size \(8\)"):
        parse_recipe(data)
    data["prompts"]["validation_size"] = 7
    assert parse_recipe(data).prompts.validation_size == 7
