"""dpo.auto on vs off on a new behaviour with the recipe's defaults (recipes/great-question.yaml).

Runs the pipeline twice on the real default model (SmolLM2-135M): once with `dpo.auto: false`
(a fixed epoch count), once with `dpo.auto: true`; the second run reuses the first's
answers. Prints, for the control prompt on the held-out prompts, the score of base / prompted
teacher / auto off / auto on with n and a 95 % interval (`cfdpo.stats.summary`), the fraction of
the way from base to the teacher, and the auto run's validation curve.

    PYTHONPATH=src python bench/auto_check.py [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import yaml  # noqa: E402

from cfdpo import pipeline  # noqa: E402
from cfdpo.runio import JsonlLog  # noqa: E402
from cfdpo.scorers import make_scorer  # noqa: E402
from cfdpo.stats import summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "great-question.yaml"


def run_once(out: Path, auto: bool, answers_from: Path | None) -> Path:
    data = yaml.safe_load(RECIPE.read_text())
    data.setdefault("dpo", {})["auto"] = auto
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe-in.yaml"
    recipe.write_text(yaml.safe_dump(data))
    if answers_from is not None:  # same answers and base / prompted eval answers: only training differs
        for name in ("answers.jsonl", "eval/answers.jsonl"):
            if not (out / name).exists():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(answers_from / name, out / name)
    run = pipeline.open_run(out, recipe)
    start = time.time()
    pipeline.generate(run)
    pipeline.build_pairs(run)
    pipeline.train(run)
    print(f"{out.name}: generate + pairs + train {time.time() - start:.0f} s", flush=True)
    pipeline.evaluate(run)
    run.lock.release()
    return out


def control_scores(run_dir: Path, label: str, scorer) -> dict[str, float]:
    rows = [r for r in JsonlLog(run_dir / "eval" / "answers.jsonl").rows
            if r["model_label"] == label and r["condition"] == "control"]
    return {r["prompt_id"]: scorer.score_one(r["answer"]) for r in rows}


def main(out_root: Path) -> None:
    off = run_once(out_root / "auto-off", False, None)
    on = run_once(out_root / "auto-on", True, off)
    data = yaml.safe_load(RECIPE.read_text())
    scorer = make_scorer(data["behaviour"]["scorer"]["name"], data["behaviour"]["scorer"]["params"])
    results = {
        "base": summary(control_scores(off, "base", scorer)),
        "prompted": summary(control_scores(off, "prompted", scorer)),
        "auto off": summary(control_scores(off, "enc", scorer)),
        "auto on": summary(control_scores(on, "enc", scorer)),
    }
    base, teacher = results["base"]["score"], results["prompted"]["score"]
    print("\ncontrol-prompt score on the held-out prompts (share of answers starting 'Great question'):")
    for name, s in results.items():
        way = (s["score"] - base) / (teacher - base) if teacher != base else float("nan")
        print(f"  {name:9s} {s['score']:.3f}  95% [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]  n={s['n']}  "
              f"fraction base->teacher {way:.2f}")
    for name, d in (("auto off", off), ("auto on", on)):
        log = json.loads((d / "adapters" / "enc" / "train_log.json").read_text())
        steps = max(e["step"] for e in log["log_history"] if "loss" in e)
        print(f"{name}: {steps} optimizer steps, published step {log.get('best_step', steps)}")
        for point in log.get("validation", []):
            print(f"    step {point['step']:3d}  score {point['score']:.3f}  kl {point['kl']:.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / ".cache" / "auto_check")
