"""Scorecard planning without a model: conversations per placement, paraphrase draws, conditions, drift."""

from __future__ import annotations

import copy
from collections import Counter

import pytest

from cfdpo import counterfactual
from cfdpo.counterfactual import conversation
from cfdpo.recipe import parse_recipe
from cfdpo.scorecard import condition_prompts, drift, is_repetitive, plan_conditions

SCORER = {"name": "lexicon", "desired": "lower", "params": {"words": ["arr"]}}
PIRATE = {
    "behaviour": {"name": "pirate", "negative": "Talk like a pirate.", "treatment": "Answer plainly.", "scorer": SCORER},
    "variants": ["negation", "enc"],
}
PARAPHRASES = ["Talk like a pirate.", "Answer the way a pirate would.", "Speak as a buccaneer."]


def recipe(behaviour: dict | None = None, evaluation: dict | None = None):
    data = copy.deepcopy(PIRATE)
    data["behaviour"].update(behaviour or {})
    data["evaluation"] = evaluation or {}
    if data["behaviour"]["treatment"] is None:
        data["variants"] = ["negation"]
    return parse_recipe(data)


def system_msg(text):
    return {"role": "system", "content": text}


def user_msg(text):
    return {"role": "user", "content": text}


@pytest.mark.parametrize("placement,system_prompt,expected", [
    ("user_prefix", None, [user_msg("Be brief.\n\nWhy?")]),
    ("user_prefix", "You are Bob.", [system_msg("You are Bob."), user_msg("Be brief.\n\nWhy?")]),
    ("user_suffix", None, [user_msg("Why?\n\nBe brief.")]),
    ("user_suffix", "You are Bob.", [system_msg("You are Bob."), user_msg("Why?\n\nBe brief.")]),
    ("system", None, [system_msg("Be brief."), user_msg("Why?")]),
    ("system", "You are Bob.", [system_msg("Be brief.\n\nYou are Bob."), user_msg("Why?")]),
])
def test_conversation_places_the_instruction(placement, system_prompt, expected):
    assert conversation("Why?", "Be brief.", placement, system_prompt) == expected
    control = [system_msg(system_prompt)] if system_prompt else []
    assert conversation("Why?", None, placement, system_prompt) == control + [user_msg("Why?")]


def test_conversation_refuses_an_unknown_placement():
    with pytest.raises(ValueError, match="unknown placement 'middle'"):
        conversation("Why?", "Be brief.", "middle")


@pytest.mark.parametrize("behaviour,expected", [
    ({}, {"control": [user_msg("Why?")], "treatment": [user_msg("Answer plainly.\n\nWhy?")],
          "negative": [user_msg("Talk like a pirate.\n\nWhy?")]}),
    ({"system_prompt": "You are Bob."}, {
        "control": [system_msg("You are Bob."), user_msg("Why?")],
        "treatment": [system_msg("You are Bob."), user_msg("Answer plainly.\n\nWhy?")],
        "negative": [system_msg("You are Bob."), user_msg("Talk like a pirate.\n\nWhy?")]}),
    ({"placement": "system"}, {"control": [user_msg("Why?")], "treatment": [system_msg("Answer plainly."), user_msg("Why?")],
                               "negative": [system_msg("Talk like a pirate."), user_msg("Why?")]}),
    ({"placement": "user_suffix"}, {"control": [user_msg("Why?")], "treatment": [user_msg("Why?\n\nAnswer plainly.")],
                                    "negative": [user_msg("Why?\n\nTalk like a pirate.")]}),
])
def test_messages_of_single_instruction_recipes_are_todays(behaviour, expected):
    b = recipe(behaviour).behaviour
    for condition, conv in expected.items():
        assert counterfactual.messages("Why?", condition, b) == conv
        assert counterfactual.messages("Why?", condition, b, prompt_id="p7", seed=3) == conv


def test_messages_refuse_unknown_conditions_and_missing_instructions():
    b = recipe({"treatment": None}).behaviour
    with pytest.raises(ValueError, match="no treatment instruction"):
        counterfactual.messages("Why?", "treatment", b)
    with pytest.raises(ValueError, match="unknown condition"):
        counterfactual.messages("Why?", "sideways", b)


def test_paraphrase_draw_is_deterministic_per_seed_and_spread_across_the_list():
    b = recipe({"negative": PARAPHRASES}).behaviour
    ids = [f"p{i}" for i in range(300)]
    draws = [b.instruction_for("negative", pid, seed=0) for pid in ids]
    assert draws == [b.instruction_for("negative", pid, seed=0) for pid in ids]
    counts = Counter(draws)
    assert set(counts) == set(PARAPHRASES) and min(counts.values()) >= 75
    other_seed = [b.instruction_for("negative", pid, seed=1) for pid in ids]
    assert 100 < sum(a != o for a, o in zip(draws, other_seed)) < 300
    assert counterfactual.messages("Why?", "negative", b, prompt_id="p5") == [user_msg(f"{draws[5]}\n\nWhy?")]
    assert b.instruction_for("treatment", "p5") == "Answer plainly."  # a single instruction is never drawn
    with pytest.raises(ValueError, match="pass prompt_id"):
        counterfactual.messages("Why?", "negative", b)


