"""MCQ scoring on the tiny model, multi-behaviour pair union, benchmark aggregation, and a 2-seed tiny benchmark."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import tiny_recipe, write_recipe

from cfdpo import variants as variant_table
from cfdpo.benchmark.aggregate import mean_std, t975, t_interval
from cfdpo.benchmark.plan import Plan
from cfdpo.benchmark.runner import ResultsStore, _copy_eval_cache, _key, union_pairs
from cfdpo.benchmark.tables import fmt_ms, made_line, render_results, scorecard_table, targets_lines, write_results
from cfdpo.benchmark.targets import load_targets, target_rows
from cfdpo.errors import CfdpoError
from cfdpo.likelihood import continuation_logprobs, load_mcq, mcq_accuracy, mcq_context, shared_context_logprobs
from cfdpo.runio import JsonlLog

REPO_TARGETS = Path(__file__).resolve().parents[1] / "bench" / "targets.yaml"


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from cfdpo.models import load_model, load_tokenizer

    return load_model(str(tiny_model), "float32"), load_tokenizer(str(tiny_model))


def direct_logprob(model, tok, ctx: str, cont: str) -> float:
    """One sequence, no padding, full logits: the reference the batched scorer must match."""
    import torch

    n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
    full = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    return sum(float(logp[i - 1, full[i]]) for i in range(n_ctx, len(full)))


def test_mcq_set_is_builtin_and_well_formed():
    items = load_mcq()
    assert len(items) >= 150
    assert len({it["id"] for it in items}) == len(items)
    for it in items:
        assert len(it["choices"]) == 4 and 0 <= it["answer"] < 4
    assert len(load_mcq(10)) == 10
    assert mcq_context(items[0], "Be brief.").startswith("Be brief.\n\nQuestion: ")


def test_batched_option_logprobs_match_direct_computation(tiny):
    model, tok = tiny
    items = load_mcq(6)
    pairs = [(mcq_context(it), f" {c}") for it in items for c in it["choices"]]
    batched = continuation_logprobs(model, tok, pairs, batch_size=5)  # mixed lengths, left padding
    direct = [direct_logprob(model, tok, c, x) for c, x in pairs]
    assert batched == pytest.approx(direct, abs=1e-3)
    assert all(v < 0 for v in batched)


def test_shared_context_logprobs_match_direct_computation(tiny):
    model, tok = tiny
    items = load_mcq(7)
    groups = [(mcq_context(it), [f" {c}" for c in it["choices"]]) for it in items]
    groups[2] = (groups[2][0], groups[2][1][:2])  # fewer options in one group
    groups.append(("Question: Is it", ["s warm?", " cold?"]))  # "s" merges with the context's last token
    got = shared_context_logprobs(model, tok, groups, batch_size=6)  # several batches, mixed widths
    want = [[direct_logprob(model, tok, c, x) for x in xs] for c, xs in groups]
    assert [len(g) for g in got] == [len(g) for g in want]
    assert [v for g in got for v in g] == pytest.approx([v for g in want for v in g], abs=1e-3)


def test_mcq_accuracy_picks_the_most_likely_option(tiny):
    model, tok = tiny
    items = load_mcq(8)
    best, worst = [], []
    for it in items:
        lp = [direct_logprob(model, tok, mcq_context(it), f" {c}") for c in it["choices"]]
        best.append({**it, "answer": max(range(4), key=lambda j: lp[j])})
        worst.append({**it, "answer": min(range(4), key=lambda j: lp[j])})
    assert mcq_accuracy(model, tok, best)["accuracy"] == 1.0
    assert mcq_accuracy(model, tok, worst)["accuracy"] == 0.0
    r = mcq_accuracy(model, tok, items, instruction="Answer plainly.")
    assert r["n"] == 8 and 0.0 <= r["accuracy_norm"] <= 1.0


def test_union_pairs_keeps_every_pair_tagged_and_shuffles_deterministically():
    a = [{"prompt_id": f"a{i}", "chosen": "x"} for i in range(5)]
    b = [{"prompt_id": f"b{i}", "chosen": "y"} for i in range(3)]
    u = union_pairs({"pirate:negation": a, "concise:enc": b}, seed=1)
    assert len(u) == 8
    assert sorted(p["prompt_id"] for p in u) == sorted(p["prompt_id"] for p in a + b)
    assert {p["source"] for p in u if p["prompt_id"].startswith("a")} == {"pirate:negation"}
    assert union_pairs({"pirate:negation": a, "concise:enc": b}, seed=1) == u
    assert [p["prompt_id"] for p in u] != [p["prompt_id"] for p in a + b]  # shuffled (fixed seed)


def test_mean_std_formatting():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([None, float("nan")]) == (None, None)
    assert fmt_ms([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert fmt_ms([0.5], 3) == "0.500"
    assert fmt_ms([None]) == "–"
    assert fmt_ms([10.0, 12.0], 1) == "11.0 ± 1.4"


def test_t_interval_over_seeds():
    lo, hi = t_interval([1.0, 2.0, 3.0])  # mean 2, std 1, t(2) = 4.303: ± 4.303 / √3
    assert round(lo, 3) == -0.484 and round(hi, 3) == 4.484
    assert t_interval([5.0]) is None and t_interval([]) is None
    assert abs(t975(20) - 2.086) < 0.001 and abs(t975(100) - 1.984) < 0.001  # the expansion past the table


def _fake_results() -> dict:
    def run(recipe, seed, models, conds):
        return {"recipe": recipe, "config": "plain", "seed": seed, "seconds": 10.0, "pairs": {},
                "recipe_data": {"prompts": {"train_size": 4, "eval_size": 2}, "generation": {"samples": 1, "max_new_tokens": 8},
                                "variants": ["negation"], "dpo": {"epochs": 1, "learning_rate": 0.001, "batch_size": 4},
                                "evaluation": {"mcq_items": 10}},
                "metrics": {"behaviour": {"name": recipe, "scorer": "lexicon", "desired": "lower", "unit": "u"},
                            "conditions": conds, "models": models}}

    def m(neg, words, nll, acc, kl=0.0):
        return {"control": {"score": 0.0, "mean_words": words}, "negative": {"score": neg, "mean_words": words},
                "nll_ratio": nll, "mcq_accuracy": acc, "mcq_accuracy_norm": acc, "capability": {"kl_per_token": kl}}

    return {"command": "cfdpo benchmark x", "seeds": 2, "runs": [
        run("pirate", 0, {"base": m(2.0, 30, 1.0, 0.50), "prompted": m(1.0, 30, 1.1, 0.50), "negation": m(0.1, 30, 1.02, 0.49, 0.04)}, ["control", "negative"]),
        run("pirate", 1, {"base": m(2.0, 30, 1.0, 0.50), "prompted": m(1.0, 30, 1.1, 0.50), "negation": m(0.3, 30, 1.08, 0.45, 0.18)}, ["control", "negative"]),
    ]}


def test_targets_say_met_or_missed_and_by_how_much():
    rows = target_rows(_fake_results(), load_targets(REPO_TARGETS))
    assert [x["target"] for x in rows][:3] == ["pirate negation: score under the negative instruction ≤ 10% of base's",
                                               "pirate/plain/negation: KL(base ‖ model) per answer token ≤ 0.1",
                                               "pirate/plain/negation: MCQ accuracy within 2 points of base"]
    t = {x["target"]: x for x in rows}
    neg = t["pirate negation: score under the negative instruction ≤ 10% of base's"]
    assert neg["met"] is True and "10% of base" in neg["value"]  # mean 0.2 vs 2.0
    kl = t["pirate/plain/negation: KL(base ‖ model) per answer token ≤ 0.1"]
    assert kl["met"] is False and kl["value"] == "0.110"  # mean of 0.04 and 0.18
    acc = t["pirate/plain/negation: MCQ accuracy within 2 points of base"]
    assert acc["met"] is False and "(-3.0)" in acc["value"] and acc["gap"] == "+1.0 points"


def test_render_results_has_command_sizes_and_targets(tmp_path):
    res = _fake_results()
    text = render_results(res, Plan({}, 2, tmp_path, tmp_path), [])
    assert "cfdpo benchmark x" in text and "## Sizes" in text and "## pirate" in text
    assert "with its 95 % interval in brackets" in text
    assert "No target rules given" in text and "SmolLM2" not in text  # the setting and targets come from the file
    text = render_results(res, Plan({}, 2, tmp_path, tmp_path, targets=load_targets(REPO_TARGETS)), [])
    assert "Model: SmolLM2-135M-Instruct (the embedded default), CPU. 2 seeds" in text
    assert f"Rules from `{REPO_TARGETS}`; met" in text
    assert "| pirate/plain/negation: KL(base ‖ model) per answer token ≤ 0.1 | 0.110 | [-0.779, 0.999] (2 seeds) | **no** |" in text


def test_target_rules_judge_every_comparison():
    runs = _fake_results()
    rule = {"recipe": "pirate", "model": "negation", "checks": [
        {"label": "at most", "metric": "negative.score", "compare": "at_most", "threshold": 0.1},
        {"label": "share", "metric": "negative.score", "compare": "share_of", "reference": "prompted", "threshold": 25},
        {"label": "times", "metric": "negative.score", "compare": "times_of", "reference": "prompted", "threshold": 0.1, "digits": 1},
        {"label": "at least", "metric": "negative.score", "compare": "at_least", "threshold": 0.1},
        {"label": "bound from prompted", "metric": "negative.score", "compare": "at_most_or", "reference": "prompted",
         "threshold": 0.1},
        {"label": "bound of its own", "metric": "negative.score", "compare": "at_most_or", "reference": "base",
         "threshold": 2.5},
        {"label": "way", "metric": "negative.score", "compare": "way_to", "start": "base", "reference": "prompted",
         "threshold": 190},
        {"label": "no way", "metric": "control.score", "compare": "way_to", "start": "base", "reference": "prompted",
         "threshold": 50},
        {"label": "missing", "metric": "negative.nothing", "compare": "at_most", "threshold": 1}]}
    got = target_rows(runs, load_targets_from({"targets": [rule]}))
    assert got == [
        # per seed 0.1 and 0.3: mean 0.2 ± t(1) 12.706 × std 0.1414 / √2 = ± 1.27
        {"target": "at most", "value": "0.200", "met": False, "gap": "+0.100", "interval": "[-1.07, 1.47] (2 seeds)"},
        {"target": "share", "value": "0.200 vs prompted 1.000 (20% of prompted)", "met": True,
         "gap": "-5 points of prompted's score", "interval": "[-107, 147] (2 seeds)"},
        {"target": "times", "value": "0.2 vs prompted 1.0 (0.20×)", "met": False, "gap": "+0.10×",
         "interval": "[-1.07, 1.47] (2 seeds)"},
        {"target": "at least", "value": "0.200", "met": True, "gap": "-0.100", "interval": "[-1.07, 1.47] (2 seeds)"},
        # the bound rises to prompted's 1.0 (above 0.1); base's 2.0 stays below the threshold 2.5
        {"target": "bound from prompted", "value": "0.200 (bound 1.000: prompted 1.000)", "met": True, "gap": "-0.800",
         "interval": "[-1.07, 1.47] (2 seeds)"},
        {"target": "bound of its own", "value": "0.200 (bound 2.500: base 2.000)", "met": True, "gap": "-2.300",
         "interval": "[-1.07, 1.47] (2 seeds)"},
        # base 2.0 -> prompted 1.0: the adapter's 0.2 is 180% of that way
        {"target": "way", "value": "0.200 from base 2.000 toward prompted 1.000 (180% of the way)", "met": False,
         "gap": "+10 points", "interval": "[52.9, 307] (2 seeds)"},  # per seed 190% and 170%
        {"target": "no way", "value": "0.000 from base 0.000 toward prompted 0.000 (no gap to close)", "met": None,
         "gap": "", "interval": "n=0 seeds"},
    ]


def test_a_way_to_a_teacher_within_noise_of_base_is_not_measurable(tmp_path):
    runs = _fake_results()
    rule = {"recipe": "pirate", "model": "negation", "checks": [
        {"label": "way", "metric": "negative.score", "compare": "way_to", "start": "base", "reference": "prompted",
         "threshold": 50}]}
    targets = load_targets_from({"targets": [rule]})
    met = target_rows(runs, targets)[0]
    assert met["met"] is True and "(180% of the way)" in met["value"]  # no pairing recorded: judged as before

    def pair(distinguishable):
        return {"negative": {"vs_base": {"diff": -1.0, "ci95": [-2.1, 0.1] if not distinguishable else [-1.5, -0.5],
                                         "n": 24, "distinguishable": distinguishable}}}

    for run in runs["runs"]:
        run["metrics"]["models"]["prompted"]["conditions"] = pair(True)
    assert target_rows(runs, targets)[0] == met  # a teacher distinguishable from base: judged
    runs["runs"][0]["metrics"]["models"]["prompted"]["conditions"] = pair(False)
    assert target_rows(runs, targets)[0] == met  # distinguishable in one seed: judged
    for run in runs["runs"]:
        run["metrics"]["models"]["prompted"]["conditions"] = pair(False)
    row = target_rows(runs, targets)[0]
    assert row["met"] is None and row["gap"] == "" and row["value"] == (
        "0.200 from base 2.000 toward prompted 1.000 (180% of the way); not measurable: prompted not "
        "distinguishable from base (difference -1 [-2.1, 0.1], n=24)")
    text = "\n".join(targets_lines(runs, targets))
    assert "| not measurable |" in text and "0 of 0 targets met; 1 not measurable" in text


def test_target_rules_pick_models_by_list_or_every_one_but_the_excluded():
    runs = _fake_results()
    for run in runs["runs"]:
        run["metrics"]["models"]["enc"] = run["metrics"]["models"]["negation"]
    check = [{"label": "{model}", "metric": "capability.kl_per_token", "compare": "at_most", "threshold": 0.1}]
    rules = [{"recipe": "*", "exclude": ["enc"], "checks": check},  # every trained model but enc
             {"recipe": "*", "model": ["enc", "dis"], "checks": check}]  # dis not in these runs: no row
    assert [row["target"] for row in target_rows(runs, load_targets_from({"targets": rules}))] == ["negation", "enc"]


def load_targets_from(data: dict, tmp: Path | None = None):
    import tempfile

    import yaml

    path = Path(tempfile.mkdtemp(dir=tmp)) / "targets.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return load_targets(path)


@pytest.mark.parametrize("rule, message", [
    ({"recipe": "x", "checks": [{"label": "a", "metric": "nll_ratio", "compare": "share_of", "threshold": 1}]}, "give 'reference'"),
    ({"recipe": "x", "checks": [{"label": "a", "metric": "nll_ratio", "compare": "below", "threshold": 1}]}, "targets.0.checks.0.compare"),
    ({"recipe": "x", "checks": [{"label": "a", "metric": "m", "compare": "way_to", "reference": "p", "threshold": 1}]},
     "give 'start'"),
    ({"recipe": "x", "checks": [{"label": "a", "metric": "m", "compare": "share_of", "reference": "p", "start": "b",
                                 "threshold": 1}]}, "give 'start'"),
    ({"recipe": "x", "checks": [{"label": "a", "metric": "m", "compare": "at_least", "reference": "p", "threshold": 1}]},
     "give 'reference'"),
    ({"recipe": "x", "checks": [{"label": "{run}", "metric": "nll_ratio", "compare": "at_most", "threshold": 1}]}, "only {recipe}"),
    ({"recipe": "x", "config": "sometimes", "checks": [{"label": "a", "metric": "m", "compare": "at_most", "threshold": 1}]}, "config 'sometimes'"),
    ({"recipe": "x", "checks": []}, "targets.0.checks"),
    ({"recipe": "x", "checks": [{"label": "a", "metric": "m", "compare": "at_most_or", "threshold": 1}]}, "give 'reference'"),
    ({"recipe": "x", "model": "enc", "exclude": ["sft"],
      "checks": [{"label": "a", "metric": "m", "compare": "at_most", "threshold": 1}]}, "exclude: only with model '*'"),
])
def test_bad_target_rules_are_one_line_errors_naming_the_file_and_field(tmp_path, rule, message):
    with pytest.raises(CfdpoError, match="targets.yaml: ") as err:
        load_targets_from({"targets": [rule]}, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_plan_takes_the_repo_targets_from_its_root_and_none_elsewhere(tmp_path, monkeypatch):
    from cfdpo.benchmark.plan import Sizes, make_plan

    recipe = write_recipe(tmp_path / "pirate.yaml", tiny_recipe(tmp_path, variants=["negation"]))

    def plan(targets=None):
        return make_plan([recipe], 1, tmp_path, tmp_path, Sizes(), None, None, "", targets)

    monkeypatch.chdir(REPO_TARGETS.parents[1])
    assert plan().targets.source == str(Path("bench") / "targets.yaml") and plan().targets.targets
    monkeypatch.chdir(tmp_path)
    assert plan().targets.targets == []
    assert plan(REPO_TARGETS).targets.source == str(REPO_TARGETS)
    with pytest.raises(CfdpoError, match="nope.yaml: targets file not found"):
        plan(tmp_path / "nope.yaml")


def test_repo_targets_name_shipped_recipes_and_their_variants():
    from cfdpo.recipe import load_recipe

    recipes = {r.behaviour.name: r for r in map(load_recipe, sorted(REPO_TARGETS.parents[1].glob("recipes/**/*.yaml")))}
    for rule in load_targets(REPO_TARGETS).targets:
        if rule.recipe != "*":
            assert rule.recipe in recipes and rule.model in recipes[rule.recipe].variants, rule.recipe
        else:  # the variants it names or leaves out are cfdpo's
            assert set(rule.exclude) | ({rule.model} - {"*"} if isinstance(rule.model, str) else set(rule.model)) <= set(variant_table.NAMES)


def test_results_store_records_runs_and_skips_with_reasons(tmp_path):
    saved = []
    store = ResultsStore(tmp_path / "results.json", "cfdpo benchmark x", 2, ["concise"], on_save=saved.append)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"models": {"base": {}, "enc": {}}}))
    run = SimpleNamespace(dir=run_dir, recipe=SimpleNamespace(variants=["enc"], model_dump=lambda mode: {"variants": ["enc"]}))
    store.record("concise", "plain", 0, run, 12.34)
    store.record("concise", "plain", 0, run, 20.0)  # a second record of one run replaces the first
    store.skip("concise", "filter", 0, "no pairs kept")
    with pytest.raises(ValueError):
        store.skip("concise", "bestofk", 0, "")
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [(r["recipe"], r["config"], r["seed"], r["seconds"]) for r in on_disk["runs"]] == [("concise", "plain", 0, 20.0)]
    assert on_disk["skipped"] == [{"recipe": "concise", "config": "filter", "seed": 0, "why": "no pairs kept"}]
    assert len(saved) == 3 and saved[-1] is store.results
    # a new invocation sees the finished run and its earlier wall time
    again = ResultsStore(tmp_path / "results.json", "cfdpo benchmark x", 2, ["concise"])
    assert again.finished("concise", "plain", 0, run_dir, {"enc"}) == 20.0
    assert again.finished("concise", "plain", 0, run_dir, {"enc", "multi"}) is None
    # a recipe changed in evaluation settings only made the evaluate stage due again (manifest.evaluation_changed)
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {"train": {}}}))
    assert again.finished("concise", "plain", 0, run_dir, {"enc"}) is None
    assert again.earlier("concise", "plain", 0) == 20.0 and again.earlier("concise", "plain", 1) == 0.0  # kept when re-run
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {"train": {}, "evaluate": {}}}))
    assert again.finished("concise", "plain", 0, run_dir, {"enc"}) == 20.0
    assert again.results["runs"] == []
    # a benchmark of another recipe into the same --out records only its own runs, yet the one after it still
    # knows concise's earlier wall time
    other = ResultsStore(tmp_path / "results.json", "cfdpo benchmark y", 1, ["names"])
    other.record("names", "plain", 0, run, 5.0)
    third = ResultsStore(tmp_path / "results.json", "cfdpo benchmark x", 2, ["concise"])
    assert third.earlier("concise", "plain", 0) == 20.0 and third.earlier("names", "plain", 0) == 5.0


def test_results_say_which_machines_made_the_runs():
    def run(cpu, bf16, commit):
        return {"made": {"git_commit": commit, "machine": {"cpu": cpu, "cpu_bf16": bf16, "gpu": None}}}

    runs = [run("AMD EPYC", False, "a" * 40), run("AMD EPYC", True, "b" * 40), run("AMD EPYC", False, "c" * 40), {}]
    assert made_line({"runs": runs}) == ("Runs made on: AMD EPYC, no native bf16: 2 runs (commits aaaaaaa, ccccccc); "
                                         "AMD EPYC, native bf16: 1 run (commits bbbbbbb); not recorded: 1 run.")


def test_results_store_keeps_an_archived_record_only_for_the_same_recipe_and_models(tmp_path):
    from cfdpo.recipe import Recipe

    recipe = Recipe.model_validate(tiny_recipe(tmp_path / "model", variants=["enc"]))
    data = recipe.model_dump(mode="json")
    archive = tmp_path / "docs" / "results.json"
    archive.parent.mkdir()
    rec = {"recipe": "concise", "config": "plain", "seed": 0, "seconds": 9.0, "recipe_data": data,
           "metrics": {"models": {"base": {}, "enc": {}}}, "made": {"machine": {"cpu": "X"}}}
    (tmp_path / "run").mkdir()

    def store_of(record):  # the archive alone: no out/results.json of an earlier invocation
        archive.write_text(json.dumps({"command": "cfdpo benchmark concise", "runs": [record]}))
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        return ResultsStore(tmp_path / "out" / "results.json", "cfdpo benchmark concise", 1, ["concise"], archive=archive)

    def run(**update):
        return SimpleNamespace(dir=tmp_path / "run", recipe=recipe.model_copy(update=update))

    store = store_of(rec)
    assert not store.adopt("concise", "plain", 0, run(dpo=recipe.dpo.model_copy(update={"beta": 0.2})), {"enc"})
    assert not store.adopt("concise", "plain", 0, run(), {"enc", "sft"})  # a model it lacks
    assert not store.adopt("concise", "plain", 1, run(), {"enc"})  # no record
    assert store.results["runs"] == []
    assert store.adopt("concise", "plain", 0, run(), {"enc"})
    assert store.results["runs"] == [rec] and store.earlier("concise", "plain", 0) == 9.0
    # a field added to the format since the record was made reads as its default: still the same recipe ...
    older = {**rec, "recipe_data": {**data, "dpo": {k: v for k, v in data["dpo"].items() if k != "rounds"}}}
    assert store_of(older).adopt("concise", "plain", 0, run(), {"enc"})
    # ... unless this run sets it otherwise; and a field the format no longer has makes the record stale
    assert not store_of(older).adopt("concise", "plain", 0, run(dpo=recipe.dpo.model_copy(update={"rounds": 2})), {"enc"})
    gone = {**rec, "recipe_data": {**data, "dpo": {**data["dpo"], "gone": 1}}}
    assert not store_of(gone).adopt("concise", "plain", 0, run(), {"enc"})
    (tmp_path / "run" / "metrics.json").write_text("{}")  # a run directory with metrics is recorded from, not the archive
    assert not store_of(rec).adopt("concise", "plain", 0, run(), {"enc"})


def test_a_benchmark_of_other_recipes_keeps_the_earlier_ones_results(tmp_path):
    """`cfdpo benchmark names --out D` after a benchmark of pirate into D: RESULTS.md still shows pirate,
    saying which command made its runs; names' earlier runs are replaced, not kept."""
    res = _fake_results()
    res["runs"].append({**res["runs"][0], "recipe": "names"})
    res["skipped"] = [{"recipe": "pirate", "config": "filter", "seed": 0, "why": "no pairs kept"}]
    (tmp_path / "results.json").write_text(json.dumps(res))
    store = ResultsStore(tmp_path / "results.json", "cfdpo benchmark names", 1, ["names"])
    assert [(r["recipe"], r["seed"], r["command"]) for r in store.results["runs"]] == [
        ("pirate", 0, "cfdpo benchmark x"), ("pirate", 1, "cfdpo benchmark x")]
    assert store.results["skipped"][0]["command"] == "cfdpo benchmark x"
    text = render_results(store.results, Plan({}, 1, tmp_path, tmp_path), [])
    assert "The runs of pirate are kept from the records of an earlier benchmark:\n\n```\ncfdpo benchmark x\n```" in text
    assert "## pirate" in text


