"""`cfdpo benchmark`: every recipe for several seeds, pair-quality ablations, a multi-behaviour
adapter, and `docs/RESULTS.md` with mean ± std over seeds on the held-out prompts.

    out/
      recipes/<name>-seed<s>[-filter|-bestofk].yaml   the derived recipes the runs were made with
      <name>/seed<s>/            the plain run (all variants + the SFT baseline); adapters/multi added later
      <name>/seed<s>-filter/     scorer-filtered pairs (pair-quality recipes, one variant)
      <name>/seed<s>-bestofk/    best-of-k pairs
      multi/seed<s>/             union of two recipes' pairs and the adapter trained on it
      results.json               every run's metrics, sizes and wall time

Seeds vary generation sampling and training (`generation.seed`, `dpo.seed`); `prompts.seed` is
kept, so every seed is evaluated on the same held-out prompts. Evaluation is greedy, so the base
and prompted answers (and their multiple-choice scores) are the same for every seed and are
copied between runs instead of recomputed; the filter / best-of-k runs reuse the plain run's
training answers, so they differ only in which pairs are kept.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cfdpo.errors import CfdpoError
from cfdpo.runio import JsonlLog, read_json, write_atomic, write_json
from cfdpo.spec import Recipe, load_recipe

PAIR_CONFIGS = {"plain": {}, "filter": {"filter": True}, "bestofk": {"best_of_k": True}}
TRAINED_ORDER = ("sft", "enc", "dis", "contrastive", "negation", "multi")


@dataclass
class Sizes:
    train_size: int | None = None
    eval_size: int | None = None
    samples: int | None = None  # generation samples per condition for the pair-quality recipes (best-of-k's k)
    mcq_items: int | None = None


@dataclass
class Plan:
    recipes: dict[str, Path]  # behaviour name -> recipe file
    seeds: int
    out: Path
    docs: Path
    sizes: Sizes = field(default_factory=Sizes)
    pair_quality: list[tuple[str, str]] = field(default_factory=list)  # (recipe name, variant)
    multi: list[tuple[str, str]] = field(default_factory=list)
    command: str = ""


def parse_pick(value: str, recipes: dict[str, Recipe], what: str) -> tuple[str, str]:
    """'pirate:negation' -> ('pirate', 'negation'), checked against the recipes."""
    name, _, variant = value.partition(":")
    if name not in recipes:
        raise CfdpoError(f"{what} '{value}': no recipe named '{name}' in this benchmark ({', '.join(recipes)})")
    if variant not in recipes[name].variants:
        raise CfdpoError(f"{what} '{value}': expected RECIPE:VARIANT with a variant of {name} "
                         f"({', '.join(recipes[name].variants)})")
    return name, variant


def derive(recipe: Recipe, seed: int, sizes: Sizes, pair_quality: bool, pairs: dict | None = None,
           variants: list[str] | None = None) -> dict:
    """The recipe as the benchmark runs it for one seed (a plain dict, ready for YAML)."""
    d = recipe.model_dump(mode="json")
    d["generation"]["seed"] = seed
    d["dpo"]["seed"] = seed
    d["evaluation"]["mcq"] = True
    if sizes.mcq_items:
        d["evaluation"]["mcq_items"] = sizes.mcq_items
    if sizes.train_size:
        d["prompts"]["train_size"] = sizes.train_size
    if sizes.eval_size:
        d["prompts"]["eval_size"] = sizes.eval_size
    if pair_quality and sizes.samples:
        d["generation"]["samples"] = sizes.samples
    if pairs:
        d["pairs"].update(pairs)
    if variants:
        d["variants"] = variants
    return d


def union_pairs(parts: dict[str, list[dict]], seed: int) -> list[dict]:
    """Several behaviours' pairs as one shuffled training set; each pair keeps a `source` tag."""
    import random

    rows = [{**p, "source": name} for name, ps in parts.items() for p in ps]
    random.Random(seed).shuffle(rows)
    return rows


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the values that are not None/NaN."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def fmt_ms(values: list[float], digits: int = 2) -> str:
    m, sd = mean_std(values)
    if m is None:
        return "–"
    if len([v for v in values if v is not None]) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


# ---------------------------------------------------------------------------------------------- running


