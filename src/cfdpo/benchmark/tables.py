"""docs/RESULTS.md: tables of every figure with its 95 % interval (over prompts for one seed, over seeds for
several), the targets table, and a hand-written tail kept."""

from __future__ import annotations

from pathlib import Path

from cfdpo.benchmark.aggregate import PAIR_QUALITY, mean_std, metric_values, run_interval, runs_of, t_interval
from cfdpo.benchmark.plan import Plan
from cfdpo.benchmark.plots import plot_results
from cfdpo.benchmark.targets import Targets, target_rows
from cfdpo.report import fmt_value, md_table
from cfdpo.runio import write_atomic
from cfdpo.variants import NAMES


def fmt_ms(values: list[float], digits: int = 2) -> str:
    """'mean ± std' over seeds; the mean alone for one value, '–' for none."""
    m, sd = mean_std(values)
    if m is None or len([v for v in values if v is not None]) == 1:
        return fmt_value(m, digits)
    return f"{fmt_value(m, digits)} ± {sd:.{digits}f}"


MCQ = ("capability", "mcq_accuracy")


def fmt_ci(runs: list[dict], model: str, path: tuple[str, ...], digits: int = 3, scale: float = 1.0) -> str:
    """One metric of one model with its 95 % interval: for several seeds the mean over seeds and its t interval
    over seeds; for one seed, or a model that gives the same value in every seed (base and prompted decode
    greedily), the run's own interval over prompts (see `run_interval`); '–' where no run has the metric."""
    found = [(r, v) for r, v in zip(runs, metric_values(runs, model, *path)) if v is not None]
    if not found:
        return "–"
    values = [v for _, v in found]
    if len(values) == 1 or max(values) == min(values):
        ci = run_interval(found[0][0]["metrics"]["models"][model], path)
    else:
        ci = t_interval(values)
    m = mean_std(values)[0]
    text = fmt_value(m * scale, digits)
    return text if ci is None else f"{text} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def fmt_metric(runs: list[dict], model: str, path: tuple[str, ...]) -> str:
    """`fmt_ci` at the precision RESULTS.md uses: the MCQ accuracy in % with one decimal, the rest with three."""
    return fmt_ci(runs, model, path, 1, 100.0) if path == MCQ else fmt_ci(runs, model, path)


def scorecard_columns(first: dict) -> tuple[list[str], list[tuple[str, ...]]]:
    """The scorecard's column names and metric paths, from one model's metrics: the control prompt, the
    trained instruction, its held-out paraphrases and other placements, retention in each in-scope context,
    KL per answer token, repeated answers and the MCQ accuracy."""
    instruction = first["groups"]["instruction_of"]
    in_scope = [c for c, v in first["conditions"].items() if v.get("kind") == "in_scope"]
    head = ["control", f"{instruction} (trained wording)", "held-out paraphrases", "other placements",
            *(f"retention: {c.split(':', 1)[1]}" for c in in_scope), "KL / answer token", "repeated answers",
            "MCQ acc (%)"]
    paths = [("conditions", "control", "score"), ("conditions", instruction, "score"),
             ("groups", "paraphrase", "score"), ("groups", "placement", "score"),
             *(("conditions", c, "retention", "ratio") for c in in_scope),
             ("capability", "kl_per_token"), ("drift", "repeated_share"), MCQ]
    return head, paths


def scorecard_table(results: dict, recipe: str, config: str = "plain") -> list[str]:
    """The scorecard with its intervals, one row per model of the recipe's runs in `config`."""
    runs = runs_of(results, recipe, config)
    models = runs[0]["metrics"]["models"] if runs else {}
    first = next(iter(models.values()), {})
    if "groups" not in first:  # results of a version without the scorecard
        return []
    head, paths = scorecard_columns(first)
    rows = [[f"`{name}`", *(fmt_metric(runs, name, path) for path in paths)] for name in models]
    return md_table(["model", *head], rows)


def kept_rounds(runs: list[dict], variant: str) -> str:
    """The round each seed's rounds kept, e.g. '2, 1, 3'."""
    return ", ".join(str(r.get("rounds", {}).get(variant, {}).get("kept", "–")) for r in runs)


