"""Training levers on a finished run: the same answers and pairs, trained again with some settings changed.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/levers.py RUN_DIR NAME SECTION.FIELD=VALUE ... [--out ROOT]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/levers.py --table RUN_DIR [RUN_DIR ...] [--out ROOT]

The first form copies RUN_DIR's recipe with the settings changed (VALUE read as YAML, e.g.
`dpo.loss_type=[sigmoid,sft]`) to ROOT/<behaviour>/<NAME>/<seed dir>.yaml, seeds a new run directory
ROOT/<behaviour>/<NAME>/<seed dir> with RUN_DIR's answers (so generation only adds what the new settings
need, e.g. a second sample) and its base / prompted evaluation answers, and runs `cfdpo run` on it.
RUN_DIR is a `cfdpo benchmark` run (runs/behaviours/<behaviour>/seed<s>), so each lever row differs from
the benchmark's plain row only in the settings given. ROOT defaults to runs/levers.

`--table` prints, per RUN_DIR, a markdown table: the plain run, then every lever run of the same seed
found under ROOT/<behaviour>/*/, with the trained variant's headline score (unasked for enc, under the
negative instruction otherwise) and its 95 % interval, the share of the way from base to the prompted
teacher (unasked) or the score as a share of base's (under the negative instruction), the held-out paraphrases pooled and the in-scope contexts' scores (base's beside
each) and KL per answer token.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

UNTRAINED = ("base", "prompted", "sft", "steering")


def lever_run(src: Path, name: str, settings: list[str], root: Path) -> int:
    from cfdpo.benchmark.runner import _copy_eval_cache

    data = yaml.safe_load((src / "recipe.yaml").read_text())
    for item in settings:
        key, _, raw = item.partition("=")
        section, _, field = key.partition(".")
        if not raw or not field or not isinstance(data.get(section), dict):
            sys.exit(f"levers: '{item}' is not SECTION.FIELD=VALUE with a recipe section")
        data[section][field] = yaml.safe_load(raw)
    dst = root / data["behaviour"]["name"] / name / src.name
    recipe = dst.parent / f"{src.name}.yaml"
    dst.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    if not (dst / "answers.jsonl").exists():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "answers.jsonl", dst / "answers.jsonl")
        _copy_eval_cache(src, dst)
    cfdpo = Path(sys.executable).with_name("cfdpo")
    return subprocess.call([str(cfdpo), "run", str(recipe), "--out", str(dst)])


def _pooled(conditions: dict, kind: str) -> float | None:
    scores = [c["score"] for c in conditions.values() if c["kind"] == kind]
    return sum(scores) / len(scores) if scores else None


def lever_row(name: str, metrics: dict) -> list[str]:
    models = metrics["models"]
    variant = next(k for k in models if k not in UNTRAINED)
    cond, base = models[variant]["conditions"], models["base"]["conditions"]
    head = "control" if variant == "enc" or "negative" not in cond else "negative"
    score = cond[head]
    teacher = models.get("prompted", {}).get("conditions", {}).get(head)  # the base model given the treatment too
    b = base[head]["score"]
    if head == "control" and teacher and teacher["score"] != b:
        way = f"{100 * (score['score'] - b) / (teacher['score'] - b):.0f} % of the way"
    else:
        way = f"{100 * score['score'] / b:.0f} % of base's" if b else ""
    para, para_base = _pooled(cond, "paraphrase"), _pooled(base, "paraphrase")
    in_scope = [(c["score"], base[k]["score"]) for k, c in cond.items() if c["kind"] == "in_scope"]
    cap = models[variant]["capability"]
    return [name, f"{score['score']:.3f} [{score['ci95'][0]:.3f}, {score['ci95'][1]:.3f}] (n={score['n']})", way,
            "" if para is None else f"{para:.3f} ({para_base:.3f})",
            ", ".join(f"{m:.3f} ({b:.3f})" for m, b in in_scope),
            f"{cap['kl_per_token']:.3f} [{cap['kl_per_token_ci95'][0]:.3f}, {cap['kl_per_token_ci95'][1]:.3f}]"]


def table(src: Path, root: Path) -> list[str]:
    metrics = json.loads((src / "metrics.json").read_text())
    behaviour = metrics["behaviour"]["name"]
    rows = [lever_row("plain", metrics)]
    for run in sorted((root / behaviour).glob(f"*/{src.name}/metrics.json")):
        rows.append(lever_row(run.parent.parent.name, json.loads(run.read_text())))
    head = ["lever", "score", "to the teacher / of base", "held-out paraphrases (base)", "in scope (base)", "KL / answer token"]
    lines = [f"{behaviour}, {src.name}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", action="store_true", help="print the lever tables of the RUN_DIRs")
    ap.add_argument("--out", type=Path, default=Path("runs/levers"))
    ap.add_argument("args", nargs="+")
    a = ap.parse_args()
    if a.table:
        for d in a.args:
            print("\n".join(table(Path(d), a.out)) + "\n")
        return
    if len(a.args) < 3:
        ap.error("expected RUN_DIR NAME SECTION.FIELD=VALUE ...")
    sys.exit(lever_run(Path(a.args[0]), a.args[1], a.args[2:], a.out))


if __name__ == "__main__":
    main()
