"""Agreement of the judge scorer with the pirate recipe's lexicon scorer on pirate and plain answers.

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python bench/judge_agreement.py [--prompts 20] [--judge MODEL]

The embedded default model (smollm2-135m) answers `--prompts` bench prompts twice, as asked and
with the recipe's "Talk like a pirate." (the pirate recipe's conversations, sampling settings and
seed, in one batch). Each answer is scored by the recipe's lexicon scorer and by the judge scorer
(transformers backend; judge `--judge`, default the same SmolLM2-135M; rubric below; labels
yes / no). Prints and writes bench/results/judge-agreement-<stamp>.json/.md: n; Spearman and
Pearson correlation of the two scores with 95 % bootstrap intervals; the agreement of judge
p(yes) > 0.5 with "the lexicon finds a pirate word" (95 % Wilson interval) and its Cohen's kappa;
for each scorer the AUC of telling the pirate-instructed answers from the plain ones, and in how
many prompts it scores the pirate answer above the plain one.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RUBRIC = "Is the following text written in pirate speak, the way a pirate talks?"
BOOTSTRAP = 2000


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def spearman(xs: list[float], ys: list[float]) -> float:
    return pearson(ranks(xs), ranks(ys))


def bootstrap_interval(xs: list[float], ys: list[float], statistic, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of `statistic` over resampled (x, y) pairs (degenerate resamples skipped)."""
    rng = random.Random(seed)
    n = len(xs)
    values = []
    for _ in range(BOOTSTRAP):
        picks = [rng.randrange(n) for _ in range(n)]
        value = statistic([xs[i] for i in picks], [ys[i] for i in picks])
        if not math.isnan(value):
            values.append(value)
    values.sort()
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def kappa(a: list[bool], b: list[bool]) -> float:
    """Cohen's kappa: agreement beyond what the two rates of saying yes give by chance."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    return (observed - chance) / (1 - chance) if chance < 1 else float("nan")


def auc(scores: list[float], positive: list[bool]) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def make_answers(n_prompts: int) -> list[dict]:
    import torch

    from cfdpo.chat import BASE, GenParams, RunModel
    from cfdpo.counterfactual import messages
    from cfdpo.models import load_model, load_tokenizer, resolve_model

    recipe = common.pirate_recipe()
    path = resolve_model(recipe.model)
    run_model = RunModel(recipe, load_model(path), load_tokenizer(path), [])
    g = recipe.generation
    params = GenParams(g.max_new_tokens, g.temperature, g.top_p)
    rows = [{"prompt": p["prompt"], "condition": condition}
            for p in common.bench_prompts(n_prompts) for condition in ("control", "negative")]
    conversations = [messages(r["prompt"], r["condition"], recipe.behaviour) for r in rows]
    with torch.inference_mode():
        replies = run_model.answers(conversations, BASE, params, seed=g.seed, batch_size=len(conversations))
    for r, reply in zip(rows, replies):
        r["answer"] = reply.text
    return rows


def measure(n_prompts: int, judge_model: str | None) -> dict:
    from cfdpo.scorers import make_scorer

    recipe = common.pirate_recipe()
    started = time.perf_counter()
    rows = make_answers(n_prompts)
    generated = time.perf_counter()
    lexicon = make_scorer(recipe.behaviour.scorer.name, recipe.behaviour.scorer.params)
    judge_model = judge_model or recipe.model
    with tempfile.TemporaryDirectory() as tmp:
        judge = make_scorer("judge", {"backend": "transformers", "model": judge_model, "rubric": RUBRIC,
                                      "labels": ["yes", "no"], "positive": "yes", "cache_path": f"{tmp}/judge.jsonl"})
        judged = judge.score_many([r["answer"] for r in rows])
    finished = time.perf_counter()
    lexical = lexicon.score_many([r["answer"] for r in rows])
    for r, j, lx in zip(rows, judged, lexical):
        r.update(judge=j, lexicon=lx)
    pirate = [r["condition"] == "negative" for r in rows]
    # rows alternate control, negative for each prompt
    paired = {name: sum(scores[i + 1] > scores[i] for i in range(0, len(scores), 2))
              for name, scores in (("judge", judged), ("lexicon", lexical))}
    judge_yes, lexicon_yes = [j > 0.5 for j in judged], [lx > 0 for lx in lexical]
    agree = sum(j == lx for j, lx in zip(judge_yes, lexicon_yes))
    return {
        "n": len(rows), "prompts": n_prompts, "model": recipe.model, "judge": judge_model, "rubric": RUBRIC,
        "spearman": spearman(judged, lexical), "spearman_95": bootstrap_interval(judged, lexical, spearman),
        "pearson": pearson(judged, lexical), "pearson_95": bootstrap_interval(judged, lexical, pearson),
        "agreement": agree / len(rows), "agreement_95": wilson(agree, len(rows)),
        "kappa": kappa(judge_yes, lexicon_yes), "kappa_95": bootstrap_interval(judge_yes, lexicon_yes, kappa),
        "judge_says_yes": sum(judge_yes), "lexicon_hits": sum(lexicon_yes),
        "auc_judge": auc(judged, pirate), "auc_lexicon": auc(lexical, pirate),
        "pirate_higher_judge": paired["judge"], "pirate_higher_lexicon": paired["lexicon"],
        "seconds_generate": round(generated - started, 1), "seconds_judge": round(finished - generated, 1),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    def ci(pair):
        return f"[{pair[0]:.2f}, {pair[1]:.2f}]"

    return "\n".join([
        f"# Judge vs lexicon on pirate answers ({result['model']}, n = {result['n']})", "",
        f"Judge: {result['judge']} (transformers backend), rubric \"{result['rubric']}\", labels yes / no.", "",
        "| measure | value | 95 % interval |", "|---|---|---|",
        f"| Spearman (judge p(yes), lexicon rate) | {result['spearman']:.2f} | {ci(result['spearman_95'])} |",
        f"| Pearson | {result['pearson']:.2f} | {ci(result['pearson_95'])} |",
        f"| agreement: p(yes) > 0.5 vs a lexicon word | {result['agreement']:.2f} | {ci(result['agreement_95'])} |",
        f"| Cohen's kappa of that agreement | {result['kappa']:.2f} | {ci(result['kappa_95'])} |",
        f"| AUC pirate-instructed vs plain: judge | {result['auc_judge']:.2f} | |",
        f"| AUC pirate-instructed vs plain: lexicon | {result['auc_lexicon']:.2f} | |",
        f"| prompts whose pirate answer the judge scores higher | {result['pirate_higher_judge']} / {result['prompts']} | "
        f"{ci(wilson(result['pirate_higher_judge'], result['prompts']))} |",
        f"| prompts whose pirate answer the lexicon scores higher | {result['pirate_higher_lexicon']} / {result['prompts']} | "
        f"{ci(wilson(result['pirate_higher_lexicon'], result['prompts']))} |", "",
        f"Judge says yes on {result['judge_says_yes']} answers, the lexicon finds a pirate word in {result['lexicon_hits']}. "
        f"Generation {result['seconds_generate']} s, judging {result['seconds_judge']} s (CPU).", "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20, help="bench prompts; each is answered plainly and as a pirate")
    parser.add_argument("--judge", help="judge model: a cfdpo model name, directory or hub id (default: the answering model)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    result = measure(args.prompts, args.judge)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"judge-agreement-{stamp}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    text = markdown(result)
    (common.RESULTS / f"judge-agreement-{stamp}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