def test_benchmark_end_to_end_tiny_model(tiny_model, tmp_path, monkeypatch):
    import time
    from types import SimpleNamespace

    from cfdpo.cli import main

    small = {"prompts": {"source": "general", "train_size": 4, "eval_size": 2, "seed": 1},
             "generation": {"samples": 1, "max_new_tokens": 6, "temperature": 0.8, "batch_size": 8},
             "evaluation": {"max_new_tokens": 6, "batch_size": 8, "samples": 1, "mcq_items": 8}}
    pirate = tiny_recipe(tiny_model, variants=["negation"], **small)
    pirate["behaviour"]["scorer"] = {"name": "length", "desired": "lower"}  # random-model answers rarely say "arr"
    pirate = write_recipe(tmp_path / "pirate.yaml", pirate)
    concise = tiny_recipe(tiny_model, variants=["enc"], **small)
    concise["behaviour"] = {"name": "concise", "treatment": "Answer in one short sentence.",
                            "scorer": {"name": "length", "desired": "lower"}}
    concise = write_recipe(tmp_path / "concise.yaml", concise)
    out, docs = tmp_path / "bench", tmp_path / "docs"
    args = ["benchmark", str(pirate), str(concise), "--seeds", "2", "--out", str(out), "--docs", str(docs),
            "--samples", "2", "--pair-quality", "pirate:negation", "--set", "dpo.beta=0.2"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    text = (docs / "RESULTS.md").read_text()
    # every planned run either ran or is listed as skipped with its reason (a filter may keep no pair on the
    # tiny model's answers, which differ between CPUs); the plain runs always ran
    ran = {(r["recipe"], r["config"], r["seed"]) for r in res["runs"]}
    skipped = {(sk["recipe"], sk["config"], sk["seed"]): sk["why"] for sk in res.get("skipped", [])}
    plain = {(n, "plain", s) for n in ("pirate", "concise") for s in (0, 1)}
    planned = plain | {("pirate", c, s) for c in ("filter", "bestofk") for s in (0, 1)}
    assert plain <= ran and ran <= planned and not ran & set(skipped)
    assert ran | set(skipped) == planned and len(ran) == len(res["runs"]) and len(skipped) == len(res.get("skipped", []))
    for (name, config, seed), why in skipped.items():
        assert why and f"- {name} {config} seed {seed}: {why}" in text.split("## Runs that did not train")[1]
    for r in res["runs"]:
        models = r["metrics"]["models"]
        assert all(0.0 <= m["mcq_accuracy"] <= 1.0 for m in models.values())
        if r["config"] == "plain":
            assert set(models) == {"base", "prompted", "sft", r["recipe_data"]["variants"][0], "multi"}
        assert r["recipe_data"]["prompts"]["seed"] == 1 and r["recipe_data"]["dpo"]["seed"] == r["seed"]
        assert r["recipe_data"]["dpo"]["beta"] == 0.2  # --set reaches every run of every config
    # the held-out prompts are the same for every seed; greedy base answers are shared, not regenerated
    ids = {tuple(r["metrics"]["eval_prompt_ids"]) for r in res["runs"] if r["recipe"] == "pirate"}
    assert len(ids) == 1
    base_scores = {r["metrics"]["models"]["base"]["negative"]["score"] for r in res["runs"] if r["recipe"] == "pirate"}
    assert len(base_scores) == 1
    assert (out / "pirate" / "seed1-bestofk" / "pairs" / "negation" / "stats.json").is_file()
    best = json.loads((out / "pirate" / "seed0-bestofk" / "pairs" / "negation" / "stats.json").read_text())
    assert best["best_of_k"] is True and best["count"] <= 4
    assert "cfdpo benchmark" in text or "Generated by" in text
    assert "±" in text and "## Pair quality" in text and "## Several behaviours in one adapter" in text
    assert (docs / "benchmark_scores.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun of the same command resumes: finished runs are neither retrained nor re-evaluated
    stamps = {q: q.stat().st_mtime_ns for q in out.rglob("adapter_model.safetensors")}
    metrics_before = (out / "pirate" / "seed1" / "metrics.json").read_bytes()
    ticks = iter(range(0, 10**6, 60))  # a clock that moves a minute per reading: any time counted would show
    with monkeypatch.context() as m:
        m.setattr("cfdpo.benchmark.runner.time", SimpleNamespace(perf_counter=lambda: next(ticks), strftime=time.strftime))
        assert main(args) == 0
    assert {q: q.stat().st_mtime_ns for q in out.rglob("adapter_model.safetensors")} == stamps
    assert (out / "pirate" / "seed1" / "metrics.json").read_bytes() == metrics_before
    rerun = json.loads((out / "results.json").read_text())
    assert len(rerun["runs"]) == len(res["runs"]) and rerun.get("skipped") == res.get("skipped")
    # finished runs keep their recorded wall time: checking them costs none
    assert {_key(r): r["seconds"] for r in rerun["runs"]} == {_key(r): r["seconds"] for r in res["runs"]}
    # a changed evaluation setting re-evaluates every run in place, on the same adapters
    assert main([*args, "--set", "evaluation.kl_prompts=2"]) == 0
    assert {q: q.stat().st_mtime_ns for q in out.rglob("adapter_model.safetensors")} == stamps
    again = json.loads((out / "results.json").read_text())
    assert {r["metrics"]["scorecard"]["kl_prompts"] for r in again["runs"]} == {2} and len(again["runs"]) == len(res["runs"])
    took = {_key(r): r["seconds"] for r in res["runs"]}
    assert all(r["seconds"] >= took[_key(r)] for r in again["runs"])  # the earlier wall time is kept, not replaced
    # elsewhere, with concise's records gone: pirate's runs are kept from docs/results.json, concise's are made,
    # and the multi adapter is trained on concise's pairs and pirate's made again from its answers
    records = json.loads((docs / "results.json").read_text())
    records["runs"] = [r for r in records["runs"] if r["recipe"] != "concise"]
    (docs / "results.json").write_text(json.dumps(records))
    elsewhere = tmp_path / "elsewhere"
    assert main([*args[:6], str(elsewhere), *args[7:], "--set", "evaluation.kl_prompts=2"]) == 0
    made = {q.relative_to(elsewhere).parts[:2] for q in elsewhere.rglob("adapter_model.safetensors")}
    assert made == {("concise", "seed0"), ("concise", "seed1"), ("multi", "seed0"), ("multi", "seed1")}
    assert (elsewhere / "pirate" / "seed1" / "pairs" / "negation").is_dir()
    after = {_key(r): r for r in json.loads((docs / "results.json").read_text())["runs"]}
    assert all(after[_key(r)]["metrics"] == r["metrics"] for r in records["runs"])
    assert {k for k in after if k[0] == "concise"} == {("concise", "plain", 0), ("concise", "plain", 1)}
    assert all("multi" in after[("concise", "plain", s)]["metrics"]["models"] for s in (0, 1))
    # regenerating RESULTS.md keeps a hand-written discussion
    (docs / "RESULTS.md").write_text(text + "\n## Discussion\n\nkept\n")
    write_results(res, Plan({}, 2, out, docs))
    assert (docs / "RESULTS.md").read_text().endswith("## Discussion\n\nkept\n")


def test_scorecard_table_gives_every_figure_its_interval():
    def model(para, retention, kl, repeated=0.0):
        conds = {"control": {"kind": "control", "score": 0.0, "ci95": [0.0, 0.0]},
                 "negative": {"kind": "negative", "score": 1.0, "ci95": [0.5, 1.5]},
                 "in_scope:tutor": {"kind": "in_scope", "score": 0.5, "retention": {"ratio": retention, "ci95": [0.25, 0.75]}}}
        return {"conditions": conds, "groups": {"instruction_of": "negative", "paraphrase": {"score": para, "ci95": [0.1, 0.4]},
                                                "placement": {"score": 0.25, "ci95": [0.0, 0.5]}},
                "capability": {"kl_per_token": kl, "kl_per_token_ci95": [0.01, 0.09], "mcq_accuracy": 0.5, "mcq_se": 0.05},
                "drift": {"repeated_share": repeated, "n": 100}}

    runs = [{"recipe": "x", "config": "plain", "seed": s, "metrics": {"models": {
        "base": model(1.0, 1.0, 0.0), "negation": model(0.2 + 0.2 * s, 0.5 + 0.1 * s, 0.05, 0.1)}}} for s in (0, 1)]
    table = scorecard_table({"runs": runs[:1]}, "x")  # one seed: the run's own intervals
    assert table[0] == ("| model | control | negative (trained wording) | held-out paraphrases | other placements | "
                        "retention: tutor | KL / answer token | repeated answers | MCQ acc (%) |")
    # repeated 10 of 100: Wilson [0.055, 0.174]; MCQ 50 % ± 1.96 × 5 points
    assert table[3] == ("| `negation` | 0.000 [0.000, 0.000] | 1.000 [0.500, 1.500] | 0.200 [0.100, 0.400] | 0.250 [0.000, 0.500] "
                        "| 0.500 [0.250, 0.750] | 0.050 [0.010, 0.090] | 0.100 [0.055, 0.174] | 50.0 [40.2, 59.8] |")
    # two seeds: the mean and its t interval over seeds (paraphrases 0.2, 0.4: ± 12.706 × 0.1414 / √2)
    row = scorecard_table({"runs": runs}, "x")[3].split(" | ")
    assert row[3] == "0.300 [-0.971, 1.571]" and row[1] == "0.000 [0.000, 0.000]"
    # a model the same in both seeds (base: greedy decoding) keeps its interval over prompts, not a zero-width one
    assert scorecard_table({"runs": runs}, "x")[2].split(" | ")[3] == "1.000 [0.100, 0.400]"
    old = [{**r, "metrics": {"models": {"base": {"control": {"score": 0.0}}}}} for r in runs]
    assert scorecard_table({"runs": old}, "x") == []  # results from before the scorecard: no table


def test_plan_picks_default_given_or_none():
    from cfdpo.benchmark.plan import Sizes, make_plan
    from cfdpo.cli import recipe_path

    def plan(pq, multi, methods=None):
        return make_plan([recipe_path("pirate"), recipe_path("concise")], 1, Path("out"), Path("docs"), Sizes(),
                         pq, multi, "", None, methods)

    p = plan(None, None)
    assert p.pair_quality == [("pirate", "negation"), ("concise", "enc")] and len(p.multi) == 2
    p = plan(["none"], ["none"])
    assert p.pair_quality == [] and p.multi == []
    assert plan(["concise:enc"], ["none"]).pair_quality == [("concise", "enc")]
    assert p.methods == [] and plan(None, None, ["pirate:dis"]).methods == [("pirate", "dis")]
    with pytest.raises(CfdpoError, match="--methods: one RECIPE:VARIANT per recipe"):
        plan(None, None, ["pirate:dis", "pirate:negation"])
    with pytest.raises(CfdpoError, match="--methods 'pirate:enc': expected RECIPE:VARIANT with a variant of pirate"):
        plan(None, None, ["pirate:enc"])


def test_set_changes_every_run_of_every_recipe_and_bad_settings_are_one_line_errors():
    from cfdpo.benchmark.aggregate import CONFIGS
    from cfdpo.benchmark.plan import Sizes, derive, make_plan
    from cfdpo.cli import recipe_path
    from cfdpo.recipe import load_recipe, parse_recipe

    def plan(*settings):
        return make_plan([recipe_path("pirate"), recipe_path("names")], 1, Path("out"), Path("docs"), Sizes(),
                         ["none"], ["none"], "", None, None, list(settings))

    p = plan("dpo.auto=true", "dpo.learning_rate=0.0002", "evaluation.subset_size=4")
    assert p.settings_for("pirate") == {"dpo": {"auto": True, "learning_rate": 0.0002}, "evaluation": {"subset_size": 4}}
    pirate = load_recipe(recipe_path("pirate"))
    plain = parse_recipe(derive(pirate, 1, Sizes(), False, settings=p.settings_for("pirate")), "x")
    assert (plain.dpo.auto, plain.dpo.learning_rate, plain.evaluation.subset_size, plain.dpo.seed) == (True, 0.0002, 4, 1)
    rounds = parse_recipe(derive(pirate, 0, Sizes(), False, CONFIGS["rounds"], ["negation"],
                                 settings=p.settings_for("pirate")), "x")
    assert rounds.dpo.auto and rounds.dpo.rounds == CONFIGS["rounds"]["dpo"]["rounds"]  # the config's own on top
    assert derive(pirate, 0, Sizes(), False) == derive(pirate, 0, Sizes(), False, settings=plan().settings_for("pirate"))

    # RECIPE: scopes a setting to one recipe, on top of the settings for every recipe
    p = plan("evaluation.extra_prompts=76", "names:evaluation.extra_prompts=38", "names:dpo.beta=0.2")
    assert p.settings_for("pirate") == {"evaluation": {"extra_prompts": 76}}
    assert p.settings_for("names") == {"evaluation": {"extra_prompts": 38}, "dpo": {"beta": 0.2}}
    for bad, message in (("dpo.auto", "expected [RECIPE:]SECTION.FIELD=VALUE"), ("auto=true", "expected [RECIPE:]SECTION"),
                         ("dpo.auto=[", "VALUE is not valid YAML"), ("model.x=1", "'model' is not a recipe section"),
                         ("dpo.autox=true", "dpo.autox"), ("dpo.learning_rate=-1", "dpo.learning_rate"),
                         ("concise:dpo.auto=true", "--set 'concise:...': no recipe named 'concise' in this benchmark"),
                         # names' prompt set (news, 162) cannot hold 100 more held-out prompts: refused before any run
                         ("evaluation.extra_prompts=100", "= 180 but the set has only 162 prompts; expected at most 82")):
        with pytest.raises(CfdpoError, match=re.escape(message)) as err:
            plan(bad)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_benchmark_methods_run_steering_self_reward_pairs_and_rounds_beside_plain_dpo(tiny_model, tmp_path):
    from cfdpo.cli import main

    pirate = tiny_recipe(tiny_model, variants=["negation"],
                         prompts={"source": "general", "train_size": 6, "eval_size": 2, "seed": 1, "validation_size": 2},
                         generation={"samples": 1, "max_new_tokens": 6, "temperature": 0.8, "batch_size": 8},
                         evaluation={"max_new_tokens": 6, "batch_size": 8, "samples": 1, "mcq_items": 3, "kl_prompts": 2})
    pirate["behaviour"]["scorer"] = {"name": "length", "desired": "lower"}
    recipe = write_recipe(tmp_path / "pirate.yaml", pirate)
    out, docs = tmp_path / "bench", tmp_path / "docs"
    assert main(["benchmark", str(recipe), "--seeds", "1", "--out", str(out), "--docs", str(docs),
                 "--pair-quality", "none", "--multi", "none", "--methods", "pirate:negation"]) == 0
    res = json.loads((out / "results.json").read_text())
    ran = {r["config"]: r for r in res["runs"]}
    skipped = {sk["config"] for sk in res.get("skipped", [])}
    assert set(ran) | skipped == {"plain", "self", "rounds"} and "plain" in ran and "rounds" in ran
    assert set(ran["plain"]["metrics"]["models"]) == {"base", "prompted", "steering", "sft", "negation"}
    assert ran["plain"]["recipe_data"]["evaluation"]["baselines"] == ["steering"]
    assert ran["rounds"]["recipe_data"]["dpo"]["rounds"] == 3 and "steering" not in ran["rounds"]["metrics"]["models"]
    kept = ran["rounds"]["rounds"]["negation"]["kept"]
    assert 1 <= kept <= 3 and (out / "pirate" / "seed0-rounds" / "rounds" / "1" / "adapters" / "negation").is_dir()
    if "self" in ran:
        assert ran["self"]["recipe_data"]["pairs"]["score"] == "self" and ran["self"]["recipe_data"]["pairs"]["filter"]
    text = (docs / "RESULTS.md").read_text()
    table = text.split("## Methods side by side")[1].split("\n## ")[0]
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| `")]
    assert rows[:5] == ["`base`", "`prompted`", "`sft`", "`steering`", "`negation`, plain pairs"]
    assert f"`negation`, on-policy rounds (kept round per seed: {kept})" in rows
    assert ("`negation`, self-reward pairs" in rows) == ("self" in ran)
    assert (docs / "benchmark_tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((docs / "results.json").read_text())["runs"] == res["runs"]  # the records beside RESULTS.md
    assert all(isinstance(r["made"]["machine"]["cpu_bf16"], bool) for r in res["runs"])
    assert "Runs made on: " in text

    # another machine, or a later sitting, has the docs but not the run directories: nothing is made again ...
    args = ["benchmark", str(recipe), "--seeds", "1", "--docs", str(docs), "--pair-quality", "none", "--multi", "none",
            "--methods", "pirate:negation"]
    assert main([*args, "--out", str(tmp_path / "elsewhere")]) == 0
    assert not list((tmp_path / "elsewhere").rglob("adapter_model.safetensors"))
    kept = json.loads((docs / "results.json").read_text())
    assert sorted(map(_key, kept["runs"])) == sorted(map(_key, res["runs"]))
    assert all(r["metrics"] == ran[r["config"]]["metrics"] and r["made"] == ran[r["config"]]["made"] for r in kept["runs"])
    assert (docs / "RESULTS.md").read_text().split("## Methods side by side")[1] == text.split("## Methods side by side")[1]
    # ... but a run without a record: the rounds, made from the plain run's answers made again
    kept["runs"] = [r for r in kept["runs"] if r["config"] != "rounds"]
    (docs / "results.json").write_text(json.dumps(kept))
    assert main([*args, "--out", str(tmp_path / "third")]) == 0
    made = {q.relative_to(tmp_path / "third").parts[1] for q in (tmp_path / "third").rglob("adapter_model.safetensors")}
    assert made == {"seed0-rounds"} and (tmp_path / "third" / "pirate" / "seed0" / "answers.jsonl").is_file()
    assert {r["config"] for r in json.loads((docs / "results.json").read_text())["runs"]} == set(ran)


def test_tradeoff_points_put_every_model_and_each_configs_variant_at_their_kl_and_trained_instruction_score():
    from cfdpo.benchmark.plots import points

    def model(score, kl):
        return {"groups": {"instruction_of": "negative"}, "capability": {"kl_per_token": kl},
                "conditions": {"control": {"score": 9.0}, "negative": {"score": score}}}

    def run(config, seed, models):
        return {"recipe": "pirate", "config": config, "seed": seed, "metrics": {"models": models}}

    res = {"runs": [run("plain", 0, {"base": model(2.0, 0.0), "negation": model(0.2, 0.04)}),
                    run("plain", 1, {"base": model(2.0, 0.0), "negation": model(0.4, 0.08)}),
                    run("rounds", 0, {"base": model(2.0, 0.0), "negation": model(0.1, 0.3)})]}
    got = {label: (kl, score) for label, kl, score in points(res, "pirate")}
    assert set(got) == {"base", "negation", "negation/rounds"}
    assert got["negation"][0][0] == pytest.approx(0.06) and got["negation"][1][0] == pytest.approx(0.3)
    assert got["negation/rounds"] == ((0.3, 0.0), (0.1, 0.0)) and got["base"][1] == (2.0, 0.0)
    for r in res["runs"]:  # a recipe with no negative instruction: the behaviour unasked
        for m in r["metrics"]["models"].values():
            m["groups"]["instruction_of"] = "treatment"
    assert {score for _, _, score in points(res, "pirate")} == {(9.0, 0.0)}


def test_eval_cache_copy_adds_only_missing_untrained_rows(tmp_path):
    """A later run (or one re-evaluated on more prompts) gets the base / prompted answers it lacks, never a
    trained model's, and no row twice."""
    src, dst = tmp_path / "seed0", tmp_path / "seed1"
    rows = [{"key": "a", "model_label": "base", "answer": "A"}, {"key": "b", "model_label": "prompted", "answer": "B"},
            {"key": "c", "model_label": "enc", "answer": "C"}]
    JsonlLog(src / "eval" / "answers.jsonl").append(rows)
    JsonlLog(dst / "eval" / "answers.jsonl").append([{"key": "a", "model_label": "base", "answer": "A"}])
    _copy_eval_cache(src, dst)
    _copy_eval_cache(src, dst)  # twice: nothing more
    got = JsonlLog(dst / "eval" / "answers.jsonl").rows
    assert sorted(r["key"] for r in got) == ["a", "b"]
