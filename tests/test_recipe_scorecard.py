"""Recipe fields of the scorecard: instruction paraphrases, placements, in-scope contexts, and the digest."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe

from cfdpo.cli import main
from cfdpo.errors import CfdpoError
from cfdpo.recipe import dump_recipe, load_recipe, parse_recipe
from cfdpo.spec import EvalSpec

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "behaviour": {"name": "b", "negative": "Talk like a pirate.", "treatment": "Be plain.",
                  "scorer": {"name": "lexicon", "desired": "lower", "params": {"words": ["arr"]}}},
    "variants": ["negation", "enc"],
}
# Recipe.digest() of the shipped recipes before the scorecard fields existed.
# Shipped recipes that no change since has edited (pirate, concise, names and bullets gained held-out
# paraphrases on purpose): fields added to the format since leave their digest alone.
DIGESTS = {"mistral7b-names-enc": "055af4932bbb263f", "mistral7b-pirate-negation": "029d3359dae7012f"}
EVAL_KEYS_BEFORE = {"max_new_tokens", "temperature", "top_p", "batch_size", "samples", "mcq", "mcq_items", "lm_eval"}


def with_(**over) -> dict:
    data = copy.deepcopy(BASE)
    for path, value in over.items():
        node = data
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is None:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    return data


def test_instruction_lists_and_their_accessors():
    r = parse_recipe(with_(behaviour__negative=["Talk like a pirate.", "Speak as a pirate."]))
    assert r.behaviour.negatives() == ["Talk like a pirate.", "Speak as a pirate."]
    assert r.behaviour.treatments() == ["Be plain."]
    assert parse_recipe(with_(behaviour__treatment=None, variants=["negation"])).behaviour.treatments() == []
    assert parse_recipe(with_(behaviour__placement="user_suffix")).behaviour.placement == "user_suffix"


def test_scorecard_fields_defaults_and_values():
    ev = parse_recipe(BASE).evaluation
    assert (ev.negative_paraphrases, ev.treatment_paraphrases, ev.placements, ev.in_scope) == (None, None, None, [])
    assert (ev.samples_per_prompt, ev.subset_size, ev.kl_prompts, ev.kl_source) == (0, 40, 16, "general")
    r = parse_recipe(with_(evaluation={
        "negative_paraphrases": ["Respond as a pirate would."], "placements": ["system"], "samples_per_prompt": 4,
        "in_scope": [{"name": "fr_users", "prompts": "news"}, {"name": "persona", "system_prompt": "You are a pirate."}],
    }))
    assert r.evaluation.in_scope[0].column == "prompt" and r.evaluation.in_scope[1].expect is None


@pytest.mark.parametrize("over,fragment", [
    ({"behaviour__negative": []}, "behaviour.negative: give one instruction or a non-empty list of paraphrases"),
    ({"behaviour__negative": ["Talk like a pirate.", " "]}, "behaviour.negative: entry 1 is empty"),
    ({"behaviour__negative": "  "}, "behaviour.negative: must not be empty"),
    ({"behaviour__negative": ["Talk like a pirate.", "talk like a  PIRATE."]}, "behaviour.negative: entry 1 repeats"),
    ({"behaviour__treatment": ["Be plain.", 3]}, "behaviour.treatment: expected an instruction (text) or a list"),
    ({"evaluation__negative_paraphrases": []}, "evaluation.negative_paraphrases: give at least one held-out paraphrase"),
    ({"evaluation__negative_paraphrases": ["Speak as a pirate.", "  TALK like a pirate. "]},
     "evaluation.negative_paraphrases.1: '  TALK like a pirate. ' is a training instruction"),
    ({"evaluation__treatment_paraphrases": ["Talk like a pirate."]},
     "evaluation.treatment_paraphrases.0: 'Talk like a pirate.' is a training instruction"),
    ({"evaluation__treatment_paraphrases": ["Keep it plain."], "behaviour__treatment": None, "variants": ["negation"]},
     "evaluation.treatment_paraphrases needs behaviour.treatment"),
    ({"evaluation__placements": ["user_prefix"]}, "evaluation.placements: 'user_prefix' is the training placement"),
    ({"evaluation__placements": ["system", "system"]}, "evaluation.placements: placements must not repeat"),
    ({"evaluation__placements": ["middle"]}, "evaluation.placements.0"),
    ({"evaluation__in_scope": [{"name": "french"}]}, "evaluation.in_scope.0: give exactly one of system_prompt"),
    ({"evaluation__in_scope": [{"name": "both", "prompts": "news", "system_prompt": "Be a pirate."}]},
     "evaluation.in_scope.0: give exactly one of system_prompt"),
    ({"evaluation__in_scope": [{"name": "persona", "system_prompt": " "}]},
     "evaluation.in_scope.0: system_prompt must not be empty"),
    ({"evaluation__in_scope": [{"name": ".hidden", "prompts": "news"}]}, "evaluation.in_scope.0.name: '.hidden' is not a name"),
    ({"evaluation__in_scope": [{"name": "a/b", "prompts": "news"}]}, "evaluation.in_scope.0.name: 'a/b' is not a name"),
    ({"evaluation__in_scope": [{"name": "x", "prompts": "news"}, {"name": "x", "system_prompt": "Arr."}]},
     "evaluation.in_scope: in-scope context name 'x' is used twice"),
    ({"evaluation__in_scope": [{"name": "x", "prompts": "news", "expect": "same"}]}, "evaluation.in_scope.0.expect"),
    ({"evaluation__subset_size": 0}, "evaluation.subset_size"),
    ({"evaluation__samples_per_prompt": -1}, "evaluation.samples_per_prompt"),
    ({"evaluation__kl_prompts": -1}, "evaluation.kl_prompts"),
])
def test_bad_scorecard_fields_are_one_line_naming_the_field(over, fragment):
    with pytest.raises(CfdpoError) as e:
        parse_recipe(with_(**over), "r.yaml")
    assert fragment in str(e.value) and str(e.value).startswith("r.yaml: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("over,fragment", [
    ({"evaluation__negative_paraphrases": []}, "evaluation.negative_paraphrases"),
    ({"evaluation__negative_paraphrases": ["talk like a pirate."]}, "evaluation.negative_paraphrases.0"),
    ({"evaluation__in_scope": [{"name": "french", "column": "text"}]}, "evaluation.in_scope.0: give exactly one of"),
    ({"evaluation__in_scope": [{"name": "-x y", "system_prompt": "Arr."}]}, "evaluation.in_scope.0.name"),
])
def test_cli_refuses_bad_scorecard_fields_with_exit_2(tmp_path, capsys, over, fragment):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_(**over)))
    run = tmp_path / "run"
    assert main(["pairs", str(run), "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not run.exists()


def test_shipped_recipes_keep_their_digest_and_saved_form():
    for name, digest in DIGESTS.items():
        r = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert r.digest() == digest, name
        saved = yaml.safe_load(dump_recipe(r))
        assert set(saved["evaluation"]) == EVAL_KEYS_BEFORE
        assert set(json.loads(r.canonical_json())["evaluation"]) == set(saved["evaluation"])


def test_every_new_evaluation_field_is_left_out_at_its_default():
    assert set(EvalSpec.model_fields) - EVAL_KEYS_BEFORE == set(EvalSpec.OMITTED_AT_DEFAULT)


def test_a_set_scorecard_field_is_saved_hashed_and_read_back():
    plain = parse_recipe(BASE)
    for over in ({"subset_size": 12}, {"in_scope": [{"name": "p", "system_prompt": "Arr."}]}, {"placements": []},
                 {"kl_source": "news"}, {"negative_paraphrases": ["Speak as a pirate."]}, {"samples_per_prompt": 2}):
        r = parse_recipe(with_(evaluation=over))
        assert r.digest() != plain.digest(), over
        again = parse_recipe(yaml.safe_load(dump_recipe(r)))
        assert again == r and again.digest() == r.digest()


def test_run_directory_written_before_the_scorecard_fields_is_accepted(tiny_model, tmp_path, capsys):
    """recipe.yaml of an earlier version (no scorecard fields) matches the same recipe file today."""
    from cfdpo.pipeline import open_run

    data = tiny_recipe(tiny_model)
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    open_run(run_dir, rec)
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert set(saved["evaluation"]) == EVAL_KEYS_BEFORE
    before = (run_dir / "recipe.yaml").read_bytes()
    open_run(run_dir, rec)
    assert (run_dir / "recipe.yaml").read_bytes() == before
    data["evaluation"]["max_new_tokens"] = 5  # read by training too (tests/test_reevaluate.py: the other fields)
    rec.write_text(yaml.safe_dump(data))
    assert main(["pairs", str(run_dir), "--recipe", str(rec)]) == 2
    assert "written by another recipe (differs in: evaluation.max_new_tokens)" in capsys.readouterr().err
