"""Agreement of `pairs.score: self` (the base model's self-score) with a run's rule scorer.

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python bench/self_reward_agreement.py RUN_DIR [--cache DIR]

Reads RUN_DIR/recipe.yaml and RUN_DIR/answers.jsonl (a run made by e.g. `cfdpo run
recipes/pirate.yaml`) and writes nothing there. For every training prompt's control, treatment and
negative answers: the self-score (mean per-token log p(a | x_t) - log p(a | x_n) under the run's base
model, `cfdpo.self_reward`; log-probs cached in `--cache`, default a fresh temporary folder) and the
rule score (the recipe's `behaviour.scorer`, signed so that larger = more desired). Prints and writes
bench/results/self-reward-agreement-<stamp>.json/.md:
- per condition: mean self-score and mean rule score over prompts, 95 % bootstrap intervals (`cfdpo.stats`);
- Spearman correlation of the two over all answers, 95 % interval from a bootstrap over prompts;
- per comparison of two conditions (same prompt, same sample): the share of pairs where the self margin
  and the rule scorer agree on which answer is better, among pairs the rule scorer does not tie,
  95 % interval from a bootstrap over prompts; the tied pairs are counted apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from judge_agreement import spearman  # noqa: E402

BOOTSTRAP = 2000
COMPARISONS = (("treatment", "control"), ("control", "negative"), ("treatment", "negative"))


def prompt_bootstrap(groups: list[list], statistic, seed: int = 0) -> list[float] | None:
    """95 % percentile interval of `statistic(items)` over resamples of the prompts (each group: one
    prompt's items); resamples where the statistic is undefined (NaN) are skipped."""
    rng = np.random.default_rng(seed)
    values = []
    for picks in rng.integers(0, len(groups), size=(BOOTSTRAP, len(groups))):
        value = statistic([item for i in picks for item in groups[i]])
        if value == value:
            values.append(value)
    return [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else None


def correlation(items: list[tuple[float, float]]) -> float:
    return spearman([a for a, _ in items], [b for _, b in items]) if len(items) > 2 else float("nan")


def agreement(items: list[bool]) -> float:
    return sum(items) / len(items) if items else float("nan")


def measure(run_dir: Path, cache_dir: Path) -> dict:
    from cfdpo.generate import answers_path
    from cfdpo.models import load_model, load_tokenizer, model_id
    from cfdpo.pipeline import Run
    from cfdpo.recipe import load_recipe
    from cfdpo.runio import JsonlLog
    from cfdpo.runtime import resolve_dtype, set_threads
    from cfdpo.scorers import make_scorer
    from cfdpo.self_reward import score_answers
    from cfdpo.stats import per_prompt_means, summary

    recipe = load_recipe(run_dir / "recipe.yaml")
    run = Run(run_dir, recipe)
    train, _ = run.split()
    wanted = {p["id"] for p in train}
    rows = [row for row in JsonlLog(answers_path(run_dir)).rows if row["prompt_id"] in wanted]
    path = run.model_path

    def load():
        set_threads()
        return load_model(path, resolve_dtype(recipe.generation.dtype, purpose="evaluate")), load_tokenizer(path)

    started = time.perf_counter()
    self_scores = score_answers(rows, recipe.behaviour, model_id(path), JsonlLog(cache_dir / "self_scores.jsonl"), load,
                                recipe.evaluation.batch_size)
    seconds = time.perf_counter() - started
    spec = recipe.behaviour.scorer
    scorer = make_scorer(spec.name, spec.params)
    sign = -1.0 if spec.desired == "lower" else 1.0
    for row in rows:
        row["self"], row["rule"] = self_scores[row["key"]], sign * scorer.score_one(row["answer"])

    by_condition = {}
    for condition in ("control", "treatment", "negative"):
        chosen = [row for row in rows if row["condition"] == condition]
        if chosen:
            by_condition[condition] = {"self": summary(per_prompt_means(chosen, "self")),
                                       "rule": summary(per_prompt_means(chosen, "rule"))}
    per_prompt: dict[str, list] = {}
    for row in rows:
        per_prompt.setdefault(row["prompt_id"], []).append((row["self"], row["rule"]))
    groups = list(per_prompt.values())
    items = [item for group in groups for item in group]

    answers = {(row["prompt_id"], row["condition"], row["sample"]): row for row in rows}
    comparisons = {}
    pooled: dict[str, list[bool]] = {}
    for better, worse in COMPARISONS:
        agree: dict[str, list[bool]] = {}
        ties = 0
        for (pid, condition, sample), first in answers.items():
            second = answers.get((pid, worse, sample))
            if condition != better or second is None or first["answer"].strip() == second["answer"].strip():
                continue
            rule_gap = first["rule"] - second["rule"]
            if rule_gap == 0:
                ties += 1
                continue
            same = (first["self"] - second["self"] > 0) == (rule_gap > 0)
            agree.setdefault(pid, []).append(same)
            pooled.setdefault(pid, []).append(same)
        flat = [a for group in agree.values() for a in group]
        comparisons[f"{better} vs {worse}"] = {"n": len(flat), "ties": ties, "agreement": agreement(flat) if flat else None,
                                               "ci95": prompt_bootstrap(list(agree.values()), agreement) if flat else None}
    flat = [a for group in pooled.values() for a in group]
    comparisons["all"] = {"n": len(flat), "ties": sum(c["ties"] for c in comparisons.values()),
                          "agreement": agreement(flat) if flat else None,
                          "ci95": prompt_bootstrap(list(pooled.values()), agreement) if flat else None}
    return {
        "run_dir": str(run_dir), "model": model_id(path), "behaviour": recipe.behaviour.name,
        "scorer": {"name": spec.name, "desired": spec.desired}, "prompts": len(per_prompt), "answers": len(rows),
        "self_score_seconds": round(seconds, 1),
        "by_condition": by_condition,
        "spearman": {"n_answers": len(items), "n_prompts": len(groups), "rho": correlation(items),
                     "ci95": prompt_bootstrap(groups, correlation)},
        "comparisons": comparisons,
    }


def markdown(result: dict, command: str) -> str:
    def ci(interval):
        return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "-"

    def num(value):
        return "-" if value is None else f"{value:.3f}"

    lines = [
        f"# Self-reward vs rule scorer: {result['behaviour']} ({result['scorer']['name']}, desired "
        f"{result['scorer']['desired']})", "",
        f"Command: `{command}`", "",
        f"Run: `{result['run_dir']}`; model `{result['model']}`; {result['prompts']} training prompts, "
        f"{result['answers']} answers; self-scores computed in {result['self_score_seconds']} s.",
        "Self-score = mean per-token log p(a | x_t) - log p(a | x_n) under the base model; rule score signed so "
        "that larger = more desired. Intervals: 95 % bootstrap over prompts.", "",
        "| condition | n prompts | mean self-score [95 % CI] | mean rule score [95 % CI] |",
        "|---|---|---|---|",
    ]
    for condition, entry in result["by_condition"].items():
        lines.append(f"| {condition} | {entry['self']['n']} | {num(entry['self']['score'])} {ci(entry['self']['ci95'])} | "
                     f"{num(entry['rule']['score'])} {ci(entry['rule']['ci95'])} |")
    s = result["spearman"]
    lines += ["", f"Spearman (self-score, rule score) over {s['n_answers']} answers of {s['n_prompts']} prompts: "
                  f"{num(s['rho'])} {ci(s['ci95'])}", "",
              "| pairs (same prompt, same sample) | n (rule not tied) | rule ties | self margin agrees with rule "
              "[95 % CI] |",
              "|---|---|---|---|"]
    for name, entry in result["comparisons"].items():
        lines.append(f"| {name} | {entry['n']} | {entry['ties']} | {num(entry['agreement'])} {ci(entry['ci95'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--cache", type=Path, default=None, help="folder for self_scores.jsonl (default: a temporary one)")
    args = parser.parse_args()
    if not (args.run_dir / "answers.jsonl").is_file():
        raise SystemExit(f"{args.run_dir}: no answers.jsonl; run `cfdpo generate` there first")
    command = "python " + " ".join(sys.argv)
    with tempfile.TemporaryDirectory(prefix="self-reward-") as scratch:
        result = measure(args.run_dir, args.cache or Path(scratch))
    text = markdown(result, command)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"self-reward-agreement-{stamp}.md").write_text(text, encoding="utf-8")
    (common.RESULTS / f"self-reward-agreement-{stamp}.json").write_text(json.dumps({**result, "command": command}, indent=1),
                                                                         encoding="utf-8")


if __name__ == "__main__":
    main()
