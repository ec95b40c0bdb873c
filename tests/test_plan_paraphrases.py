"""Instruction paraphrases in training: each prompt's answers use one drawn paraphrase (no model)."""

from __future__ import annotations

from collections import Counter

from cfdpo.generate import GenParams, plan_rows
from cfdpo.spec import Behaviour

SCORER = {"name": "lexicon", "desired": "lower", "params": {"words": ["arr"]}}
PARAPHRASES = ["Talk like a pirate.", "Answer as a pirate would.", "Use pirate slang."]
PARAMS = GenParams(8, 0.7, 0.9)


def prompts(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"Question {i}?"} for i in range(n)]


def negative_instructions(rows: list[dict]) -> dict[str, str]:
    """prompt id -> the instruction its negative rows carry (every sample the same one)."""
    seen: dict[str, set[str]] = {}
    for row in rows:
        if row["condition"] == "negative":
            seen.setdefault(row["prompt_id"], set()).add(row["messages"][-1]["content"].split("\n\n")[0])
    assert all(len(found) == 1 for found in seen.values())
    return {pid: found.pop() for pid, found in seen.items()}


def test_single_instruction_rows_are_exactly_todays():
    behaviour = Behaviour(name="pirate", treatment="Be plain.", negative="Talk like a pirate.", scorer=SCORER)
    rows = plan_rows([{"id": "p1", "prompt": "What is rain?"}], ["control", "treatment", "negative"], behaviour, 2, "m",
                     PARAMS, 3)
    assert [(r["condition"], r["sample"], r["key"], r["messages"][-1]["content"]) for r in rows] == [
        ("control", 0, "14134df4823c0ea2393f4724", "What is rain?"),
        ("control", 1, "891eb60b1a21d64c47051e85", "What is rain?"),
        ("treatment", 0, "9f506369d7cf3ddc4233eb05", "Be plain.\n\nWhat is rain?"),
        ("treatment", 1, "e120166cbfc47980e5242e5c", "Be plain.\n\nWhat is rain?"),
        ("negative", 0, "0c245bb49775a4d9c3e49c1d", "Talk like a pirate.\n\nWhat is rain?"),
        ("negative", 1, "8b8d2a39e41a056d13732546", "Talk like a pirate.\n\nWhat is rain?"),
    ]


def test_each_prompt_draws_one_paraphrase_deterministically_per_seed():
    behaviour = Behaviour(name="pirate", negative=PARAPHRASES, scorer=SCORER)
    plan = lambda seed: plan_rows(prompts(30), ["control", "negative"], behaviour, 2, "m", PARAMS, seed)  # noqa: E731
    drawn = negative_instructions(plan(0))
    assert drawn == negative_instructions(plan(0))  # the same on every run
    assert drawn != negative_instructions(plan(1))  # another seed, another draw
    assert set(Counter(drawn.values())) == set(PARAPHRASES)  # each paraphrase is used
    assert drawn == {f"p{i}": behaviour.instruction_for("negative", f"p{i}", 0) for i in range(30)}
    controls = [r["messages"] for r in plan(0) if r["condition"] == "control"]
    assert controls == [[{"role": "user", "content": f"Question {i}?"}] for i in range(30) for _ in range(2)]
