"""cfdpo's LM-head scoring (`cfdpo.train.picked_log_probs`) against the plain version it replaces,
on logits of a DPO step's shape, in one process.

    .venv/bin/python bench/head.py [--rows 680] [--vocab 49152] [--repeats 5]

Both take bf16 logits (as autocast gives them) and return each row's fp32 log-prob of its target.
"policy": forward with TRL's metrics (entropy, mean logit, top-1) and backward; "reference": forward
only, no metrics. Prints milliseconds per call and the ratio plain / cfdpo; writes nothing.
"""

from __future__ import annotations

import argparse
import time


def plain(logits, target, metrics: bool):
    import torch

    lf = logits.float()
    logp = torch.log_softmax(lf, dim=-1)
    picked = logp.gather(-1, target[:, None])[:, 0]
    if metrics:
        with torch.no_grad():
            p = logp.exp()
            _ = (-(p * logp).sum(-1), lf.mean(-1), lf.argmax(-1) == target)
    return picked


def cfdpo_head(logits, target, metrics: bool):
    from cfdpo.train import picked_log_probs

    return picked_log_probs(logits, target, metrics)[0]


def timed(fn, logits, target, policy: bool, repeats: int) -> float:
    import torch

    def once():
        if policy:
            x = logits.detach().requires_grad_()
            fn(x, target, True).sum().backward()
        else:
            with torch.no_grad():
                fn(logits, target, False)

    once()
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=680, help="labelled tokens in a step (bench pairs: ~680)")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default model: 49152)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(a.rows, a.vocab, generator=g) * 3).bfloat16()
    target = torch.randint(0, a.vocab, (a.rows,), generator=g)
    print(f"rows {a.rows}, vocab {a.vocab}, bf16 logits, {torch.get_num_threads()} threads")
    print("| pass | plain ms | cfdpo ms | plain / cfdpo |\n|---|---|---|---|")
    for name, policy in (("policy (fwd + metrics + bwd)", True), ("reference (fwd)", False)):
        p, c = (timed(f, logits, target, policy, a.repeats) for f in (plain, cfdpo_head))
        print(f"| {name} | {p:.0f} | {c:.0f} | {p / c:.2f}x |")


if __name__ == "__main__":
    main()
