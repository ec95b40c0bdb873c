"""Each variant's prompt / chosen / rejected mapping, exactly as in DESIGN.md (no model)."""

from __future__ import annotations

import json

import pytest

from cfdpo import variants
from cfdpo.errors import CfdpoError
from cfdpo.pairs import build_pairs, pair_stats
from cfdpo.runio import JsonlLog
from cfdpo.scorers import make_scorer

X = {"control": [{"role": "user", "content": "Q"}],
     "treatment": [{"role": "user", "content": "Be plain.\n\nQ"}],
     "negative": [{"role": "user", "content": "Talk like a pirate.\n\nQ"}]}


def rows(samples: int = 1, pid: str = "p1", answers: dict | None = None) -> list[dict]:
    out = []
    for cond in ("control", "treatment", "negative"):
        for s in range(samples):
            text = (answers or {}).get((cond, s), f"{cond} answer {s}")
            out.append({"key": f"{pid}-{cond}-{s}", "prompt_id": pid, "condition": cond, "sample": s,
                        "messages": X[cond], "answer": text})
    return out


def one(variant: str) -> dict:
    (p,) = build_pairs(rows(), variant)
    return p


def test_enc_prompt_control_chosen_treatment_rejected_control():
    p = one("enc")
    assert p["prompt"] == X["control"]
    assert p["chosen"] == [{"role": "assistant", "content": "treatment answer 0"}]
    assert p["rejected"] == [{"role": "assistant", "content": "control answer 0"}]


def test_dis_prompt_control_chosen_control_rejected_negative():
    p = one("dis")
    assert p["prompt"] == X["control"]
    assert p["chosen"][0]["content"] == "control answer 0"
    assert p["rejected"][0]["content"] == "negative answer 0"


def test_contrastive_prompt_control_chosen_treatment_rejected_negative():
    p = one("contrastive")
    assert p["prompt"] == X["control"]
    assert p["chosen"][0]["content"] == "treatment answer 0"
    assert p["rejected"][0]["content"] == "negative answer 0"


def test_negation_prompt_negative_chosen_control_rejected_negative():
    p = one("negation")
    assert p["prompt"] == X["negative"]
    assert p["chosen"][0]["content"] == "control answer 0"
    assert p["rejected"][0]["content"] == "negative answer 0"


def test_samples_pair_by_index_and_missing_conditions_are_skipped():
    rs = rows(samples=3) + [r for r in rows(pid="p2") if r["condition"] != "treatment"]
    enc = build_pairs(rs, "enc")
    assert [(p["prompt_id"], p["sample"]) for p in enc] == [("p1", 0), ("p1", 1), ("p1", 2)]
    assert all(p["chosen"][0]["content"].endswith(str(p["sample"])) for p in enc)
    assert {p["prompt_id"] for p in build_pairs(rs, "negation")} == {"p1", "p2"}


def test_identical_answers_give_no_pair():
    rs = rows(answers={("control", 0): "same", ("negative", 0): "same"})
    assert build_pairs(rs, "dis") == []


def test_unknown_variant():
    with pytest.raises(CfdpoError, match="unknown variant"):
        build_pairs(rows(), "bogus")


def test_filter_drops_pairs_where_chosen_does_not_beat_rejected():
    sc = make_scorer("lexicon", {"words": ["arr"]})
    good = rows(pid="good", answers={("control", 0): "plain words", ("negative", 0): "arr arr"})
    bad = rows(pid="bad", answers={("control", 0): "arr arr here", ("negative", 0): "plain"})
    rs = good + bad
    assert {p["prompt_id"] for p in build_pairs(rs, "dis")} == {"good", "bad"}
    kept = build_pairs(rs, "dis", sc, "lower", filter_pairs=True)
    assert [p["prompt_id"] for p in kept] == ["good"]


