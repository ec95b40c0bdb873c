"""cfdpo's two CPU training kernels against the plain versions they replace, one process, same inputs.

    .venv/bin/python bench/kernels.py [--repeats 10]

- LM-head scoring (`cfdpo.cpu_kernels.lm_head.picked_log_probs`) vs `log_softmax(logits.float()).gather(...)`, on bf16
  logits of a DPO step's shape (680 labelled tokens, the default model's 49152-token vocabulary);
  "policy": forward with TRL's metrics (entropy, mean logit, top-1) and backward; "reference": forward.
- Attention of a DPO batch of 4 pairs (prompt / chosen / rejected lengths drawn around the bench
  pairs' means 49 / 91 / 85; 9 query and 3 key-value heads of 64 as in the default model; bf16):
  cfdpo's padding-free packed row (`cfdpo.cpu_kernels.packed_pairs.pair_attention`) vs one `prompt | chosen | rejected`
  row per pair, right-padded, through sdpa with the 4D mask (cfdpo's previous layout).
Prints milliseconds per call and the ratio plain / cfdpo (the fastest of --repeats calls each) and
writes the table to bench/results/kernels-<stamp>.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):  # the fastest call: this machine is shared
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def head_rows(repeats: int) -> list[tuple[str, float, float]]:
    import torch

    from cfdpo.cpu_kernels.lm_head import picked_log_probs

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(680, 49152, generator=g) * 3).bfloat16()
    target = torch.randint(0, 49152, (680,), generator=g)

    def plain(x, metrics):
        lf = x.float()
        logp = torch.log_softmax(lf, dim=-1)
        if metrics:
            with torch.no_grad():
                p = logp.exp()
                _ = (-(p * logp).sum(-1), lf.mean(-1), lf.argmax(-1) == target)
        return logp.gather(-1, target[:, None])[:, 0]

    def cfdpo(x, metrics):
        return picked_log_probs(x, target, metrics)[0]

    def policy(f):
        return lambda: f(logits.detach().requires_grad_(), True).sum().backward()

    def reference(f):
        def run():
            with torch.no_grad():
                f(logits, False)
        return run

    return [(f"LM head, {name}", timed(mode(plain), repeats), timed(mode(cfdpo), repeats))
            for name, mode in (("policy (fwd + metrics + bwd)", policy), ("reference (fwd)", reference))]


def attention_rows(repeats: int) -> list[tuple[str, float, float]]:
    import torch

    from cfdpo.cpu_kernels import packed_pairs

    g = torch.Generator().manual_seed(1)
    lens = [(int(torch.randint(30, 70, (), generator=g)), int(torch.randint(60, 120, (), generator=g)),
             int(torch.randint(55, 115, (), generator=g))) for _ in range(4)]
    prompt_len = torch.tensor([p for p, _, _ in lens])
    comp_len = torch.tensor([c for _, c, _ in lens] + [r for _, _, r in lens])
    ids = torch.zeros(8, max(p + max(c, r) for p, c, r in lens), dtype=torch.long)
    seen = {}

    class Body:  # records the packed row that shared_prompt_hidden builds
        config = SimpleNamespace(_attn_implementation="sdpa")

        def __call__(self, **kw):
            seen.update(kw)
            return SimpleNamespace(last_hidden_state=torch.zeros(1, kw["input_ids"].shape[1], 1))

    packed_pairs.shared_prompt_hidden(Body(), ids, prompt_len, comp_len)
    parts, total = seen["cfdpo_pairs"], seen["input_ids"].shape[1]
    width = max(p + c + r for p, c, r in lens)
    padded = torch.zeros(4, 1, width, width, dtype=torch.bool)  # the previous layout's mask
    for i, (p, c, r) in enumerate(lens):
        cols = torch.arange(width)
        seg = (cols >= p).long() + (cols >= p + c) + (cols >= p + c + r)
        padded[i, 0] = (cols[:, None] >= cols[None, :]) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
    module = SimpleNamespace(training=True)

    def tensors(b, n):
        return [torch.randn(b, h, n, 64, generator=g).bfloat16().requires_grad_() for h in (9, 3, 3)]

    row, rows = tensors(1, total), tensors(4, width)

    def cfdpo():
        return packed_pairs.pair_attention(module, *row, None, scaling=0.125, cfdpo_pairs=parts)[0]

    def plain():
        return torch.nn.functional.scaled_dot_product_attention(*rows, attn_mask=padded, scale=0.125, enable_gqa=True)

    def fwd_bwd(f):
        return lambda: f().float().sum().backward()

    def fwd(f):
        def run():
            with torch.no_grad():
                f()
        return run

    tag = f"attention, 4 pairs ({total} tokens packed, {4 * width} padded)"
    return [(f"{tag}, fwd + bwd", timed(fwd_bwd(plain), repeats), timed(fwd_bwd(cfdpo), repeats)),
            (f"{tag}, fwd", timed(fwd(plain), repeats), timed(fwd(cfdpo), repeats))]


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    lines = [f"# cfdpo kernels {stamp}", "",
             f"`bench/kernels.py --repeats {a.repeats}`: {torch.get_num_threads()} threads; fastest of {a.repeats} calls", "",
             "| kernel | plain ms | cfdpo ms | plain / cfdpo |", "|---|---|---|---|"]
    for name, p, c in head_rows(a.repeats) + attention_rows(a.repeats):
        lines.append(f"| {name} | {p:.1f} | {c:.1f} | {p / c:.2f}x |")
    print("\n".join(lines))
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    out = common.RESULTS / f"kernels-{stamp}.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
