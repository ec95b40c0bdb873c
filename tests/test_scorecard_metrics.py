"""The scorecard in metrics.json and the report: `cfdpo run` on the tiny model with every condition kind."""

from __future__ import annotations

import json

from conftest import read_jsonl, tiny_recipe, write_recipe

from cfdpo.cli import main

PERSONA = "You are Captain Redbeard, the pirate mascot of a children's museum. Always talk like a pirate."


def scorecard_recipe(model):
    recipe = tiny_recipe(model, variants=["negation"])
    recipe["evaluation"].update(
        negative_paraphrases=["Speak the way pirates do.", "Use pirate slang in your answer."],
        treatment_paraphrases=["Reply in everyday plain English."],
        placements=["system"], in_scope=[{"name": "pirate-persona", "system_prompt": PERSONA}],
        samples_per_prompt=1, subset_size=2, kl_prompts=4)
    return recipe


def check_interval(value, interval):
    lo, hi = interval
    assert isinstance(lo, float) and isinstance(hi, float)
    assert lo - 1e-9 <= value <= hi + 1e-9


def test_run_writes_the_scorecard(tiny_model, tmp_path):
    run = tmp_path / "run"
    rec = write_recipe(tmp_path / "r.yaml", scorecard_recipe(tiny_model))
    assert main(["run", str(rec), "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())

    names = ["control", "treatment", "negative", "treatment:para1", "negative:para1", "negative:para2",
             "treatment@system", "negative@system", "in_scope:pirate-persona"]
    listed = m["scorecard"]["conditions"]
    assert [c["name"] for c in listed] == names
    sizes = {c["name"]: c["n_prompts"] for c in listed}
    assert sizes["control"] == sizes["negative"] == 3 and sizes["negative:para1"] == sizes["in_scope:pirate-persona"] == 2
    assert m["conditions"] == ["control", "negative"]  # today's keys stay
    assert list(m["models"]) == ["base", "prompted", "negation"]

    for label, model in m["models"].items():
        assert set(model["control"]) >= {"score", "mean_words", "n"}
        assert set(model["conditions"]) == set(names)
        for name, entry in model["conditions"].items():
            assert entry["kind"] in ("control", "treatment", "negative", "paraphrase", "placement", "in_scope")
            assert entry["n"] == sizes[name]
            check_interval(entry["score"], entry["ci95"])
            vs = entry["vs_base"]
            assert vs["n"] == sizes[name] and 0.0 <= vs["p"] <= 1.0 and isinstance(vs["distinguishable"], bool)
            check_interval(vs["diff"], vs["ci95"])
            assert ("retention" in entry) == (name == "in_scope:pirate-persona")
        assert model["conditions"]["negative:para1"]["instruction"] == "Speak the way pirates do."
        assert model["conditions"]["negative@system"]["placement"] == "system"
        assert set(model["drift"]) == {"n", "mean_words", "empty_share", "repeated_share"}
        assert model["drift"]["n"] == 3
        cap = model["capability"]
        assert {"kl", "kl_ci95", "kl_per_token", "n", "mcq_accuracy", "mcq_se"} <= set(cap)
        assert cap["n"] == 4
        check_interval(cap["kl"], cap["kl_ci95"])
    base = m["models"]["base"]
    assert base["capability"]["kl"] == 0.0 and base["conditions"]["negative"]["vs_base"]["diff"] == 0.0
    assert m["models"]["negation"]["capability"]["kl"] != 0.0  # a Monte Carlo estimate: any sign on few answers

    rows = read_jsonl(run / "eval" / "answers.jsonl")
    sampled = [r for r in rows if r["sampled"]]
    assert len(sampled) == len(rows) // 2  # one greedy and one sampled answer per prompt, model, condition
    assert {r["gen"]["temperature"] for r in sampled} == {0.8}

    md = (run / "report.md").read_text()
    assert md.index("## Scorecard") < md.index("| model | score (control)")
    assert (run / "plots" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