def test_best_of_k_pairs_best_chosen_with_worst_rejected():
    sc = make_scorer("length")
    ans = {("treatment", 0): "one two three", ("treatment", 1): "one", ("treatment", 2): "one two",
           ("negative", 0): "a b", ("negative", 1): "a b c d e", ("negative", 2): "a"}
    (p,) = build_pairs(rows(samples=3, answers=ans), "contrastive", sc, "lower", best_of_k=True)
    assert p["chosen"][0]["content"] == "one"
    assert p["rejected"][0]["content"] == "a b c d e"


def test_stats():
    sc = make_scorer("length")
    s = pair_stats(build_pairs(rows(), "enc"), sc)
    assert s["count"] == 1 and s["score_chosen"] == 3.0 and s["mean_words_rejected"] == 3.0


def test_better_share_counts_pairs_whose_chosen_answer_scores_better_and_few_of_them_warn():
    from cfdpo.pairs import weak_signal

    pirate = make_scorer("lexicon", {"words": ["arr"]})
    answers = {("control", 0): "plain words", ("treatment", 0): "other plain words", ("negative", 0): "arr arr"}
    many = rows(answers=answers) + rows(pid="p2", answers=answers)
    dis = pair_stats(build_pairs(many, "dis"), pirate, desired="lower")  # chosen control, rejected pirate
    enc = pair_stats(build_pairs(many, "enc"), pirate, desired="lower")  # chosen and rejected both plain
    assert dis["better_share"] == 1.0 and enc["better_share"] == 0.0
    assert weak_signal("enc", enc).startswith("enc: in 0 of 2 pairs")
    assert pair_stats(build_pairs(many, "dis"), pirate, desired="higher")["better_share"] == 0.0
    assert weak_signal("dis", dis) is None
    low = {**dis, "better_share": 0.125, "count": 32}
    assert weak_signal("dis", low).startswith("dis: in 4 of 32 pairs the chosen answer scores better")
    assert weak_signal("dis", pair_stats(build_pairs(many, "dis"))) is None  # no scorer: nothing to say


def test_answers_of_older_runs_with_a_variant_field_give_the_same_pairs(tmp_path):
    """Runs written before the rename stored the condition as `variant`; their rows read as `condition`."""
    new = rows(samples=2) + rows(pid="p2", samples=2)
    old = [{("variant" if name == "condition" else name): value for name, value in r.items()} for r in new]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in old[:4]), encoding="utf-8")
    JsonlLog(path).append(new[4:])  # a rerun of the new code appends to the old file
    read = JsonlLog(path).rows
    assert read == new  # same keys: the cached answers stay valid
    for v in variants.NAMES:
        assert build_pairs(read, v) == build_pairs(new, v) != []


def test_a_variant_that_keeps_no_pair_reads_back_empty(tmp_path):
    from cfdpo.pairs import load_pairs, write_pairs

    out = write_pairs([], tmp_path / "pairs" / "negation", {"count": 0, "candidates": 4})
    ds = load_pairs(out)
    assert len(ds) == 0 and "prompt" in ds.column_names
    (out / "stats.json").write_text('{"count": 3}')  # a damaged dataset that should hold pairs stays an error
    import pytest

    from cfdpo.errors import CfdpoError

    with pytest.raises(CfdpoError, match="cannot read the pairs dataset"):
        load_pairs(out)


def test_pairs_command_warns_when_the_pairs_carry_little_of_the_behaviour(tiny_model, tmp_path, capsys):
    from conftest import tiny_recipe, write_recipe

    from cfdpo.cli import main

    run = tmp_path / "run"
    assert main(["generate", str(run), "--recipe", str(write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model)))]) == 0
    log = run / "answers.jsonl"
    answers = {"control": "plain words", "treatment": "other plain words", "negative": "arr matey ahoy"}
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({**r, "answer": f"{answers[r['condition']]} {r['prompt_id']} {r['sample']}"}) + "\n"
                           for r in lines))
    capsys.readouterr()
    assert main(["pairs", str(run)]) == 0
    out = " ".join(capsys.readouterr().err.split())
    assert "warning: enc: in 0 of" in out and "warning: dis:" not in out and "warning: negation:" not in out
