"""Shared pieces of the benchmarks: the bench pairs / prompts, a matmul peak, peak memory."""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the same OpenMP wait policy for every path (the cfdpo CLI sets it too: cfdpo.runtime.configure_openmp)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CFDPO_BENCH_CACHE", ROOT / "bench" / ".cache"))
RESULTS = ROOT / "bench" / "results"
PAIR_TOKENS = 96  # answer length of the bench pairs: prompt + answer is about 150-200 tokens


def pirate_recipe():
    from cfdpo.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / "pirate.yaml")


def bench_prompts(n: int, offset: int = 0) -> list[dict]:
    """`n` builtin 'general' prompts, disjoint from the pirate recipe's eval split."""
    from cfdpo.prompts import load_prompts, split

    r = pirate_recipe()
    prompts = load_prompts("general")
    train, _ = split(prompts, len(prompts) - r.prompts.eval_size, r.prompts.eval_size, r.prompts.seed)
    if offset + n > len(train):
        raise SystemExit(f"only {len(train)} bench prompts; asked for {offset + n}")
    return train[offset : offset + n]


def bench_pairs(n: int, model_path: str):
    """`n` Instruction-Negation pairs (prompt x_n, chosen y_c, rejected y_n) of the pirate behaviour,
    generated once by cfdpo with the model and cached in bench/.cache/answers.jsonl."""
    from datasets import Dataset

    from cfdpo.backends.transformers import TransformersGenerator
    from cfdpo.generate import GenParams, plan_rows, run_generation
    from cfdpo.models import load_model, load_tokenizer, model_id
    from cfdpo.pairs import build_pairs
    from cfdpo.runio import JsonlLog
    from cfdpo.runtime import resolve_dtype
    from cfdpo.spec import GenerationSpec

    r = pirate_recipe()
    prompts = bench_prompts(n)
    rows = plan_rows(prompts, ["control", "negative"], r.behaviour, 1, model_id(model_path),
                     GenParams(PAIR_TOKENS, 0.7, 0.9), 0)
    CACHE.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(CACHE / "answers.jsonl")

    def loader():
        tok = load_tokenizer(model_path)
        tok.padding_side = "left"
        return TransformersGenerator(load_model(model_path, resolve_dtype("auto"))), tok

    run_generation(rows, log, loader, batch_size=GenerationSpec().batch_size, seed=0, label="bench pairs")
    keys = {row["key"] for row in rows}
    done = [row for row in JsonlLog(CACHE / "answers.jsonl").rows if row["key"] in keys]
    pairs = build_pairs(done, "negation")
    return Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """Best GFLOP/s of an n x n torch matmul in this dtype, over about `seconds`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def n_params(model) -> int:
    """Parameters that do matmul work per token (embeddings tied to the head count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def write_result(prefix: str, lines: list[str]) -> Path:
    """Print a bench result (markdown lines) and write it to bench/results/<prefix>-<time>.md."""
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out}")
    return out
