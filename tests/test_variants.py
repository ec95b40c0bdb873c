"""The table of variants is the only list of them: a row added to it is picked up everywhere (no model)."""

from __future__ import annotations

import pytest

from cfdpo import variants
from cfdpo.errors import CfdpoError
from cfdpo.evaluate import find_adapters
from cfdpo.pairs import build_pairs
from cfdpo.recipe import parse_recipe
from cfdpo.report import model_note
from cfdpo.variants import VariantSpec

BEHAVIOUR = {"name": "b", "treatment": "Be plain.", "negative": "Talk like a pirate.",
             "scorer": {"name": "lexicon", "desired": "lower", "params": {"words": ["arr"]}}}
MESSAGES = {c: [{"role": "user", "content": f"{c} prompt"}] for c in variants.CONDITIONS}


@pytest.fixture
def mirror(monkeypatch) -> VariantSpec:
    """A made-up row: the treatment prompt, the control answer preferred to the negative one."""
    row = VariantSpec("mirror", "treatment", "control", "negative", "Mirror", "answer as if not asked")
    table = (*variants.TABLE, row)
    by_name = {v.name: v for v in table if v.joins is None}
    monkeypatch.setattr(variants, "TABLE", table)
    monkeypatch.setattr(variants, "BY_NAME", by_name)
    monkeypatch.setattr(variants, "NAMES", tuple(by_name))
    monkeypatch.setattr(variants, "TRAINED_ORDER", ("sft", *by_name, "multi"))
    return row


def test_a_new_row_is_a_valid_recipe_variant_with_its_conditions_and_instructions(mirror):
    r = parse_recipe({"behaviour": BEHAVIOUR, "variants": ["mirror"]})
    assert r.needed_conditions() == ["control", "treatment", "negative"]
    with pytest.raises(CfdpoError, match="variant 'mirror' needs behaviour.treatment"):
        parse_recipe({"behaviour": {**BEHAVIOUR, "treatment": None}, "variants": ["mirror"]}, "r.yaml")
    with pytest.raises(CfdpoError, match="'negation' or 'mirror'$"):
        parse_recipe({"behaviour": BEHAVIOUR, "variants": ["nope"]}, "r.yaml")


def test_a_new_row_builds_its_pairs(mirror):
    rows = [{"key": c, "prompt_id": "p", "condition": c, "sample": 0, "messages": MESSAGES[c], "answer": f"{c} answer"}
            for c in variants.CONDITIONS]
    (pair,) = build_pairs(rows, "mirror")
    assert pair["prompt"] == MESSAGES["treatment"]
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("control answer", "negative answer")


def test_a_new_row_is_evaluated_and_reported(mirror, tmp_path):
    for name in ("mirror", "enc"):
        (tmp_path / "adapters" / name).mkdir(parents=True)
        (tmp_path / "adapters" / name / "adapter_config.json").write_text("{}")
    assert list(find_adapters(tmp_path)) == ["enc", "mirror"]
    assert model_note("mirror") == "Mirror"
