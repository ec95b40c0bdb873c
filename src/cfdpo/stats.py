"""Statistics of the scorecard: means over prompts with 95 % intervals, paired model-vs-base tests.

The unit of resampling is the prompt: a prompt's samples are averaged first (`per_prompt_means`),
then intervals come from a percentile bootstrap over prompts. Every function is deterministic for
a given seed and uses numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from statistics import NormalDist

import numpy as np

EXACT_PERMUTATION_MAX_N = 16  # up to 2**16 sign patterns are enumerated; above, a Monte Carlo test
N_PERMUTATIONS = 20_000


def per_prompt_means(rows: Iterable[Mapping], key: str, id_key: str = "prompt_id") -> dict[str, float]:
    """{prompt id: mean of `row[key]` over that prompt's rows}, in first-seen order.

    Rows whose value is None or NaN are skipped; a prompt with no value left is left out.
    """
    sums: dict[str, list[float]] = {}
    for row in rows:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        sums.setdefault(row[id_key], []).append(float(value))
    return {pid: sum(values) / len(values) for pid, values in sums.items()}


def _values(values: Sequence[float] | Mapping[str, float]) -> np.ndarray:
    if isinstance(values, Mapping):
        values = list(values.values())
    return np.asarray(values, dtype=float)


def _bootstrap_indices(n: int, seed: int, n_boot: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(resampled: np.ndarray) -> list[float]:
    lo, hi = np.percentile(resampled, [2.5, 97.5])
    return [float(lo), float(hi)]


def summary(per_prompt: Sequence[float] | Mapping[str, float], seed: int = 0, n_boot: int = 2000) -> dict:
    """{"score": mean over prompts, "ci95": [lo, hi] (percentile bootstrap over prompts), "n": prompts}.

    With no prompts, score and ci95 are None.
    """
    x = _values(per_prompt)
    if x.size == 0:
        return {"score": None, "ci95": None, "n": 0}
    means = x[_bootstrap_indices(x.size, seed, n_boot)].mean(axis=1)
    return {"score": float(x.mean()), "ci95": _interval(means), "n": int(x.size)}


def _pair(model_vals: Sequence[float] | Mapping[str, float],
          base_vals: Sequence[float] | Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Two aligned arrays: mappings are matched by prompt id (the ids both have, in model order),
    sequences by position (they must have the same length)."""
    if isinstance(model_vals, Mapping) != isinstance(base_vals, Mapping):
        raise TypeError("give both values as {prompt id: value} mappings or both as sequences")
    if isinstance(model_vals, Mapping):
        shared = [pid for pid in model_vals if pid in base_vals]
        return (np.asarray([model_vals[p] for p in shared], dtype=float),
                np.asarray([base_vals[p] for p in shared], dtype=float))
    if len(model_vals) != len(base_vals):
        raise ValueError(f"paired values need one value per prompt on both sides; got {len(model_vals)} and {len(base_vals)}")
    return np.asarray(model_vals, dtype=float), np.asarray(base_vals, dtype=float)


def sign_flip_p(diffs: np.ndarray, seed: int = 0, n_perm: int = N_PERMUTATIONS) -> float:
    """Two-sided p-value of a mean difference of 0 (sign-flip permutation test of the paired differences).

    Exact (every sign pattern) for up to EXACT_PERMUTATION_MAX_N prompts, otherwise Monte Carlo
    with `n_perm` random patterns, counting the observed one.
    """
    n = diffs.size
    if n == 0:
        return 1.0
    observed = abs(diffs.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(diffs).max()))
    if n <= EXACT_PERMUTATION_MAX_N:
        patterns = np.arange(2**n)[:, None] >> np.arange(n) & 1
        flipped = np.abs(((1 - 2 * patterns) * diffs).mean(axis=1))
        return float(np.mean(flipped >= observed - tolerance))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, n))
    flipped = np.abs((signs * diffs).mean(axis=1))
    return float((np.sum(flipped >= observed - tolerance) + 1) / (n_perm + 1))


def paired(model_vals: Sequence[float] | Mapping[str, float], base_vals: Sequence[float] | Mapping[str, float],
           seed: int = 0, n_boot: int = 2000) -> dict:
    """Model minus base over the same prompts.

    {"diff": mean difference, "ci95": bootstrap interval of it, "p": two-sided sign-flip p-value,
    "n": prompts, "distinguishable": the interval excludes 0}. With no shared prompt, diff and
    ci95 are None and distinguishable is False.
    """
    model, base = _pair(model_vals, base_vals)
    diffs = model - base
    if diffs.size == 0:
        return {"diff": None, "ci95": None, "p": None, "n": 0, "distinguishable": False}
    lo, hi = _interval(diffs[_bootstrap_indices(diffs.size, seed, n_boot)].mean(axis=1))
    return {"diff": float(diffs.mean()), "ci95": [lo, hi], "p": sign_flip_p(diffs, seed),
            "n": int(diffs.size), "distinguishable": not lo <= 0.0 <= hi}


def ratio_ci(model_vals: Sequence[float] | Mapping[str, float], base_vals: Sequence[float] | Mapping[str, float],
             seed: int = 0, n_boot: int = 2000) -> dict:
    """Retention: model mean / base mean over the same prompts, with a paired bootstrap interval.

    {"ratio", "ci95", "n", "reason"}: ratio and ci95 are None, and `reason` says why, when there
    is no shared prompt or the base mean is 0. Resamples whose base mean is 0 are left out of the
    interval; "undefined_resamples" counts them.
    """
    model, base = _pair(model_vals, base_vals)
    if model.size == 0:
        return {"ratio": None, "ci95": None, "n": 0, "reason": "no prompt scored for both models"}
    if base.mean() == 0:
        return {"ratio": None, "ci95": None, "n": int(model.size), "reason": "base mean is 0: retention is undefined"}
    idx = _bootstrap_indices(model.size, seed, n_boot)
    base_means = base[idx].mean(axis=1)
    defined = base_means != 0
    ratios = model[idx].mean(axis=1)[defined] / base_means[defined]
    return {"ratio": float(model.mean() / base.mean()), "ci95": _interval(ratios), "n": int(model.size),
            "reason": None, "undefined_resamples": int((~defined).sum())}


def binomial_se(acc: float, n: int) -> float:
    """Standard error of an accuracy measured on n items."""
    if n < 1:
        raise ValueError(f"an accuracy needs at least one item, got n={n}")
    return math.sqrt(acc * (1.0 - acc) / n)


def detectable_difference(n: int, p: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest accuracy change (as a fraction) that n items detect with this power at level alpha.

    Two-proportion normal approximation with both accuracies near p:
    (z_{1-alpha/2} + z_power) * sqrt(2 p (1-p) / n).
    """
    if n < 1:
        raise ValueError(f"a detectable difference needs at least one item, got n={n}")
    normal = NormalDist()
    z = normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)
    return z * math.sqrt(2 * p * (1 - p) / n)