def _copy_eval_cache(src: Path, dst: Path) -> None:
    """Seed a new run's evaluation caches with the base / prompted answers and all MCQ results of `src`."""
    s_ans, d_ans = src / "eval" / "answers.jsonl", dst / "eval" / "answers.jsonl"
    if s_ans.is_file() and not d_ans.exists():
        rows = [r for r in JsonlLog(s_ans).rows if r.get("model_label") in ("base", "prompted")]
        JsonlLog(d_ans).append(rows)
    s_mcq, d_mcq = src / "eval" / "mcq.json", dst / "eval" / "mcq.json"
    if s_mcq.is_file():
        merged = {**read_json(s_mcq), **(read_json(d_mcq) if d_mcq.is_file() else {})}
        write_json(d_mcq, merged)


def _open(plan: Plan, data: dict, tag: str, run_dir: Path):
    from cfdpo.pipeline import open_run

    path = plan.out / "recipes" / f"{tag}.yaml"
    write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return open_run(run_dir, path)


def _log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_benchmark(plan: Plan) -> dict:
    from cfdpo import pipeline

    recipes = {name: load_recipe(p) for name, p in plan.recipes.items()}
    pq = dict(plan.pair_quality)
    results: dict = {"command": plan.command, "seeds": plan.seeds, "runs": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_all = time.perf_counter()

    def record(name: str, config: str, seed: int, run, seconds: float) -> None:
        results["runs"] = [r for r in results["runs"] if (r["recipe"], r["config"], r["seed"]) != (name, config, seed)]
        results["runs"].append({
            "recipe": name, "config": config, "seed": seed, "dir": str(run.dir), "seconds": round(seconds, 1),
            "recipe_data": run.recipe.model_dump(mode="json"), "metrics": read_json(run.dir / "metrics.json"),
            "pairs": {v: read_json(run.dir / "pairs" / v / "stats.json") for v in run.recipe.variants
                      if (run.dir / "pairs" / v / "stats.json").is_file()},
        })
        write_json(plan.out / "results.json", results)
        write_results(results, plan)  # after every run, so an interrupted benchmark still has its results

    prev = read_json(plan.out / "results.json")["runs"] if (plan.out / "results.json").is_file() else []

    def finished(name: str, config: str, seed: int, run_dir: Path, expected: set[str]) -> float | None:
        """A rerun of the benchmark skips runs whose metrics already cover every model; returns their old seconds."""
        m = run_dir / "metrics.json"
        if not m.is_file() or not expected <= set(read_json(m)["models"]):
            return None
        return next((r["seconds"] for r in prev if (r["recipe"], r["config"], r["seed"]) == (name, config, seed)), 0.0)

    for seed in range(plan.seeds):
        plain_runs = {}
        multi_done = False
        for name, recipe in recipes.items():
            t0 = time.perf_counter()
            data = derive(recipe, seed, plan.sizes, name in pq)
            run_dir = plan.out / name / f"seed{seed}"
            if seed > 0:
                _copy_eval_cache(plan.out / name / "seed0", run_dir)
            run = _open(plan, data, f"{name}-seed{seed}", run_dir)
            sft = any(v in run.recipe.variants for v in ("enc", "contrastive", "negation"))
            old = finished(name, "plain", seed, run_dir, set(run.recipe.variants) | ({"sft"} if sft else set()))
            if old is None:
                _log(f"{name} seed {seed}: plain run{' + SFT' if sft else ''}")
                try:
                    pipeline.run_all(run, sft=sft)
                except CfdpoError as e:  # e.g. no pairs left after filtering: report it, run the rest
                    _log(f"{name} seed {seed}: failed: {e}")
                    results.setdefault("skipped", []).append({"recipe": name, "config": "plain", "seed": seed, "why": str(e)})
                    continue
            plain_runs[name] = run
            record(name, "plain", seed, run, time.perf_counter() - t0 + (old or 0.0))
            for config in ("filter", "bestofk"):
                if name not in pq:
                    continue
                t0 = time.perf_counter()
                qdir = plan.out / name / f"seed{seed}-{config}"
                qdir.mkdir(parents=True, exist_ok=True)
                if not (qdir / "answers.jsonl").exists():
                    shutil.copyfile(run_dir / "answers.jsonl", qdir / "answers.jsonl")
                _copy_eval_cache(run_dir, qdir)
                qdata = derive(recipe, seed, plan.sizes, True, PAIR_CONFIGS[config], [pq[name]])
                qrun = _open(plan, qdata, f"{name}-seed{seed}-{config}", qdir)
                old = finished(name, config, seed, qdir, {pq[name]})
                if old is None:
                    _log(f"{name} seed {seed}: {config} pairs, variant {pq[name]}")
                    pipeline.generate(qrun)  # nothing new: the plain run's answers are there
                    kept = pipeline.build_pairs(qrun)[pq[name]]["count"]
                    if kept == 0:  # nothing to train on: say so in RESULTS.md instead of failing the benchmark
                        results.setdefault("skipped", []).append({"recipe": name, "config": config, "seed": seed,
                                                                  "why": "no pairs kept"})
                        continue
                    pipeline.train(qrun)
                    pipeline.evaluate(qrun)
                    pipeline.report(qrun)
                record(name, config, seed, qrun, time.perf_counter() - t0 + (old or 0.0))
            # the multi-behaviour adapter as soon as its recipes' pairs exist
            if not multi_done and len(plan.multi) >= 2 and all(n in plain_runs for n, _ in plan.multi):
                multi_done = True
                t0 = time.perf_counter()
                _log(f"seed {seed}: multi-behaviour adapter on {' + '.join(f'{n}:{v}' for n, v in plan.multi)}")
                adapter = train_multi(plan, plain_runs, seed)
                for mname, _ in plan.multi:
                    mrun = plain_runs[mname]
                    dst = mrun.dir / "adapters" / "multi"
                    if finished(mname, "plain", seed, mrun.dir, {"multi"}) is not None and dst.is_dir():
                        continue
                    if dst.exists():
                        shutil.rmtree(dst)
                    shutil.copytree(adapter, dst)
                    pipeline.evaluate(mrun)
                    pipeline.report(mrun)
                    record(mname, "plain", seed, mrun, results_seconds(results, mname, seed) + time.perf_counter() - t0)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(plan.out / "results.json", results)
    write_results(results, plan)
    return results


def results_seconds(results: dict, name: str, seed: int) -> float:
    return next(r["seconds"] for r in results["runs"] if (r["recipe"], r["config"], r["seed"]) == (name, "plain", seed))


def train_multi(plan: Plan, runs: dict, seed: int) -> Path:
    """One DPO adapter on the union of the chosen recipes' pairs: the first recipe's DPO settings with
    the lowest learning rate among the recipes (twice the pairs at the same rate as a single adapter
    moved the model too far: MCQ -6.7 points at seed 0 with pirate's 1e-3)."""
    from cfdpo.pairs import load_pairs, write_pairs
    from cfdpo.runtime import set_threads
    from cfdpo.train import train_dpo

    parts = {f"{n}:{v}": load_pairs(runs[n].dir / "pairs" / v).to_list() for n, v in plan.multi}
    pairs = union_pairs(parts, seed)
    d = plan.out / "multi" / f"seed{seed}"
    stats = {"count": len(pairs), "parts": {k: len(v) for k, v in parts.items()}}
    ds_dir = write_pairs(pairs, d / "pairs", stats)
    first = runs[plan.multi[0][0]]
    out = d / "adapter"
    if not (out / "adapter_config.json").is_file():
        set_threads()
        lr = min(runs[n].recipe.dpo.learning_rate for n, _ in plan.multi)
        spec = first.recipe.dpo.model_copy(update={"learning_rate": lr})
        train_dpo(first.model_path, load_pairs(ds_dir), spec, out)
    return out


# ---------------------------------------------------------------------------------------------- RESULTS.md


def _runs(results: dict, recipe: str, config: str) -> list[dict]:
    return sorted((r for r in results["runs"] if r["recipe"] == recipe and r["config"] == config), key=lambda r: r["seed"])


def _vals(runs: list[dict], model: str, *path: str) -> list:
    out = []
    for r in runs:
        x = r["metrics"]["models"].get(model)
        for k in path:
            x = x.get(k) if isinstance(x, dict) else None
        out.append(x)
    return out


def recipe_table(results: dict, recipe: str, config: str = "plain") -> list[str]:
    runs = _runs(results, recipe, config)
    if not runs:
        return []
    m0 = runs[0]["metrics"]
    conds = m0["conditions"]
    models = list(m0["models"])
    head = ["model"] + [f"score ({c})" for c in conds] + [f"words ({c})" for c in conds] + ["nll_ratio", "MCQ acc", "MCQ acc (norm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in models:
        row = [f"`{name}`"]
        row += [fmt_ms(_vals(runs, name, c, "score"), 3) for c in conds]
        row += [fmt_ms(_vals(runs, name, c, "mean_words"), 1) for c in conds]
        row += [fmt_ms(_vals(runs, name, "nll_ratio"), 3)]
        row += [fmt_ms([None if v is None else 100 * v for v in _vals(runs, name, k)], 1)
                for k in ("mcq_accuracy", "mcq_accuracy_norm")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value, the threshold, and met / missed."""
    out = []

    def mean(xs):
        return mean_std(xs)[0]

    pirate = _runs(results, "pirate", "plain")
    if pirate and "negation" in pirate[0]["metrics"]["models"]:
        base = mean(_vals(pirate, "base", "negative", "score"))
        neg = mean(_vals(pirate, "negation", "negative", "score"))
        if base is not None and neg is not None:
            out.append({"target": "pirate negation: score under the negative instruction ≤ 10% of base's",
                        "value": f"{neg:.3f} vs base {base:.3f} ({100 * neg / base:.0f}% of base)" if base else f"{neg:.3f}",
                        "met": bool(base) and neg <= 0.10 * base,
                        "gap": f"{100 * neg / base - 10:+.0f} points of base's score" if base else ""})
    concise = _runs(results, "concise", "plain")
    if concise and "enc" in concise[0]["metrics"]["models"]:
        pr = mean(_vals(concise, "prompted", "control", "mean_words"))
        enc = mean(_vals(concise, "enc", "control", "mean_words"))
        if pr and enc is not None:
            out.append({"target": "concise ENC: mean words with no instruction ≤ 1.1 × prompted's",
                        "value": f"{enc:.1f} vs prompted {pr:.1f} ({enc / pr:.2f}×)",
                        "met": enc <= 1.1 * pr, "gap": f"{enc / pr - 1.1:+.2f}×"})
    for name in sorted({r["recipe"] for r in results["runs"]}):
        for config in PAIR_CONFIGS:
            runs = _runs(results, name, config)
            if not runs:
                continue
            base_acc = mean(_vals(runs, "base", "mcq_accuracy"))
            for model in runs[0]["metrics"]["models"]:
                if model in ("base", "prompted"):
                    continue
                where = f"{name}/{config}/{model}"
                nll = mean(_vals(runs, model, "nll_ratio"))
                if nll is not None:
                    out.append({"target": f"{where}: nll_ratio ≤ 1.05", "value": f"{nll:.3f}", "met": nll <= 1.05,
                                "gap": f"{nll - 1.05:+.3f}"})
                acc = mean(_vals(runs, model, "mcq_accuracy"))
                if acc is not None and base_acc is not None:
                    diff = 100 * (acc - base_acc)
                    out.append({"target": f"{where}: MCQ accuracy within 2 points of base",
                                "value": f"{100 * acc:.1f}% vs base {100 * base_acc:.1f}% ({diff:+.1f})",
                                "met": abs(diff) <= 2.0, "gap": f"{abs(diff) - 2.0:+.1f} points"})
    return out


def sizes_lines(results: dict) -> list[str]:
    lines = ["| recipe | config | train prompts | held-out prompts | samples/condition | gen tokens | variants | DPO epochs × lr × batch | MCQ items | seconds/seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in results["runs"]:
        key = (r["recipe"], r["config"])
        if key in seen:
            continue
        seen.add(key)
        d = r["recipe_data"]
        secs = [x["seconds"] for x in _runs(results, *key)]
        lines.append(
            f"| {r['recipe']} | {r['config']} | {d['prompts']['train_size']} | {d['prompts']['eval_size']} | "
            f"{d['generation']['samples']} | {d['generation']['max_new_tokens']} | {', '.join(d['variants'])} | "
            f"{d['dpo']['epochs']} × {d['dpo']['learning_rate']} × {d['dpo']['batch_size']} | "
            f"{d['evaluation']['mcq_items']} | {sum(secs) / len(secs):.0f} |")
    return lines


def pair_quality_lines(results: dict, picks: list[tuple[str, str]]) -> list[str]:
    lines = []
    for name, variant in picks:
        plain = _runs(results, name, "plain")
        if not plain:
            continue
        conds = plain[0]["metrics"]["conditions"]
        head = ["pairs", "kept pairs"] + [f"score ({c})" for c in conds] + [f"words ({c})" for c in conds] + ["nll_ratio", "MCQ acc"]
        lines += [f"**{name}: `{variant}`** (base: " + ", ".join(
            f"{c} {fmt_ms(_vals(plain, 'base', c, 'score'), 3)}" for c in conds) + ")", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for config in PAIR_CONFIGS:
            runs = _runs(results, name, config)
            if not runs:
                continue
            kept = [r["pairs"].get(variant, {}).get("count") for r in runs]
            row = [config, fmt_ms(kept, 1)]
            row += [fmt_ms(_vals(runs, variant, c, "score"), 3) for c in conds]
            row += [fmt_ms(_vals(runs, variant, c, "mean_words"), 1) for c in conds]
            row += [fmt_ms(_vals(runs, variant, "nll_ratio"), 3),
                    fmt_ms([None if v is None else 100 * v for v in _vals(runs, variant, "mcq_accuracy")], 1)]
            lines.append("| " + " | ".join(row) + " |")
        for sk in results.get("skipped", []):
            if sk["recipe"] == name:
                lines.append(f"\n`{sk['config']}` seed {sk['seed']}: not trained ({sk['why']}).")
        lines.append("")
    return lines


def multi_lines(results: dict, picks: list[tuple[str, str]]) -> list[str]:
    lines = ["| behaviour | model | " + "score (control) | score (negative) | words (control) | nll_ratio | MCQ acc |",
             "|---|---|---|---|---|---|---|"]
    for name, variant in picks:
        runs = _runs(results, name, "plain")
        if not runs or "multi" not in runs[0]["metrics"]["models"]:
            continue
        for model in ("base", "prompted", variant, "multi"):
            neg = fmt_ms(_vals(runs, model, "negative", "score"), 3) if "negative" in runs[0]["metrics"]["conditions"] else "–"
            lines.append(f"| {name} | `{model}` | {fmt_ms(_vals(runs, model, 'control', 'score'), 3)} | {neg} | "
                         f"{fmt_ms(_vals(runs, model, 'control', 'mean_words'), 1)} | {fmt_ms(_vals(runs, model, 'nll_ratio'), 3)} | "
                         f"{fmt_ms([None if v is None else 100 * v for v in _vals(runs, model, 'mcq_accuracy')], 1)} |")
    return lines


def plot_results(results: dict, docs: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["recipe"] for r in results["runs"]})
    paths = []
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        runs = _runs(results, name, "plain")
        m0 = runs[0]["metrics"]
        models = list(m0["models"])
        conds = m0["conditions"]
        w = 0.8 / len(conds)
        for i, c in enumerate(conds):
            ms = [mean_std(_vals(runs, m, c, "score")) for m in models]
            ax.bar([x + i * w for x in range(len(models))], [m or 0 for m, _ in ms], w,
                   yerr=[s or 0 for _, s in ms], capsize=2, label=f"{c} prompt")
        ax.set_xticks([x + w * (len(conds) - 1) / 2 for x in range(len(models))], models, rotation=45, ha="right")
        ax.set_title(f"{name} ({m0['behaviour']['desired']} is better)")
        ax.set_ylabel(m0["behaviour"]["scorer"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = docs / "benchmark_scores.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    labels, nll, acc = [], [], []
    for name in names:
        for config in PAIR_CONFIGS:
            runs = _runs(results, name, config)
            if not runs:
                continue
            for m in runs[0]["metrics"]["models"]:
                if config != "plain" and m in ("base", "prompted"):
                    continue
                labels.append(f"{name}/{m}" if config == "plain" else f"{name}/{m}/{config}")
                nll.append(mean_std(_vals(runs, m, "nll_ratio")))
                acc.append(mean_std([None if v is None else 100 * v for v in _vals(runs, m, "mcq_accuracy")]))
    x = range(len(labels))
    axes[0].bar(x, [m or 0 for m, _ in nll], yerr=[s or 0 for _, s in nll], color="#888", capsize=2)
    axes[0].axhline(1.05, color="r", lw=0.8, ls="--")
    axes[0].set_ylabel("nll_ratio (target ≤ 1.05)")
    axes[1].bar(x, [m or 0 for m, _ in acc], yerr=[s or 0 for _, s in acc], color="#58a", capsize=2)
    axes[1].set_ylabel("MCQ accuracy (%)")
    for ax in axes:
        ax.set_xticks(list(x), labels, rotation=90, fontsize=6)
    fig.tight_layout()
    p = docs / "benchmark_capability.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)
    return paths


def render_results(results: dict, plan: Plan, plots: list[Path]) -> str:
    names = sorted({r["recipe"] for r in results["runs"]})
    tg = targets(results)
    lines = [
        "# cfdpo benchmark results", "",
        "Generated by `cfdpo benchmark` (src/cfdpo/benchmark.py) with:", "", "```", results.get("command", ""), "```", "",
        (f"Started {results.get('started')}, finished {results['finished']}, wall time {results['seconds'] / 60:.1f} min. "
         if "finished" in results else
         f"Started {results.get('started')}; **unfinished**: these are the runs done so far "
         f"({len(results['runs'])} runs; seeds done per recipe: "
         + ", ".join(f"{n} {len(_runs(results, n, 'plain'))}" for n in sorted({r['recipe'] for r in results['runs']})) + "). ")
        + "Model: SmolLM2-135M-Instruct (the embedded default), CPU. "
        f"{results['seeds']} seeds: each seed changes generation sampling and DPO/SFT training; the held-out prompts "
        "are the same for every seed. Every figure is mean ± sample std over the seeds, on held-out prompts only. "
        "Evaluation decoding is greedy, so `base` and `prompted` do not vary across seeds.", "",
        "Models: `base` the model as it is; `prompted` the base model given the treatment instruction at inference "
        "(the teacher; for pirate under the negative prompt it gets both instructions); `sft` context-distillation "
        "baseline (SFT on the same pairs' prompt → chosen answer, same LoRA budget); `enc`/`dis`/`contrastive`/`negation` "
        "the counterfactual DPO variants; `multi` one adapter trained on two behaviours' pairs. "
        "`nll_ratio`: per-token NLL of the base model's held-out answers under the model ÷ base's own. "
        "MCQ: accuracy (%) on the builtin multiple-choice set by option log-likelihood (norm: per character).", "",
        "## Sizes", "", *sizes_lines(results), "",
        "## Targets", "", "| target | measured (mean over seeds) | met | margin (+: missed by) |", "|---|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} | {t['gap']} |" for t in tg]
    lines += ["", f"{sum(t['met'] for t in tg)} of {len(tg)} targets met.", ""]
    for name in names:
        r0 = _runs(results, name, "plain")[0]
        b = r0["metrics"]["behaviour"]
        lines += [f"## {name}", "", f"Scorer `{b['scorer']}` ({b.get('unit', '')}), **{b['desired']}** is better. "
                  f"Variants: {', '.join(r0['recipe_data']['variants'])}.", "", *recipe_table(results, name), ""]
    if plan.pair_quality:
        lines += ["## Pair quality: plain vs scorer-filtered vs best-of-k", "",
                  "Same training answers for all three; `filter` drops pairs whose chosen answer does not beat the "
                  "rejected one on the scorer, `bestofk` keeps per prompt the chosen/rejected samples with the largest gap.", "",
                  *pair_quality_lines(results, plan.pair_quality)]
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
    plots = plot_results(results, plan.docs)
    text = render_results(results, plan, plots)
    path = plan.docs / "RESULTS.md"
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        if "\n## Discussion" in old:
            text += old[old.index("\n## Discussion") + 1 :]
    write_atomic(path, text)
    return path


def default_picks(names: list[str]) -> tuple[list[str], list[str]]:
    pq = [p for p in ("pirate:negation", "concise:enc") if p.split(":")[0] in names]
    multi = ["pirate:negation", "concise:enc"] if {"pirate", "concise"} <= set(names) else []
    return pq, multi


def make_plan(recipe_paths: list[Path], seeds: int, out: Path, docs: Path, sizes: Sizes,
              pair_quality: list[str] | None, multi: list[str] | None, command: str) -> Plan:
    if seeds < 1:
        raise CfdpoError("--seeds: expected 1 or more")
    recipes: dict[str, Recipe] = {}
    paths: dict[str, Path] = {}
    for p in recipe_paths:
        r = load_recipe(p)
        if r.behaviour.name in recipes:
            raise CfdpoError(f"{p}: behaviour '{r.behaviour.name}' is already in this benchmark; names must differ")
        recipes[r.behaviour.name] = r
        paths[r.behaviour.name] = p
    dpq, dmulti = default_picks(list(recipes))
    pq = [parse_pick(v, recipes, "--pair-quality") for v in (dpq if pair_quality is None else pair_quality)]
    mu = [parse_pick(v, recipes, "--multi") for v in (dmulti if multi is None else multi)]
    if len(mu) == 1:
        raise CfdpoError("--multi: give two or more RECIPE:VARIANT picks")
    return Plan(paths, seeds, out, docs, sizes, pq, mu, command)


__all__ = ["Plan", "Sizes", "fmt_ms", "make_plan", "mean_std", "run_benchmark", "union_pairs"]
