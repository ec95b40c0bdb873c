"""Evaluation decoding: model after model against PEFT mixed-adapter batches, in one process.

    nice -n 10 .venv/bin/python bench/eval_batching.py --prompts 12 --new-tokens 24 --sizes 36,72

The embedded default model (fp32, evaluation's dtype on a CPU without native bf16) carries the
trained adapters of a demo run (`--adapters`, read only) or, where there are none, randomly
initialised LoRA adapters. Every model (`base` and each adapter) answers the same conversations,
each of `--prompts` prompts under the pirate recipe's control and negative conditions, greedy, with
the recipe's evaluation `max_new_tokens` (or `--new-tokens`):
  (a) model after model, in batches of the recipe's evaluation batch size (what evaluate does);
  (b) every model's rows in the same batches, each row under its own adapter, at each of `--sizes`.
It reports each path's time, the ratio (b)/(a), and whether every greedy answer of (b) equals (a)'s.
It also times one model's NLL and KL log-prob passes and base's KL sampling on the same setup,
to show where a demo-like evaluation's time goes. Results: bench/results/eval-batching-<stamp>.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def load(adapter_dirs: list[Path], n_random: int):
    """(PEFT model, tokenizer, adapter labels): the default model in fp32 with the adapters on it."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from cfdpo.models import load_model, load_tokenizer, resolve_model
    from cfdpo.runtime import resolve_dtype

    path = resolve_model(common.pirate_recipe().model)
    tok = load_tokenizer(path)
    tok.padding_side = "left"
    model = load_model(path, resolve_dtype("auto", purpose="evaluate"))
    if adapter_dirs:
        names = [d.name for d in adapter_dirs]
        model = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name=names[0])
        for d in adapter_dirs[1:]:
            model.load_adapter(str(d), adapter_name=d.name)
    else:
        names = [f"random{i}" for i in range(n_random)]
        d = common.pirate_recipe().dpo
        config = LoraConfig(r=d.lora_r, lora_alpha=d.lora_alpha, target_modules="all-linear", init_lora_weights=False)
        torch.manual_seed(0)
        model = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
        for p in model.parameters():  # random init: a small perturbation, as a trained adapter is
            if p.requires_grad:
                p.data.mul_(0.05)
    model.eval()
    return model, tok, names


def decode_rows(model, tok, convs, params, batch_size, adapter_names=None) -> tuple[list[str], int]:
    """(answers, new tokens) of `convs` in one `generate_answers` call."""
    from cfdpo.backends.transformers import generate_answers

    answers = [""] * len(convs)
    tokens = 0

    def on_batch(indices, texts, counts):
        nonlocal tokens
        for i, t, c in zip(indices, texts, counts):
            answers[i] = t[0]
            tokens += c[0]

    generate_answers(model, tok, convs, params, [1] * len(convs), batch_size, 0, on_batch,
                     adapter_names=adapter_names)
    return answers, tokens


def per_model(model, labels, tok, convs, params, batch_size) -> tuple[dict, int]:
    """(answers by label, new tokens): each model's rows on their own, the adapter switched between."""
    answers, tokens = {}, 0
    for label in labels:
        if label == "base":
            model.base_model.disable_adapter_layers()
        else:
            model.base_model.enable_adapter_layers()
            model.set_adapter(label)
        answers[label], n = decode_rows(model, tok, convs, params, batch_size)
        tokens += n
    model.base_model.enable_adapter_layers()
    return answers, tokens


