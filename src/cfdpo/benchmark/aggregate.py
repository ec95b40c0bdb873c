"""The benchmark's results across seeds: the runs of one recipe and pair config, one metric's
values in them, and their mean and sample standard deviation."""

from __future__ import annotations

import math

UNTRAINED = ("base", "prompted")  # the models every run has besides its adapters: the references
# The configs a recipe can run with (overrides of its sections), in the order RESULTS.md lists them:
# the plain recipe; pair quality (scorer-filtered pairs, best-of-k); methods beyond the paper (pairs
# filtered by the base model's own margin under the contrasting instructions, iterative on-policy rounds).
CONFIGS = {"plain": {}, "filter": {"pairs": {"filter": True}}, "bestofk": {"pairs": {"best_of_k": True}},
           "self": {"pairs": {"score": "self", "filter": True}}, "rounds": {"dpo": {"rounds": 3}}}
PAIR_QUALITY = ("filter", "bestofk")
METHODS = ("self", "rounds")


def runs_of(results: dict, recipe: str, config: str) -> list[dict]:
    """The recorded runs of one recipe and pair config, by seed."""
    return sorted((r for r in results["runs"] if r["recipe"] == recipe and r["config"] == config), key=lambda r: r["seed"])


def metric_values(runs: list[dict], model: str, *path: str) -> list:
    """One metric of one model in each run (None where the run lacks it): path ('negative', 'score')."""
    return [_at(r["metrics"]["models"].get(model), path) for r in runs]


def percent(values: list) -> list:
    """Fractions (accuracies) as percentages; None stays None."""
    return [None if v is None else 100 * v for v in values]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the values that are not None/NaN."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


# Two-sided 95 % quantiles of Student's t for 1-15 degrees of freedom; from 16 on, the Cornish-Fisher
# expansion below (within 0.001 of the exact quantile there).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}


def t975(df: int) -> float:
    if df in T975:
        return T975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95 % t interval of the mean of `values` (seeds); None for fewer than two."""
    m, sd = mean_std(values)
    if m is None or len(values) < 2:
        return None
    half = t975(len(values) - 1) * sd / math.sqrt(len(values))
    return m - half, m + half


def wilson(share: float, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a share observed on n items."""
    z = 1.959964
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _at(x, path: tuple[str, ...]):
    for k in path:
        x = x.get(k) if isinstance(x, dict) else None
    return x


def run_interval(model: dict, path: tuple[str, ...]) -> tuple[float, float] | None:
    """The 95 % interval one run gives a metric of one model (its metrics.json entry): the bootstrap over
    prompts next to a score or a retention (`ci95`) and next to the KL, ± 1.96 standard errors for the MCQ
    accuracy, Wilson's for the share of repeated answers; None where the run has none."""
    if path[-1] in ("score", "ratio"):
        ci = _at(model, (*path[:-1], "ci95"))
    elif path == ("capability", "kl_per_token"):
        ci = _at(model, ("capability", "kl_per_token_ci95"))
    elif path == ("capability", "mcq_accuracy"):
        acc, se = _at(model, path), _at(model, ("capability", "mcq_se"))
        ci = None if acc is None or se is None else (acc - 1.959964 * se, acc + 1.959964 * se)
    elif path == ("drift", "repeated_share"):
        share, n = _at(model, path), _at(model, ("drift", "n"))
        ci = wilson(share, n) if share is not None and n else None
    else:
        ci = None
    return tuple(ci) if ci is not None else None