def methods_lines(results: dict, picks: list[tuple[str, str]]) -> list[str]:
    """Per method pick: every way to the behaviour side by side on the scorecard: the untrained references,
    SFT and the steering baseline (from the plain runs), the variant on plain pairs, on self-reward-filtered
    pairs and after on-policy rounds."""
    lines = []
    for name, variant in picks:
        plain = runs_of(results, name, "plain")
        if not plain or "groups" not in plain[0]["metrics"]["models"]["base"]:
            continue
        head, paths = scorecard_columns(plain[0]["metrics"]["models"]["base"])
        rows = []
        sources = [(m, "plain", f"`{m}`") for m in ("base", "prompted", "sft", "steering")]
        sources += [(variant, "plain", f"`{variant}`, plain pairs"), (variant, "self", f"`{variant}`, self-reward pairs"),
                    (variant, "rounds", f"`{variant}`, on-policy rounds (kept round per seed: {{kept}})")]
        for model, config, label in sources:
            runs = runs_of(results, name, config)
            if not runs or model not in runs[0]["metrics"]["models"]:
                continue
            pairs = fmt_ms([r["pairs"].get(variant, {}).get("count") for r in runs], 1) if model == variant else ""
            rows.append([label.format(kept=kept_rounds(runs, variant)), pairs,
                         *(fmt_metric(runs, model, path) for path in paths)])
        lines += [f"**{name}: `{variant}`** ({len(plain)} seed{'s' * (len(plain) != 1)})", "",
                  *md_table(["method", "pairs", *head], rows), ""]
        lines += [f"`{sk['config']}` seed {sk['seed']}: not trained ({sk['why']}).\n"
                  for sk in results.get("skipped", []) if sk["recipe"] == name and sk["config"] in ("self", "rounds")]
    return lines


def sizes_lines(results: dict) -> list[str]:
    head = ["recipe", "config", "train prompts", "held-out prompts (other conditions)", "samples/condition", "gen tokens", "variants",
            "DPO epochs × lr × batch", "MCQ items", "seconds/seed"]
    rows = []
    seen = set()
    for r in results["runs"]:
        key = (r["recipe"], r["config"])
        if key in seen:
            continue
        seen.add(key)
        d = r["recipe_data"]
        secs = [x["seconds"] for x in runs_of(results, *key)]
        held_out = d["prompts"]["eval_size"] + d["evaluation"].get("extra_prompts", 0)
        subset = min(held_out, d["evaluation"].get("subset_size", held_out))
        rows.append([r["recipe"], r["config"], f"{d['prompts']['train_size']}", f"{held_out} ({subset})",
                     f"{d['generation']['samples']}", f"{d['generation']['max_new_tokens']}", ", ".join(d["variants"]),
                     f"{d['dpo']['epochs']} × {d['dpo']['learning_rate']} × {d['dpo']['batch_size']}",
                     f"{d['evaluation']['mcq_items']}", f"{sum(secs) / len(secs):.0f}"])
    return md_table(head, rows)


def pair_quality_lines(results: dict, picks: list[tuple[str, str]]) -> list[str]:
    lines = []
    for name, variant in picks:
        plain = runs_of(results, name, "plain")
        if not plain:
            continue
        conds = plain[0]["metrics"]["conditions"]
        head = ["pairs", "kept pairs"] + [f"score ({c})" for c in conds] + ["MCQ acc (%)"]
        rows = []
        for config in ("plain", *PAIR_QUALITY):
            runs = runs_of(results, name, config)
            if not runs:
                continue
            row = [config, fmt_ms([r["pairs"].get(variant, {}).get("count") for r in runs], 1)]
            row += [fmt_metric(runs, variant, (c, "score")) for c in conds] + [fmt_metric(runs, variant, MCQ)]
            rows.append(row)
        base = ", ".join(f"{c} {fmt_metric(plain, 'base', (c, 'score'))}" for c in conds)
        lines += [f"**{name}: `{variant}`** (base: {base})", "", *md_table(head, rows)]
        lines += [f"\n`{sk['config']}` seed {sk['seed']}: not trained ({sk['why']})."
                  for sk in results.get("skipped", []) if sk["recipe"] == name]
        lines.append("")
    return lines


