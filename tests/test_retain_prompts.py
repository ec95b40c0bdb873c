"""pairs.retain_prompts: retain pairs from prompts where the behaviour is legitimate by their content
(a user who writes in French) join the negation pairs; their two answers are generated (no model here
but in the last test)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import read_jsonl, tiny_recipe, write_recipe

from cfdpo import pipeline
from cfdpo.cli import main
from cfdpo.errors import CfdpoError
from cfdpo.generate import GenParams, answers_path, plan_rows, plan_scope_rows
from cfdpo.pairs import build_pairs, load_pairs
from cfdpo.prompts import load_prompts, scope_prompts
from cfdpo.recipe import parse_recipe
from cfdpo.scorers import make_scorer

SCORER = {"name": "lexicon", "desired": "lower", "params": {"words": ["bonjour"]}}
SCOPE = {"source": "french", "size": 5, "rejected_instruction": "Answer in English."}
RECIPE = {"behaviour": {"name": "french", "negative": "Answer only in French.", "scorer": SCORER},
          "variants": ["negation"], "prompts": {"train_size": 4, "eval_size": 2}, "generation": {"samples": 2, "seed": 3},
          "pairs": {"retain": True, "retain_prompts": SCOPE},
          "evaluation": {"subset_size": 3, "in_scope": [{"name": "french-user", "prompts": "french"}]}}


def recipe(**pairs):
    data = json.loads(json.dumps(RECIPE))
    data["pairs"].update(pairs)
    return parse_recipe(data, "r.yaml")


def answered(r) -> list[dict]:
    """Every planned row answered: "bonjour" (the behaviour) under the negative instruction and for a
    French prompt as asked, plain otherwise."""
    run = pipeline.Run("unused", r)
    train, _ = run.split()
    params = GenParams(8, 0.7, 0.9)
    rows = plan_rows(train, r.needed_conditions(), r.behaviour, 2, "m", params, 3)
    rows += plan_scope_rows(run.retain_prompts(), SCOPE["rejected_instruction"], r.behaviour, 2, "m", params, 3)
    french = lambda row: row["condition"] in ("negative", "scope")  # noqa: E731
    return [{**row, "answer": f"{'bonjour' if french(row) else 'hello'} {row['prompt_id']} {row['sample']}"}
            for row in rows]


def test_retain_prompts_are_the_first_ones_no_in_scope_evaluation_asks_tagged_apart():
    r = recipe()
    got = pipeline.Run("unused", r).retain_prompts()
    french = load_prompts("french")
    assert [p["prompt"] for p in got] == [p["prompt"] for p in french[3:8]]  # the first 3 are evaluation's
    assert [p["id"] for p in got] == [f"scope:{p['id']}" for p in french[3:8]]
    assert scope_prompts(french, set(), 2, "x")[0]["prompt"] == french[0]["prompt"]
    with pytest.raises(CfdpoError, match="pairs.retain_prompts: x has 58 prompts that no evaluation.in_scope context "
                                         "asks, fewer than size 59"):
        scope_prompts(french, {french[0]["prompt"], french[1]["prompt"]}, 59, "x")
    assert pipeline.Run("unused", recipe(retain_prompts=None)).retain_prompts() == []


def test_scope_rows_ask_each_prompt_as_asked_and_with_the_rejected_instruction():
    r = recipe()
    prompts = pipeline.Run("unused", r).retain_prompts()
    rows = plan_scope_rows(prompts, "Answer in English.", r.behaviour, 2, "m", GenParams(8, 0.7, 0.9), 3)
    assert len(rows) == 5 * 2 * 2 and len({row["key"] for row in rows}) == 20
    first = prompts[0]["prompt"]
    assert [(row["condition"], row["sample"], row["messages"]) for row in rows[:4]] == [
        ("scope", 0, [{"role": "user", "content": first}]), ("scope", 1, [{"role": "user", "content": first}]),
        ("scope_rejected", 0, [{"role": "user", "content": f"Answer in English.\n\n{first}"}]),
        ("scope_rejected", 1, [{"role": "user", "content": f"Answer in English.\n\n{first}"}])]


def test_retain_prompt_pairs_follow_their_row():
    r = recipe()
    rows = answered(r)
    pairs = build_pairs(rows, "retain-prompts")
    by_key = {row["key"]: row for row in rows}
    assert len(pairs) == 10
    for pair in pairs:
        chosen, rejected = by_key[pair["chosen_key"]], by_key[pair["rejected_key"]]
        assert (chosen["condition"], rejected["condition"]) == ("scope", "scope_rejected")
        assert chosen["prompt_id"] == rejected["prompt_id"] == pair["prompt_id"] and pair["prompt_id"].startswith("scope:")
        assert pair["prompt"] == chosen["messages"]  # the prompt as the user wrote it
        assert pair["chosen"][0]["content"] == chosen["answer"] and pair["rejected"][0]["content"] == rejected["answer"]
    # the filter keeps a pair whose chosen answer shows the behaviour: here every one, and none reversed
    scorer = make_scorer("lexicon", {"words": ["bonjour"]})
    assert len(build_pairs(rows, "retain-prompts", scorer, "lower", filter_pairs=True)) == 10
    flipped = [{**row, "answer": row["answer"].replace("bonjour", "hello") if row["condition"] == "scope" else
                row["answer"].replace("hello", "bonjour")} for row in rows]
    assert build_pairs(flipped, "retain-prompts", scorer, "lower", filter_pairs=True) == []


def test_scope_aware_negation_with_retain_prompts_mixes_all_three_kinds(tmp_path):
    r = recipe()
    answers_path(tmp_path).write_text("".join(json.dumps(row) + "\n" for row in answered(r)), encoding="utf-8")
    stats = pipeline.build_pairs(pipeline.Run(tmp_path, r))["negation"]
    assert {k: v["count"] for k, v in stats["kinds"].items()} == {"negation": 8, "retain": 8, "retain-prompts": 10}
    assert sorted(p["kind"] for p in load_pairs(tmp_path / "pairs" / "negation").to_list()) == (
        ["negation"] * 8 + ["retain"] * 8 + ["retain-prompts"] * 10)
    assert recipe(retain_prompts=None).to_data()["pairs"] == {"filter": False, "best_of_k": False, "retain": True}
    # without pairs.filter too, a retain-prompts pair whose rejected instruction did not take is dropped
    untaken = {row["prompt_id"] for row in answered(r) if row["condition"] == "scope"}
    untaken = set(sorted(untaken)[:2])
    rows = [{**row, "answer": row["answer"].replace("hello", "bonjour bonjour")} if row["prompt_id"] in untaken and
            row["condition"] == "scope_rejected" else row for row in answered(r)]
    answers_path(tmp_path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    kept = pipeline.build_pairs(pipeline.Run(tmp_path, r))["negation"]["kinds"]
    assert kept["retain-prompts"]["count"] == 6 and kept["retain-prompts"]["candidates"] == 10
    assert kept["negation"]["count"] == 8  # the other kinds stay unfiltered


@pytest.mark.parametrize("changes,message", [
    ({"retain": False}, "pairs.retain_prompts needs pairs.retain: true"),
    ({"score": "self"}, "pairs.retain_prompts does not combine with pairs.score: self"),
    ({"retain_prompts": {**SCOPE, "source": "general"}}, "pairs.retain_prompts.source: the training prompts' source"),
    ({"retain_prompts": {**SCOPE, "rejected_instruction": " "}}, "rejected_instruction: must not be blank"),
    ({"retain_prompts": {**SCOPE, "size": 0}}, "size"),
])
def test_bad_retain_prompts_get_one_line_errors(changes, message):
    with pytest.raises(CfdpoError, match=message) as err:
        recipe(**changes)
    assert "\n" not in str(err.value)


def test_retain_prompts_end_to_end_on_a_tiny_model(tiny_model, tmp_path, capsys):
    data = tiny_recipe(tiny_model, variants=["negation"], prompts={"source": "general", "train_size": 3, "eval_size": 2,
                                                                   "seed": 1})
    data["generation"]["samples"] = 1
    data["dpo"]["epochs"] = 1
    data["pairs"] = {"retain": True, "retain_prompts": {"source": "french", "size": 3,
                                                        "rejected_instruction": "Answer in English."}}
    data["evaluation"]["in_scope"] = [{"name": "french-user", "prompts": "french"}]
    data["evaluation"]["subset_size"] = 2
    run = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", data)), "--out", str(run)]) == 0
    rows = read_jsonl(run / "answers.jsonl")
    scope = [row for row in rows if row["condition"] in ("scope", "scope_rejected")]
    french = load_prompts("french")
    assert sorted({row["prompt"] for row in scope}) == sorted(p["prompt"] for p in french[2:5])
    stats = json.loads((run / "pairs" / "negation" / "stats.json").read_text())
    assert stats["kinds"]["retain-prompts"]["candidates"] == 3
    assert yaml.safe_load((run / "recipe.yaml").read_text())["pairs"]["retain_prompts"]["size"] == 3
    # too many asked of the set: one line, exit 2, nothing written
    data["pairs"]["retain_prompts"]["size"] = 59
    assert main(["run", str(write_recipe(tmp_path / "big.yaml", data)), "--out", str(tmp_path / "big")]) == 2
    assert "fewer than size 59" in capsys.readouterr().err and not (tmp_path / "big").exists()
