"""In-scope retention is oriented so that 1.0 = kept and below 1 = lost, whichever way the behaviour scores."""

from __future__ import annotations

import pytest

from cfdpo.scorecard import Condition, condition_entry, retention

BASE = {"p1": 2.0, "p2": 4.0, "p3": 6.0}
HALF = {pid: value / 2 for pid, value in BASE.items()}
DOUBLE = {pid: value * 2 for pid, value in BASE.items()}


def test_retention_of_a_behaviour_that_shows_as_a_higher_score():
    lost = retention(HALF, BASE, "higher")  # e.g. pirate words per word halved under a pirate persona
    assert lost["ratio"] == pytest.approx(0.5) and lost["orientation"] == "model/base"
    assert retention(DOUBLE, BASE, "higher")["ratio"] == pytest.approx(2.0)


def test_retention_of_a_behaviour_that_shows_as_a_lower_score():
    lost = retention(DOUBLE, BASE, "lower")  # e.g. short answers twice as long where brevity was asked for
    assert lost["ratio"] == pytest.approx(0.5) and lost["orientation"] == "base/model"
    lo, hi = lost["ci95"]
    assert lo <= 0.5 <= hi
    assert retention(BASE, BASE, "lower")["ratio"] == pytest.approx(1.0)


def test_only_in_scope_conditions_report_retention():
    persona = Condition("in_scope:persona", "in_scope", (), "user_prefix", "Be a pirate.", "eval_subset", expect="lower")
    entry = condition_entry(persona, DOUBLE, BASE)
    assert entry["retention"]["ratio"] == pytest.approx(0.5) and entry["n"] == 3
    control = Condition("control", "control", (), "user_prefix", None, "eval")
    assert "retention" not in condition_entry(control, DOUBLE, BASE)
