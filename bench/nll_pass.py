"""Evaluation's NLL pass (`likelihood.mean_nll`) now against its version at an earlier commit, in one process.

    nice -n 10 .venv/bin/python bench/nll_pass.py --then 0001ebb --prompts 12

The embedded default model in fp32 scores its own sampled answers (the pirate recipe's evaluation
`max_new_tokens`, temperature 0.7, top_p 0.9) to `--prompts` bench prompts under the control and
negative conditions, at the recipe's evaluation batch size; the two versions run alternately,
`--repeats` times each. Reports each one's seconds, the ratio, and both NLL values.
Results: bench/results/nll-pass-<stamp>.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def mean_nll_at(rev: str):
    """`mean_nll` as `src/cfdpo/likelihood.py` had it at commit `rev`."""
    source = subprocess.check_output(["git", "show", f"{rev}:src/cfdpo/likelihood.py"], cwd=common.ROOT, text=True)
    module = types.ModuleType(f"likelihood_{rev}")
    exec(compile(source, f"likelihood.py@{rev}", "exec"), module.__dict__)  # noqa: S102
    return module.mean_nll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--then", default="0001ebb", help="the commit whose mean_nll is the baseline")
    ap.add_argument("--prompts", type=int, default=12, help="prompts; each is asked under control and negative")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch

    from cfdpo import counterfactual
    from cfdpo.capability import sample_answer_ids
    from cfdpo.generate import GenParams
    from cfdpo.likelihood import mean_nll
    from cfdpo.models import load_model, load_tokenizer, resolve_model
    from cfdpo.runtime import resolve_dtype

    recipe = common.pirate_recipe()
    b, ev = recipe.behaviour, recipe.evaluation
    path = resolve_model(recipe.model)
    tok = load_tokenizer(path)
    tok.padding_side = "left"
    model = load_model(path, resolve_dtype("auto", purpose="evaluate")).eval()
    prompts = common.bench_prompts(args.prompts)
    convs = [counterfactual.messages(p["prompt"], cond, b, p["id"], 0) for p in prompts for cond in ("control", "negative")]
    ids = sample_answer_ids(model, tok, convs, GenParams(ev.max_new_tokens, 0.7, 0.9), 0, ev.batch_size)
    answers = [tok.decode(x, skip_special_tokens=True).strip() for x in ids]

    versions = {f"then ({args.then})": mean_nll_at(args.then), "now": mean_nll}
    seconds: dict[str, list[float]] = {name: [] for name in versions}
    values: dict[str, float] = {}
    load0 = os.getloadavg()
    for _ in range(args.repeats):
        for name, fn in versions.items():
            start = time.perf_counter()
            values[name] = fn(model, tok, convs, answers, batch_size=ev.batch_size)
            seconds[name].append(time.perf_counter() - start)
    load1 = os.getloadavg()
    then, now = (min(seconds[name]) for name in versions)
    lines = [
        "# Evaluation NLL pass: mean_nll now vs then",
        "",
        f"Command: `{' '.join(['bench/nll_pass.py', *sys.argv[1:]])}`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32, batch {ev.batch_size}; {len(convs)} conversations "
        f"({args.prompts} prompts x control/negative), the model's own sampled answers "
        f"({ev.max_new_tokens} new tokens at most).",
        f"Load average (1/5/15 min) before: {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}; "
        f"after: {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}.",
        "",
        "| version | seconds (each run) | mean NLL |",
        "|---|---|---|",
        *(f"| {name} | {' / '.join(f'{s:.1f}' for s in seconds[name])} | {values[name]:.6f} |" for name in versions),
        "",
        f"Ratio then / now (best runs): {then / now:.2f}x.",
    ]
    common.write_result("nll-pass", lines)


if __name__ == "__main__":
    main()
