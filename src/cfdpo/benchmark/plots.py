"""The benchmark's two plots: behaviour scores per recipe, and capability (nll_ratio, MCQ) per model."""

from __future__ import annotations

from pathlib import Path

from cfdpo.benchmark.aggregate import PAIR_CONFIGS, UNTRAINED, mean_std, metric_values, percent, runs_of
from cfdpo.benchmark.targets import Targets


def nll_limit(targets: Targets) -> float | None:
    """The threshold of the first `at_most` target on nll_ratio: drawn as a line on the capability plot."""
    return next((c.threshold for rule in targets.targets for c in rule.checks
                 if c.metric == "nll_ratio" and c.compare == "at_most"), None)


def plot_results(results: dict, docs: Path, targets: Targets) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["recipe"] for r in results["runs"]})
    paths = []
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        runs = runs_of(results, name, "plain")
        m0 = runs[0]["metrics"]
        models = list(m0["models"])
        conds = m0["conditions"]
        w = 0.8 / len(conds)
        for i, c in enumerate(conds):
            ms = [mean_std(metric_values(runs, m, c, "score")) for m in models]
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
            runs = runs_of(results, name, config)
            if not runs:
                continue
            for m in runs[0]["metrics"]["models"]:
                if config != "plain" and m in UNTRAINED:
                    continue
                labels.append(f"{name}/{m}" if config == "plain" else f"{name}/{m}/{config}")
                nll.append(mean_std(metric_values(runs, m, "nll_ratio")))
                acc.append(mean_std(percent(metric_values(runs, m, "mcq_accuracy"))))
    x = range(len(labels))
    axes[0].bar(x, [m or 0 for m, _ in nll], yerr=[s or 0 for _, s in nll], color="#888", capsize=2)
    limit = nll_limit(targets)
    if limit is None:
        axes[0].set_ylabel("nll_ratio")
    else:
        axes[0].axhline(limit, color="r", lw=0.8, ls="--")
        axes[0].set_ylabel(f"nll_ratio (target ≤ {limit:g})")
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
