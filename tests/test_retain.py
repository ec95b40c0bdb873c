"""Scope-aware negation: retain pairs in the deployer's context join the negation pairs (no model)."""

from __future__ import annotations

import json

import pytest

from cfdpo import pipeline, variants
from cfdpo.errors import CfdpoError
from cfdpo.generate import GenParams, answers_path, plan_rows
from cfdpo.pairs import build_pairs, load_pairs
from cfdpo.recipe import parse_recipe

SCORER = {"name": "lexicon", "desired": "lower", "params": {"words": ["arr"]}}
BEHAVIOUR = {"name": "pirate", "negative": ["Talk like a pirate.", "Answer as a pirate would."], "scorer": SCORER}
RECIPE = {"behaviour": BEHAVIOUR, "variants": ["negation"], "prompts": {"train_size": 6, "eval_size": 2},
          "generation": {"samples": 2, "seed": 5}}


def recipe(**changes):
    data = json.loads(json.dumps(RECIPE))
    for path, value in changes.items():
        section, field = path.split("__")
        data.setdefault(section, {})[field] = value
    return parse_recipe(data, "r.yaml")


def answer_rows(r) -> list[dict]:
    """Planned rows of the recipe's training prompts, answered: the negative answers talk like a pirate."""
    run = pipeline.Run("unused", r)
    train, _ = run.split()
    rows = plan_rows(train, r.needed_conditions(), r.behaviour, r.generation.samples, "m", GenParams(8, 0.7, 0.9),
                     r.generation.seed)
    return [{**row, "answer": f"{'arr matey' if row['condition'] == 'negative' else 'plain'} {row['prompt_id']} "
                              f"{row['sample']}"} for row in rows]


def test_the_retain_row_joins_negation_and_is_no_variant():
    row, scope = variants.RETAIN
    assert (row.prompt, row.placement, row.chosen, row.rejected, row.joins) == ("negative", "system", "negative",
                                                                                "control", "negation")
    assert (scope.prompt, scope.chosen, scope.rejected, scope.joins, scope.own_prompts) == (
        "scope", "scope", "scope_rejected", "negation", True)
    assert variants.retain_rows("negation") == (row,) and variants.retain_rows("dis") == ()
    assert variants.retain_rows("negation", own_prompts=True) == (row, scope)
    assert "retain" not in variants.NAMES and "retain" not in variants.TRAINED_ORDER


def test_retain_pairs_follow_their_row():
    r = recipe(pairs__retain=True)
    rows = answer_rows(r)
    retain = build_pairs(rows, "retain", behaviour=r.behaviour)
    negation = build_pairs(rows, "negation")
    assert len(retain) == len(negation) == 12
    by_key = {row["key"]: row for row in rows}
    for kept, negated in zip(retain, negation):
        chosen, rejected = by_key[kept["chosen_key"]], by_key[kept["rejected_key"]]
        assert (chosen["condition"], rejected["condition"]) == ("negative", "control")
        assert kept["chosen"][0]["content"] == chosen["answer"] and kept["rejected"][0]["content"] == rejected["answer"]
        # the same answers as the negation pair, the other way round
        assert (kept["chosen_key"], kept["rejected_key"]) == (negated["rejected_key"], negated["chosen_key"])
        # the deployer's context: the instruction this prompt's negative answers were asked with, as the system prompt
        instruction, prompt = chosen["messages"][-1]["content"].split("\n\n")
        assert negated["prompt"] == chosen["messages"]
        assert kept["prompt"] == [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]
    assert {p["prompt"][0]["content"] for p in retain} == set(BEHAVIOUR["negative"])  # each prompt's own draw