def multi_lines(results: dict, picks: list[tuple[str, str]]) -> list[str]:
    head = ["behaviour", "model", "score (control)", "score (negative)", "MCQ acc (%)"]
    rows = []
    for name, variant in picks:
        runs = runs_of(results, name, "plain")
        if not runs or "multi" not in runs[0]["metrics"]["models"]:
            continue
        for model in ("base", "prompted", variant, "multi"):
            neg = fmt_metric(runs, model, ("negative", "score")) if "negative" in runs[0]["metrics"]["conditions"] else "–"
            rows.append([name, f"`{model}`", fmt_metric(runs, model, ("control", "score")), neg, fmt_metric(runs, model, MCQ)])
    return md_table(head, rows)


def targets_lines(results: dict, targets: Targets) -> list[str]:
    if not targets.targets:
        return ["No target rules given (`cfdpo benchmark --targets FILE`).", ""]
    rows = target_rows(results, targets)
    head = ["target", "measured (mean over seeds)", "95% interval over seeds", "met", "margin (+: missed by)"]
    verdict = {True: "yes", False: "**no**", None: "not measurable"}
    judged = [t for t in rows if t["met"] is not None]
    unmeasured = len(rows) - len(judged)
    return [f"Rules from `{targets.source}`; met or not is judged on the mean.", "",
            *md_table(head, [[t["target"], t["value"], t["interval"], verdict[t["met"]], t["gap"]] for t in rows]),
            "", f"{sum(t['met'] for t in judged)} of {len(judged)} targets met"
            + (f"; {unmeasured} not measurable (a way to a reference within noise of its start)." if unmeasured else "."), ""]


def kept_lines(results: dict) -> list[str]:
    """Where runs of recipes this command did not run come from: an earlier benchmark's records."""
    earlier: dict[str, set[str]] = {}
    for r in results["runs"] + results.get("skipped", []):
        if "command" in r:
            earlier.setdefault(r["command"], set()).add(r["recipe"])
    return [line for cmd, recipes in earlier.items() for line in
            (f"The runs of {', '.join(sorted(recipes))} are kept from the records of an earlier benchmark:",
             "", "```", cmd, "```", "")]


def made_line(results: dict) -> str:
    """Which machines made the runs (a benchmark longer than one sitting goes on where it stopped, maybe
    elsewhere): per machine, how many runs and from which commits."""
    by: dict[str, list[dict]] = {}
    for r in results["runs"]:
        m = (r.get("made") or {}).get("machine")
        what = "not recorded" if not m else (
            f"{m.get('gpu') or m.get('cpu') or 'unknown CPU'}, {'native' if m.get('cpu_bf16') else 'no native'} bf16")
        by.setdefault(what, []).append(r)
    parts = []
    for what, runs in by.items():
        commits = sorted({(r["made"].get("git_commit") or "?")[:7] for r in runs if r.get("made")})
        parts.append(f"{what}: {len(runs)} run{'s' * (len(runs) != 1)}" + (f" (commits {', '.join(commits)})" if commits else ""))
    return "Runs made on: " + "; ".join(parts) + "."