def mixed(model, labels, tok, convs, params, batch_size) -> tuple[dict, int]:
    """(answers by label, new tokens): every model's rows in the same batches."""
    model.base_model.enable_adapter_layers()
    all_convs = [c for _ in labels for c in convs]
    names = [("__base__" if label == "base" else label) for label in labels for _ in convs]
    texts, tokens = decode_rows(model, tok, all_convs, params, batch_size, names)
    return {label: texts[j * len(convs):(j + 1) * len(convs)] for j, label in enumerate(labels)}, tokens


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def scoring_times(model, tok, convs, answers, params, batch_size) -> dict:
    """Seconds of one model's NLL pass (answers given convs), one KL log-prob pass and base's KL
    sampling, on these conversations."""
    from cfdpo.capability import sample_answer_ids
    from cfdpo.generate import GenParams
    from cfdpo.likelihood import answer_token_logprobs, mean_nll

    model.base_model.disable_adapter_layers()
    _, t_nll = timed(lambda: mean_nll(model, tok, convs, answers, batch_size=batch_size))
    sample = GenParams(params.max_new_tokens, 0.7, 0.9)
    ids, t_sample = timed(lambda: sample_answer_ids(model, tok, convs, sample, 0, batch_size))
    _, t_lp = timed(lambda: answer_token_logprobs(model, tok, convs, ids, batch_size))
    model.base_model.enable_adapter_layers()
    return {"nll": t_nll, "kl_sample": t_sample, "kl_logprobs": t_lp, "n": len(convs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24, help="prompts; each is asked under control and negative")
    ap.add_argument("--sizes", default="24,48,96", help="mixed-batch sizes to time")
    ap.add_argument("--adapters", default="/work/main/runs/demo/adapters",
                    help="folder of trained adapters (read only); random ones where it has none")
    ap.add_argument("--max-adapters", type=int, default=2, help="use the first N adapters of --adapters")
    ap.add_argument("--random-adapters", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: the recipe's evaluation max_new_tokens")
    args = ap.parse_args()

    import torch

    from cfdpo import counterfactual
    from cfdpo.generate import GenParams

    recipe = common.pirate_recipe()
    b, ev = recipe.behaviour, recipe.evaluation
    root = Path(args.adapters)
    adapter_dirs = sorted(d for d in root.glob("*") if (d / "adapter_config.json").is_file()) if root.is_dir() else []
    adapter_dirs = adapter_dirs[: args.max_adapters]
    model, tok, names = load(adapter_dirs, args.random_adapters)
    labels = ["base", *names]
    prompts = common.bench_prompts(args.prompts)
    convs = [counterfactual.messages(p["prompt"], cond, b, p["id"], 0) for p in prompts for cond in ("control", "negative")]
    params = GenParams(args.new_tokens or ev.max_new_tokens, 0.0, 1.0)

    decode_rows(model, tok, convs[:4], GenParams(4, 0.0, 1.0), 4)  # warm-up
    load0 = os.getloadavg()
    (ref, ref_tokens), t_ref = timed(lambda: per_model(model, labels, tok, convs, params, ev.batch_size))
    runs = []
    for size in [int(s) for s in args.sizes.split(",")]:
        (got, tokens), t = timed(lambda size=size: mixed(model, labels, tok, convs, params, size))
        same = sum(got[label][i] == ref[label][i] for label in labels for i in range(len(convs)))
        runs.append((size, t, tokens, same))
    (_, _), t_ref2 = timed(lambda: per_model(model, labels, tok, convs, params, ev.batch_size))
    scoring = scoring_times(model, tok, convs, ref["base"], params, ev.batch_size)
    load1 = os.getloadavg()

    n_rows = len(labels) * len(convs)
    lines = [
        "# Evaluation decoding: model after model vs mixed-adapter batches",
        "",
        f"Command: `{' '.join(['bench/eval_batching.py', *sys.argv[1:]])}`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32; adapters: {', '.join(names)} "
        f"({'trained, ' + str(root) if adapter_dirs else 'random init'}).",
        f"Rows: {len(labels)} models x {len(convs)} conversations ({args.prompts} prompts x control/negative) = "
        f"{n_rows}, greedy, {params.max_new_tokens} new tokens at most.",
        f"Load average (1/5/15 min) before: {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}; "
        f"after: {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}.",
        "",
        "| path | batch | seconds | new tokens | tok/s | time vs (a) | greedy answers equal to (a) |",
        "|---|---|---|---|---|---|---|",
        f"| (a) model after model | {ev.batch_size} | {t_ref:.1f} | {ref_tokens} | {ref_tokens / t_ref:.1f} | 1.00 | - |",
    ]
    for size, t, tokens, same in runs:
        lines.append(f"| (b) mixed adapters | {size} | {t:.1f} | {tokens} | {tokens / t:.1f} | {t / t_ref:.2f} | "
                     f"{same}/{n_rows} |")
    lines.append(f"| (a) again, after (b) | {ev.batch_size} | {t_ref2:.1f} | {ref_tokens} | {ref_tokens / t_ref2:.1f} | "
                 f"{t_ref2 / t_ref:.2f} | - |")
    per_row = (t_ref + t_ref2) / 2 / n_rows
    lines += [
        "",
        f"Scoring on the same {scoring['n']} conversations, base model, batch {ev.batch_size}: NLL pass "
        f"{scoring['nll']:.1f} s, KL log-prob pass {scoring['kl_logprobs']:.1f} s, KL sampling (base only) "
        f"{scoring['kl_sample']:.1f} s; decoding {per_row * scoring['n']:.1f} s per model (mean of the two (a) runs).",
    ]
    common.write_result("eval-batching", lines)


if __name__ == "__main__":
    main()
