"""A run reopened with a recipe changed only in evaluation settings is evaluated again in place; its
answers, pairs and adapters stay as they were."""

from __future__ import annotations

import json

import yaml
from conftest import tiny_recipe, write_recipe

from cfdpo.cli import main


def files_under(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_changed_evaluation_settings_re_evaluate_the_run_and_keep_what_was_trained(tiny_model, tmp_path, capsys):
    data = tiny_recipe(tiny_model, variants=["negation"], prompts={"source": "general", "train_size": 4, "eval_size": 2,
                                                                   "seed": 1})
    run = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", data)), "--out", str(run)]) == 0
    trained = {name: files_under(run / name) for name in ("adapters", "pairs")}
    answers = (run / "answers.jsonl").read_bytes()
    assert "negative:para1" not in json.loads((run / "metrics.json").read_text())["models"]["negation"]["conditions"]

    data["evaluation"]["negative_paraphrases"] = ["Speak the way pirates speak."]
    changed = write_recipe(tmp_path / "changed.yaml", data)
    assert main(["pairs", str(run), "--recipe", str(changed)]) == 0  # reopened: evaluate and report are due
    assert not {"evaluate", "report"} & set(json.loads((run / "manifest.json").read_text())["stages"])
    assert main(["run", str(changed), "--out", str(run)]) == 0
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["evaluation"]["negative_paraphrases"] == ["Speak the way pirates speak."]
    conditions = json.loads((run / "metrics.json").read_text())["models"]["negation"]["conditions"]
    assert conditions["negative:para1"]["kind"] == "paraphrase"
    assert {name: files_under(run / name) for name in ("adapters", "pairs")} == trained
    assert (run / "answers.jsonl").read_bytes() == answers
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert {"evaluate", "report"} <= set(stages)

    # a setting training also reads (dpo.auto's validation answers) still needs a new run directory
    data["evaluation"]["max_new_tokens"] = 12
    before = files_under(run)
    assert main(["evaluate", str(run), "--recipe", str(write_recipe(tmp_path / "longer.yaml", data))]) == 2
    assert "differs in: evaluation.max_new_tokens" in capsys.readouterr().err
    assert files_under(run) == before


def test_extra_prompts_grow_the_held_out_set_in_place_and_too_many_are_refused(tiny_model, tmp_path, capsys):
    data = tiny_recipe(tiny_model, variants=["dis"], prompts={"source": "general", "train_size": 4, "eval_size": 2})
    run = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", data)), "--out", str(run)]) == 0
    before = json.loads((run / "metrics.json").read_text())
    adapters = files_under(run / "adapters")

    data["evaluation"].update(extra_prompts=3, subset_size=4)
    assert main(["run", str(write_recipe(tmp_path / "more.yaml", data)), "--out", str(run)]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["n_eval_prompts"] == 5 and after["eval_prompt_ids"][:2] == before["eval_prompt_ids"]
    train_ids = {json.loads(line)["prompt_id"] for line in (run / "answers.jsonl").read_text().splitlines()}
    assert not set(after["eval_prompt_ids"]) & train_ids
    conditions = after["models"]["dis"]["conditions"]
    assert conditions["control"]["n"] == 5 and conditions["negative"]["n"] == 5
    assert files_under(run / "adapters") == adapters

    data["evaluation"]["extra_prompts"] = 400
    saved = files_under(run)
    assert main(["run", str(write_recipe(tmp_path / "huge.yaml", data)), "--out", str(run)]) == 2
    assert "evaluation.extra_prompts: " in capsys.readouterr().err
    assert files_under(run) == saved