def render_results(results: dict, plan: Plan, plots: list[Path]) -> str:
    names = sorted({r["recipe"] for r in results["runs"]})
    setting = f"{plan.targets.setting} " if plan.targets.setting else ""
    lines = [
        "# cfdpo benchmark results", "",
        "Generated by `cfdpo benchmark` (src/cfdpo/benchmark/) with:", "", "```", results.get("command", ""), "```", "",
        *kept_lines(results),
        (f"The last invocation started {results.get('started')}, finished {results['finished']}, wall time "
         f"{results['seconds'] / 60:.1f} min (each run's own cost, over every invocation, is in the sizes table). "
         if "finished" in results else
         f"The last invocation started {results.get('started')}; **unfinished**: these are the runs done so far "
         f"({len(results['runs'])} run{'s' * (len(results['runs']) != 1)}; seeds done per recipe: "
         + ", ".join(f"{n} {len(runs_of(results, n, 'plain'))}" for n in names) + "). ")
        + setting +
        f"{results['seeds']} seeds: each seed changes generation sampling and DPO/SFT training; the held-out prompts "
        "are the same for every seed. Every figure is on held-out prompts only, with its 95 % interval in brackets: for one "
        "seed the run's own (bootstrap over prompts for scores, retention and KL; ± 1.96 standard errors for the MCQ "
        "accuracy; Wilson's for the share of repeated answers), for several seeds the mean over seeds and its t "
        "interval over seeds (the run's own where a model gives the same value in every seed). "
        "Evaluation decoding is greedy, so `base` and `prompted` do not vary across seeds. " + made_line(results)
        + " The records are in results.json beside this file; a run found there is not made again.", "",
        "Models: `base` the model as it is; `prompted` the base model given the treatment instruction at inference "
        "(the teacher; for pirate under the negative prompt it gets both instructions; for a recipe with only a negative "
        "instruction, the prompt without it); `sft` context-distillation "
        f"baseline (SFT on the same pairs' prompt → chosen answer, same LoRA budget); {'/'.join(f'`{v}`' for v in NAMES)} "
        "the counterfactual DPO variants; `multi` one adapter trained on two behaviours' pairs. "
        "MCQ: accuracy (%) on the builtin multiple-choice set by option log-likelihood.", "",
        "## Sizes", "", *sizes_lines(results), "",
        "## Targets", "", *targets_lines(results, plan.targets),
    ]
    for name in names:
        r0 = runs_of(results, name, "plain")[0]
        b = r0["metrics"]["behaviour"]
        lines += [f"## {name}", "", f"Scorer `{b['scorer']}` ({b.get('unit', '')}), **{b['desired']}** is better. "
                  f"Variants: {', '.join(r0['recipe_data']['variants'])}.", ""]
        scorecard = scorecard_table(results, name)
        if scorecard:
            lines += ["Scorecard (behaviour scores; retention = model / base in the in-scope context; KL(base ‖ model) "
                      "per answer token on base's sampled answers to prompts unrelated to the behaviour; repeated "
                      "answers = share of degenerate control answers):", "", *scorecard, ""]
    if plan.pair_quality:
        lines += ["## Pair quality: plain vs scorer-filtered vs best-of-k", "",
                  "Same training answers for all three; `filter` drops pairs whose chosen answer does not beat the "
                  "rejected one on the scorer, `bestofk` keeps per prompt the chosen/rejected samples with the largest gap.", "",
                  *pair_quality_lines(results, plan.pair_quality)]
    if plan.methods:
        lines += ["## Methods side by side: steering, self-reward pairs, on-policy rounds", "",
                  "Every way to the behaviour on the same answers and the same scorecard: "
                  "`steering` adds to one layer the mean difference of the activations of the desired and the "
                  "undesired training answers (the base model, no training), with layer and strength chosen on the "
                  "validation prompts within dpo.max_kl; `self-reward "
                  "pairs` keeps the pairs whose chosen answer the base model itself finds more likely under the "
                  "desired instruction than under the undesired one (`pairs.score: self`, `pairs.filter: true`); "
                  "`on-policy rounds` regenerates the answers with the previous round's adapter, up to 3 rounds "
                  "(`dpo.rounds: 3`), keeping the last round that improved.", "",
                  *methods_lines(results, plan.methods)]
    if len(plan.multi) >= 2:
        lines += ["## Several behaviours in one adapter", "",
                  f"`multi`: one DPO adapter on the union of {' + '.join(f'{n} `{v}`' for n, v in plan.multi)} pairs "
                  f"(DPO settings of {plan.multi[0][0]} at the lowest learning rate of the recipes), against each single-behaviour adapter.", "",
                  *multi_lines(results, plan.multi), ""]
    if results.get("skipped"):
        lines += ["## Runs that did not train", ""] + [
            f"- {sk['recipe']} {sk['config']} seed {sk['seed']}: {sk['why']}" for sk in results["skipped"]] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines) + "\n"


def write_results(results: dict, plan: Plan) -> Path:
    """docs/RESULTS.md + plots; a hand-written section from '## Discussion' on in an existing file is kept."""
    plan.docs.mkdir(parents=True, exist_ok=True)
    plots = plot_results(results, plan.docs, plan.targets)
    text = render_results(results, plan, plots)
    path = plan.docs / "RESULTS.md"
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        if "\n## Discussion" in old:
            text += old[old.index("\n## Discussion") + 1 :]
    write_atomic(path, text)
    return path