def test_retain_filter_keeps_pairs_whose_chosen_shows_the_behaviour():
    r = recipe(pairs__retain=True)
    rows = answer_rows(r)
    flipped = {rows[0]["prompt_id"]}  # on this prompt the control answers talk like a pirate, the negative ones do not
    rows = [{**row, "answer": ("arr " if row["condition"] == "control" else "calm ") + row["answer"]}
            if row["prompt_id"] in flipped else row for row in rows]
    from cfdpo.scorers import make_scorer

    scorer = make_scorer("lexicon", {"words": ["arr"]})
    kept = build_pairs(rows, "retain", scorer, "lower", filter_pairs=True, behaviour=r.behaviour)
    assert {p["prompt_id"] for p in kept} == {row["prompt_id"] for row in rows} - flipped
    with pytest.raises(ValueError, match="pass the behaviour"):
        build_pairs(rows, "retain")


def built(tmp_path, r) -> tuple[dict, list[dict]]:
    run = pipeline.Run(tmp_path, r)
    tmp_path.mkdir(parents=True, exist_ok=True)
    answers_path(tmp_path).write_text("".join(json.dumps(row) + "\n" for row in answer_rows(r)), encoding="utf-8")
    stats = pipeline.build_pairs(run)["negation"]
    return stats, load_pairs(tmp_path / "pairs" / "negation").to_list()


def test_scope_aware_negation_mixes_tagged_retain_pairs_deterministically_and_counts_them(tmp_path):
    r = recipe(pairs__retain=True)
    stats, pairs = built(tmp_path / "a", r)
    assert stats["count"] == len(pairs) == 24 and stats["candidates"] == 24
    assert {kind: kind_stats["count"] for kind, kind_stats in stats["kinds"].items()} == {"negation": 12, "retain": 12}
    assert stats["kinds"]["retain"]["score_chosen"] > stats["kinds"]["retain"]["score_rejected"]
    assert json.loads((tmp_path / "a" / "pairs" / "negation" / "stats.json").read_text())["kinds"]["retain"]["count"] == 12
    kinds = [p["kind"] for p in pairs]
    assert sorted(kinds) == ["negation"] * 12 + ["retain"] * 12 and kinds != sorted(kinds)  # mixed
    rows = answer_rows(r)
    order = lambda pair: (pair["prompt_id"], pair["sample"])  # noqa: E731
    assert sorted((p for p in pairs if p["kind"] == "retain"), key=order) == sorted(
        ({**p, "kind": "retain"} for p in build_pairs(rows, "retain", behaviour=r.behaviour)), key=order)
    assert built(tmp_path / "b", r)[1] == pairs  # the same order on every run


def test_a_recipe_without_retain_builds_todays_pairs(tmp_path):
    r = recipe()
    stats, pairs = built(tmp_path, r)
    assert "kinds" not in stats and stats["count"] == 12
    assert pairs == build_pairs(answer_rows(r), "negation")  # no kind column, the table's order
    assert "retain" not in r.to_data()["pairs"]  # recipes written before the field keep their digest
    assert recipe(pairs__retain=False).digest() == r.digest() != recipe(pairs__retain=True).digest()


@pytest.mark.parametrize("changes,message", [
    ({"variants__": ["enc"], "behaviour__negative": None, "behaviour__treatment": "Be plain."},
     "pairs.retain needs behaviour.negative"),
    ({"variants__": ["dis"]}, "pairs.retain needs the negation variant in variants"),
    ({"behaviour__placement": "system"}, "pairs.retain needs behaviour.placement user_prefix or user_suffix"),
])
def test_bad_retain_recipes_get_one_line_errors(changes, message):
    data = json.loads(json.dumps(RECIPE))
    data["pairs"] = {"retain": True}
    for path, value in changes.items():
        section, field = path.split("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    with pytest.raises(CfdpoError, match=message) as err:
        parse_recipe(data, "r.yaml")
    assert str(err.value).startswith("r.yaml: ") and "\n" not in str(err.value)


def test_retain_recipes_train_three_passes_unless_they_say_otherwise():
    assert recipe().dpo.epochs == 1.0
    scope_aware = recipe(pairs__retain=True)
    assert scope_aware.dpo.epochs == 3.0
    assert parse_recipe(scope_aware.to_data(), "again.yaml").dpo.epochs == 3.0  # the saved recipe keeps it
    assert recipe(pairs__retain=True, dpo__epochs=1.5).dpo.epochs == 1.5
