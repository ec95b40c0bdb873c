"""Evaluation decoding with and without the shared prompt prefix read once per group, in one process.

    nice -n 10 .venv/bin/python bench/prefix_sharing.py --repeats 2

The embedded default model (fp32, evaluation's dtype on a CPU without native bf16) answers, greedy,
the base model's scorecard conversations of the pirate recipe (`recipes/pirate.yaml`: every
condition, the recipe's evaluation batch size and `max_new_tokens`), in the batches `generate_answers`
plans: (a) every row read whole (`min_shared` too large to group anything), (b) `decode`'s default
(`prefill` reads a prefix rows share once per group). The two paths alternate `--repeats` times so a
busy machine slows both alike. It reports each run's seconds, the ratio a/b per pair, the prompt
tokens each path reads, and whether the answers are equal. Results: bench/results/prefix-sharing-<stamp>.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def conversations(recipe) -> list[list[dict]]:
    """The base model's scorecard conversations of the recipe (greedy rows), in evaluation's order."""
    from cfdpo import scorecard
    from cfdpo.evaluate import AnswerPlan, EvalModels, plan_answers
    from cfdpo.generate import GenParams
    from cfdpo.models import resolve_model
    from cfdpo.prompts import load_prompts, split

    p, ev, gen = recipe.prompts, recipe.evaluation, recipe.generation
    _, held_out = split(load_prompts(p.source, p.column), p.train_size, p.eval_size, p.seed)
    conditions = scorecard.plan_conditions(recipe)
    prompts_by = {c.name: scorecard.condition_prompts(c, held_out, ev.subset_size) for c in conditions}
    params = GenParams(ev.max_new_tokens, 0.0, 1.0)
    plan = AnswerPlan(params, 0, 0, params, gen.seed, gen.seed)
    models = EvalModels(resolve_model(recipe.model), recipe, {})
    rows = plan_answers(models, conditions, prompts_by, plan)
    return [r["messages"] for (label, _), planned in rows.items() if label == "base" for r in planned]


def run(model, tok, seqs, params, batch_size, min_shared) -> tuple[list, float, int]:
    """(answers, seconds, prompt tokens read) of the rows in length-sorted batches, as generate_answers plans."""
    import torch

    from cfdpo.backends.transformers import decode, prefix_groups

    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    stop = torch.tensor(sorted({tok.pad_token_id, tok.eos_token_id}))
    answers, read = [None] * len(seqs), 0
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        batch = [seqs[i] for i in order[b : b + batch_size]]
        groups = prefix_groups(batch, min_shared=min_shared)
        cut = {i: n for rows, n in groups for i in rows}
        read += sum(n for _, n in groups) + len(batch) * max(len(s) - cut[i] for i, s in enumerate(batch))
        with torch.inference_mode():
            new = decode(model, batch, tok.pad_token_id, 1, params, stop, 0, min_shared=min_shared)
        for i, row in zip(order[b : b + batch_size], new.tolist()):
            answers[i] = row
    return answers, time.perf_counter() - start, read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="pairs of alternating runs")
    ap.add_argument("--rows", type=int, default=0, help="only the first N conversations (0: all)")
    args = ap.parse_args()

    from cfdpo.backends.transformers import SHARED_PREFIX_MIN
    from cfdpo.generate import GenParams
    from cfdpo.models import load_model, load_tokenizer, resolve_model
    from cfdpo.runtime import resolve_dtype

    recipe = common.pirate_recipe()
    convs = conversations(recipe)[: args.rows or None]
    path = resolve_model(recipe.model)
    tok = load_tokenizer(path)
    model = load_model(path, resolve_dtype("auto", purpose="evaluate")).eval()
    seqs = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in convs]
    params = GenParams(recipe.evaluation.max_new_tokens, 0.0, 1.0)
    bs = recipe.evaluation.batch_size
    lines = ["# Prefix sharing in evaluation decoding", "",
             f"`bench/prefix_sharing.py --repeats {args.repeats}`: {len(seqs)} greedy rows (the pirate recipe's base "
             f"scorecard conversations), batch {bs}, {params.max_new_tokens} new tokens at most, fp32, "
             f"load average before {os.getloadavg()[0]:.1f}.", "",
             "| pair | whole rows (s) | shared prefix (s) | ratio | prompt tokens whole / shared | answers equal |",
             "|---|---|---|---|---|---|"]
    for r in range(args.repeats):
        whole, t_whole, read_whole = run(model, tok, seqs, params, bs, 10**9)
        shared, t_shared, read_shared = run(model, tok, seqs, params, bs, SHARED_PREFIX_MIN)
        same = sum(a == b for a, b in zip(whole, shared))
        lines.append(f"| {r + 1} | {t_whole:.1f} | {t_shared:.1f} | {t_whole / t_shared:.2f}x | "
                     f"{read_whole} / {read_shared} | {same}/{len(seqs)} |")
    common.write_result("prefix-sharing", lines)


if __name__ == "__main__":
    main()