def test_plan_conditions_default_placements_and_in_scope_contexts():
    r = recipe(evaluation={
        "negative_paraphrases": ["Respond like a pirate.", "Pirate talk, please."],
        "in_scope": [{"name": "captain", "system_prompt": "You are Captain Flint, a pirate."},
                     {"name": "sea.stories", "prompts": "news", "column": "prompt", "expect": "lower"}],
    })
    plan = {c.name: c for c in plan_conditions(r)}
    assert list(plan) == ["control", "treatment", "negative", "negative:para1", "negative:para2",
                          "treatment@user_suffix", "negative@user_suffix", "treatment@system", "negative@system",
                          "in_scope:captain", "in_scope:sea.stories"]
    assert [c.kind for c in plan.values()] == ["control", "treatment", "negative", "paraphrase", "paraphrase",
                                               "placement", "placement", "placement", "placement",
                                               "in_scope", "in_scope"]
    assert plan["control"].instruction is None and plan["control"].prompt_source == "eval"
    assert plan["negative:para2"].messages("Why?") == [user_msg("Pirate talk, please.\n\nWhy?")]
    assert plan["negative:para2"].prompt_source == "eval_subset" and plan["negative:para2"].instruction_of == "negative"
    assert plan["negative@user_suffix"].messages("Why?") == [user_msg("Why?\n\nTalk like a pirate.")]
    assert plan["treatment@system"].messages("Why?") == [system_msg("Answer plainly."), user_msg("Why?")]
    captain = plan["in_scope:captain"]
    assert captain.messages("Why?") == [system_msg("You are Captain Flint, a pirate."), user_msg("Why?")]
    assert captain.expect == "higher"  # the scorer wants pirate words lower; here they should stay
    assert captain.prompt_source == "eval_subset"
    stories = plan["in_scope:sea.stories"]
    assert (stories.prompt_source, stories.expect, stories.messages("Why?")) == ("news", "lower", [user_msg("Why?")])


def test_plan_conditions_explicit_placements_and_training_paraphrases():
    r = recipe({"negative": PARAPHRASES, "treatment": None, "system_prompt": "You are Bob."},
               evaluation={"placements": ["system"]})
    plan = {c.name: c for c in plan_conditions(r)}
    assert list(plan) == ["control", "negative", "negative@system"]
    negative = plan["negative"]
    assert negative.instructions == tuple(PARAPHRASES) and negative.instruction is None
    for pid in ("p1", "p2", "p3", "p4"):
        assert negative.messages("Why?", pid, seed=2) == counterfactual.messages("Why?", "negative", r.behaviour, pid, 2)
    drawn = r.behaviour.instruction_for("negative", "p1", 2)
    assert plan["negative@system"].messages("Why?", "p1", seed=2) == [system_msg(f"{drawn}\n\nYou are Bob."), user_msg("Why?")]
    assert [c.name for c in plan_conditions(recipe(evaluation={"placements": []}))] == ["control", "treatment", "negative"]


def test_condition_prompts():
    r = recipe(evaluation={"subset_size": 2, "in_scope": [{"name": "news", "prompts": "news"}]})
    plan = {c.name: c for c in plan_conditions(r)}
    rows = [{"id": str(i), "prompt": f"q{i}?"} for i in range(5)]
    assert condition_prompts(plan["control"], rows, 2) == rows
    assert condition_prompts(plan["negative@system"], rows, 2) == rows[:2]
    from cfdpo.prompts import load_prompts

    assert condition_prompts(plan["in_scope:news"], rows, 2) == load_prompts("news")[:2]


@pytest.mark.parametrize("answer,repeated", [
    ("Arrr, arrr, arrr, arrr, arrr, arrr, arrr, arrr, arrr, arrr", True),
    ("I am here. I am here. I am here.", True),
    ("The sea is big. " * 3, True),
    ("Arrr, arrr, arrr, arrr, arrr, arrr, arrr", False),  # seven words: too short to call degenerate
    ("It was very, very, very good.", False),
    ("The water cycle moves water between the sea, the air and the land. The sun warms the sea, the water "
     "evaporates, the vapour cools into clouds, and the clouds return the water as rain to the land and the sea.", False),
    ("", False),
])
def test_is_repetitive(answer, repeated):
    assert is_repetitive(answer) is repeated


def test_drift_shares_and_mean_words():
    d = drift(["Arrr, arrr, arrr, arrr, arrr, arrr, arrr, arrr, arrr, arrr", "Hello there, friend.", "  \n", "Fine."])
    assert d == {"n": 4, "mean_words": (10 + 3 + 0 + 1) / 4, "empty_share": 0.25, "repeated_share": 0.25}
    assert drift([]) == {"n": 0, "mean_words": None, "empty_share": None, "repeated_share": None}
