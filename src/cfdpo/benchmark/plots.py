"""The benchmark's three plots: behaviour scores per recipe, capability (KL per answer token, MCQ) per
model, and behaviour against KL per recipe with every model and config on it (the trade-off)."""

from __future__ import annotations

from pathlib import Path

from cfdpo.benchmark.aggregate import CONFIGS, UNTRAINED, mean_std, metric_values, percent, runs_of
from cfdpo.benchmark.targets import Targets

KL = ("capability", "kl_per_token")


def kl_limit(targets: Targets) -> float | None:
    """The threshold of the first `at_most` target on KL per answer token: drawn on the capability and
    trade-off plots."""
    return next((c.threshold for rule in targets.targets for c in rule.checks
                 if c.metric == ".".join(KL) and c.compare == "at_most"), None)


def condition_shown(models: dict) -> str:
    """The condition the trade-off plot scores: the negative instruction when the recipe has one (ignore it),
    else the control prompt (the behaviour unasked)."""
    return "negative" if next(iter(models.values()))["groups"]["instruction_of"] == "negative" else "control"


def points(results: dict, name: str) -> list[tuple[str, tuple, tuple]]:
    """One recipe's (label, KL mean ± std, score mean ± std) per model of the plain runs and per config's
    variant, the score under `condition_shown`."""
    out = []
    for config in CONFIGS:
        runs = runs_of(results, name, config)
        models = runs[0]["metrics"]["models"] if runs else {}
        if "groups" not in next(iter(models.values()), {}):
            continue
        which = condition_shown(models)
        for m in models:
            if config != "plain" and m in UNTRAINED:
                continue
            out.append((m if config == "plain" else f"{m}/{config}", mean_std(metric_values(runs, m, *KL)),
                        mean_std(metric_values(runs, m, "conditions", which, "score"))))
    return out


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
    labels, kl, acc = [], [], []
    for name in names:
        for config in CONFIGS:
            runs = runs_of(results, name, config)
            if not runs:
                continue
            for m in runs[0]["metrics"]["models"]:
                if config != "plain" and m in UNTRAINED:
                    continue
                labels.append(f"{name}/{m}" if config == "plain" else f"{name}/{m}/{config}")
                kl.append(mean_std(metric_values(runs, m, *KL)))
                acc.append(mean_std(percent(metric_values(runs, m, "mcq_accuracy"))))
    x = range(len(labels))
    axes[0].bar(x, [m or 0 for m, _ in kl], yerr=[s or 0 for _, s in kl], color="#888", capsize=2)
    limit = kl_limit(targets)
    axes[0].set_ylabel("KL(base ‖ model) per answer token" + ("" if limit is None else f" (target ≤ {limit:g})"))
    if limit is not None:
        axes[0].axhline(limit, color="r", lw=0.8, ls="--")
    axes[1].bar(x, [m or 0 for m, _ in acc], yerr=[s or 0 for _, s in acc], color="#58a", capsize=2)
    axes[1].set_ylabel("MCQ accuracy (%)")
    for ax in axes:
        ax.set_xticks(list(x), labels, rotation=90, fontsize=6)
    fig.tight_layout()
    p = docs / "benchmark_capability.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, (kx, ksd), (sy, ssd) in points(results, name):
            if kx is None or sy is None:
                continue
            ax.errorbar([kx], [sy], xerr=[ksd or 0], yerr=[ssd or 0], fmt="o", capsize=2)
            ax.annotate(label, (kx, sy), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if limit is not None:
            ax.axvline(limit, color="r", lw=0.8, ls="--")
        metrics = runs_of(results, name, "plain")[0]["metrics"]
        b, shown = metrics["behaviour"], condition_shown(metrics["models"])
        ax.set_xlabel("KL(base ‖ model) per answer token")
        ax.set_ylabel(f"{b['scorer']}, {'under the negative instruction' if shown == 'negative' else 'unasked'} "
                      f"({b['desired']} is better)")
        ax.set_title(name)
    fig.tight_layout()
    p = docs / "benchmark_tradeoff.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)
    return paths
