"""Cost of the pirate recipe's pipeline at several training-prompt counts, to show it grows linearly.

    .venv/bin/python bench/scaling.py --counts 16,32,64

Each count runs recipes/pirate.yaml with prompts.train_size replaced, in a fresh run directory,
through the same Python API as `cfdpo run`; the stages that depend on the prompt count
(generate, pairs, train) are timed, and evaluation (a fixed held-out set) with --eval. Prints a
least-squares line seconds = a + b * prompts with its R^2 and writes bench/results/scaling-<stamp>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / ss if ss else 1.0
    return a, b, r2


def run_once(n: int, variants: list[str] | None, with_eval: bool, root: Path) -> dict:
    from cfdpo import pipeline
    from cfdpo.recipe import dump_recipe

    r = common.pirate_recipe()
    upd = {"prompts": r.prompts.model_copy(update={"train_size": n})}
    if variants:
        upd["variants"] = variants
    r = r.model_copy(update=upd)
    path = root / f"pirate-{n}.yaml"
    path.write_text(dump_recipe(r), encoding="utf-8")
    run = pipeline.open_run(root / f"run-{n}", path)
    times = {}
    stages = [("generate", pipeline.generate), ("pairs", pipeline.build_pairs), ("train", pipeline.train)]
    if with_eval:
        stages.append(("evaluate", pipeline.evaluate))
    for name, fn in stages:
        t = time.perf_counter()
        fn(run)
        times[name] = time.perf_counter() - t
    return {"prompts": n, "seconds": times, "total": sum(times.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="16,32,64", help="training prompt counts, comma-separated")
    ap.add_argument("--variants", default="", help="override the recipe's variants, e.g. 'negation'")
    ap.add_argument("--eval", action="store_true", help="also time evaluation (fixed held-out set)")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    from cfdpo.models import resolve_model

    resolve_model("smollm2-135m")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cfdpo-scaling-") as tmp:
        for n in counts:
            rows.append(run_once(n, [v for v in args.variants.split(",") if v], args.eval, Path(tmp)))
            print(f"[scaling] {n} prompts: {rows[-1]['total']:.0f} s {rows[-1]['seconds']}", flush=True)
    a, b, r2 = fit([r["prompts"] for r in rows], [r["total"] for r in rows])
    stages = list(rows[0]["seconds"])
    md = ["# cfdpo scaling (recipes/pirate.yaml, train_size varied)", "",
          f"`bench/scaling.py {' '.join(sys.argv[1:])}`", "",
          "| train prompts | " + " | ".join(f"{s} s" for s in stages) + " | total s | s / prompt |",
          "|---|" + "---|" * (len(stages) + 2)]
    for r in rows:
        md.append(f"| {r['prompts']} | " + " | ".join(f"{r['seconds'][s]:.0f}" for s in stages)
                  + f" | {r['total']:.0f} | {r['total'] / r['prompts']:.2f} |")
    md += ["", f"least squares: seconds = {a:.0f} + {b:.2f} × prompts, R² = {r2:.3f}", ""]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"scaling-{stamp}.json").write_text(json.dumps({"rows": rows, "fit": [a, b, r2]}, indent=1))
    (common.RESULTS / f"scaling-{stamp}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
