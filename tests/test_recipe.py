"""Recipe validation: one-line errors naming the field, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cfdpo.cli import main
from cfdpo.errors import CfdpoError
from cfdpo.recipe import RETAIN_EPOCHS, load_recipe, parse_recipe
from cfdpo.spec import DPOSpec

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "behaviour": {"name": "b", "negative": "Talk like a pirate.",
                  "scorer": {"name": "lexicon", "desired": "lower", "params": {"words": ["arr"]}}},
    "variants": ["negation"],
}


def with_(path: str, value):
    import copy

    d = copy.deepcopy(BASE)
    node = d
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is KeyError:
        node.pop(keys[-1])
    else:
        node[keys[-1]] = value
    return d


def test_builtin_recipes_are_valid():
    for name in ("pirate", "concise"):
        r = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert r.model == "smollm2-135m"
    assert load_recipe(REPO / "recipes" / "pirate.yaml").variants == ["dis", "contrastive", "negation"]
    assert load_recipe(REPO / "recipes" / "concise.yaml").variants == ["enc"]


def test_every_shipped_recipe_loads():
    paths = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "behaviours").glob("*.yaml"))
    assert len(paths) >= 14
    for path in paths:
        load_recipe(path)


def test_behaviour_recipes_measure_the_defaults_on_new_behaviours():
    paths = sorted((REPO / "recipes" / "behaviours").glob("*.yaml"))
    recipes = [load_recipe(p) for p in paths]
    names = {r.behaviour.name for r in recipes}
    assert len(recipes) >= 6 and not names & {"pirate", "concise", "names", "bullets", "french", "great-question"}
    assert {v for r in recipes for v in r.variants} == {"enc", "dis", "contrastive", "negation"}
    assert {r.behaviour.scorer.name for r in recipes} >= {"lexicon", "regex", "length", "language"}
    for path, r in zip(paths, recipes):
        assert "dpo" not in yaml.safe_load(path.read_text()), f"{r.behaviour.name}: the dpo section must stay at its defaults"
        assert r.dpo == (DPOSpec(epochs=RETAIN_EPOCHS) if r.pairs.retain else DPOSpec())
        assert r.prompts.source == "everyday" and r.evaluation.kl_source == "general"
        assert r.evaluation.negative_paraphrases or r.evaluation.treatment_paraphrases


def test_defaults_and_needed_conditions():
    r = parse_recipe(BASE)
    assert r.needed_conditions() == ["control", "negative"]
    r2 = parse_recipe(with_("behaviour.treatment", "Be plain.") | {"variants": ["enc", "contrastive"]})
    assert r2.needed_conditions() == ["control", "treatment", "negative"]


@pytest.mark.parametrize("data,msg", [
    (with_("variants", ["nope"]), "variants.0: Input should be 'enc', 'dis', 'contrastive' or 'negation'"),
    (with_("variants", []), "variants: List should have at least 1 item"),
    (with_("variants", ["negation", "negation"]), "variants must not repeat"),
    (with_("variants", ["enc"]), "variant 'enc' needs behaviour.treatment"),
    (with_("behaviour.scorer.name", "nope"), "unknown scorer 'nope'"),
    (with_("behaviour.scorer.desired", "more"), "behaviour.scorer.desired: Input should be 'lower' or 'higher'"),
    (with_("behaviour.negative", KeyError), "give a treatment instruction, a negative instruction, or both"),
    (with_("behaviour.placement", "middle"), "behaviour.placement"),
    (with_("dpo.beta", -1), "dpo.beta: Input should be greater than 0"),
    (with_("dpo.learning_rate", "fast"), "dpo.learning_rate: Input should be a valid number"),
    (with_("generation.samples", 0), "generation.samples"),
    (with_("colour", "red"), "colour: unknown field"),
    (with_("behaviour.extra", 1), "behaviour.extra: unknown field"),
    (with_("behaviour", KeyError), "behaviour: field required"),
])
def test_invalid_recipes(data, msg):
    with pytest.raises(CfdpoError) as e:
        parse_recipe(data, "r.yaml")
    assert msg in str(e.value)
    assert str(e.value).startswith("r.yaml: ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,msg", [
    (b"model: [unclosed\n", "invalid YAML"),
    (b"- just\n- a list\n", "expected a mapping"),
    (b"\xff\xfe bad bytes", "not valid UTF-8"),
    (b"", "expected a mapping"),
])
def test_cli_bad_recipe_files_exit_2_one_line_and_write_nothing(tmp_path, capsys, text, msg):
    rec = tmp_path / "r.yaml"
    rec.write_bytes(text)
    out = tmp_path / "run"
    assert main(["run", str(rec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_missing_recipe_and_unknown_model(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    import yaml

    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(with_("model", str(tmp_path / "no_model_here"))))
    assert main(["generate", str(tmp_path / "o2"), "--recipe", str(rec)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err


def test_run_dir_of_another_recipe_is_refused_and_left_alone(tmp_path, capsys):
    import yaml

    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump(BASE))
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump(with_("dpo.beta", 0.5)))
    from cfdpo.pipeline import open_run

    run = open_run(tmp_path / "run", a)
    before = (run.dir / "recipe.yaml").read_bytes()
    assert main(["generate", str(tmp_path / "run"), "--recipe", str(b)]) == 2
    assert "written by another recipe (differs in: dpo)" in capsys.readouterr().err
    assert (run.dir / "recipe.yaml").read_bytes() == before


@pytest.mark.parametrize("data,msg", [
    ({("behavior" if k == "behaviour" else k): v for k, v in BASE.items()},
     "r.yaml: behavior: unknown field; did you mean 'behaviour'?"),
    (with_("dpo.betta", 0.1), "r.yaml: dpo.betta: unknown field; did you mean 'beta'?"),
    (with_("behaviour.scorer.parms", {}), "r.yaml: behaviour.scorer.parms: unknown field; did you mean 'params'?"),
    (with_("evaluation.lm_eval", {"tasks": ["x"], "limt": 3}),
     "r.yaml: evaluation.lm_eval.limt: unknown field; did you mean 'limit'?"),
    (with_("colour", "red"), "r.yaml: colour: unknown field; expected one of: model, trust_remote_code, behaviour, "
                             "prompts, generation, variants, pairs, dpo, evaluation, tracking"),
    (with_("variants", []) | {"behavior": {}},
     "r.yaml: behavior: unknown field; did you mean 'behaviour'? (and 1 more problem)"),
])
def test_unknown_field_is_reported_first_with_the_closest_name(data, msg):
    with pytest.raises(CfdpoError) as e:
        parse_recipe(data, "r.yaml")
    assert str(e.value) == msg


def test_relative_prompt_file_is_read_from_the_recipe_folder(tmp_path, monkeypatch, tiny_model):
    import json

    import yaml
    from conftest import tiny_recipe

    from cfdpo.pipeline import open_run

    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "p.jsonl").write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(3)))
    rec = folder / "r.yaml"
    rec.write_text(yaml.safe_dump(tiny_recipe(tiny_model, prompts={"source": "p.jsonl", "train_size": 2, "eval_size": 1})))
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    assert load_recipe(rec).prompts.source == str(folder.resolve() / "p.jsonl")
    run = open_run(tmp_path / "run", rec)
    assert len(run.split()[0]) == 2

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reopened = open_run(tmp_path / "run")  # from the run's copy of the recipe
    assert reopened.split() == run.split()
    assert open_run(tmp_path / "run", rec).recipe.digest() == run.recipe.digest()  # same recipe, another directory


def test_relative_in_scope_and_kl_prompt_files_are_read_from_the_recipe_folder(tmp_path, monkeypatch, tiny_model):
    import json

    import yaml
    from conftest import tiny_recipe

    folder = tmp_path / "recipes"
    folder.mkdir()
    for name in ("french.jsonl", "neutral.jsonl"):
        (folder / name).write_text("".join(json.dumps({"prompt": f"{name} {i}?"}) + "\n" for i in range(3)))
    data = tiny_recipe(tiny_model)
    data["evaluation"].update(kl_source="neutral.jsonl",
                              in_scope=[{"name": "french-user", "prompts": "french.jsonl"}, {"name": "builtin", "prompts": "french"}])
    rec = folder / "r.yaml"
    rec.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    ev = load_recipe(rec).evaluation
    assert ev.kl_source == str(folder.resolve() / "neutral.jsonl")
    assert [c.prompts for c in ev.in_scope] == [str(folder.resolve() / "french.jsonl"), "french"]


def test_builtin_set_names_and_absolute_prompt_paths_stay_as_written(tmp_path):
    import yaml

    for source in ("news", str(tmp_path / "p.jsonl")):
        rec = tmp_path / "sub" / "r.yaml"
        rec.parent.mkdir(exist_ok=True)
        rec.write_text(yaml.safe_dump(with_("prompts.source", source)))
        assert load_recipe(rec).prompts.source == source
