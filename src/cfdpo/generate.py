"""Answer the counterfactual versions of every prompt; cached and resumable.

Rows go to `answers.jsonl` (append-only, see `runio.JsonlLog`), each keyed by a hash of
(model, messages, generation parameters, sample index, seed): a rerun skips rows that are there,
an interrupted run resumes where it stopped. The answers themselves come from a generation backend
(`cfdpo.backends`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cfdpo import counterfactual
from cfdpo.runio import JsonlLog
from cfdpo.spec import Behaviour


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int
    temperature: float
    top_p: float

    def as_dict(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}


def row_key(model: str, messages: list[dict], params: GenParams, sample: int, seed: int) -> str:
    blob = json.dumps([model, messages, params.as_dict(), sample, seed], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def plan_rows(
    prompts: Sequence[dict], conditions: Sequence[str], behaviour: Behaviour, samples: int, model: str,
    params: GenParams, seed: int, extra: dict | None = None,
) -> list[dict]:
    """Every row the stage should produce (without answers), in a deterministic order."""
    rows = []
    for p in prompts:
        for cond in conditions:
            msgs = counterfactual.messages(p["prompt"], cond, behaviour)
            for s in range(samples):
                rows.append({
                    "key": row_key(model, msgs, params, s, seed), "prompt_id": p["id"], "prompt": p["prompt"],
                    "variant": cond, "sample": s, "messages": msgs, "model": model, "gen": params.as_dict(),
                    "seed": seed, **(extra or {}),
                })
    return rows


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 weights pay."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def resolve_dtype(dtype: str, purpose: str = "generate") -> str:
    """`auto`: bf16 (fp16 without bf16) on a GPU; on a CPU bf16 for sampling answers where the CPU has
    native bf16 (decoding is bound by reading the weights: bf16 halves that, measured 2-3x faster
    matmuls at decode shapes, bench/results) and float32 for evaluation, whose NLL and
    multiple-choice log-probs compare small differences between models."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if purpose == "generate" and cpu_has_bf16() else "float32"


class Progress:
    """A rich progress bar that shows rows done and new tokens per second."""

    def __init__(self, total: int, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeRemainingColumn

        self.bar = RP(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[tps]:>7.1f} tok/s"), TimeRemainingColumn(), transient=False,
            disable=os.environ.get("RANK", "0") != "0",  # one bar: rank 0's share
        )
        self.total_tokens = 0
        self.start = time.perf_counter()
        self.task = self.bar.add_task(label, total=total, tps=0.0)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def advance(self, rows: int, tokens: int) -> None:
        self.total_tokens += tokens
        tps = self.total_tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, advance=rows, tps=tps)


def run_generation(
    rows: list[dict], log: JsonlLog, load_generator: Callable[[], tuple], batch_size: int = 16, seed: int = 0,
    label: str = "generate",
) -> int:
    """Produce every planned row not yet in `log`. Returns how many rows were generated.

    `load_generator()` returns (generator, tokenizer), the generator from a backend's `load` (see
    `cfdpo.backends`); it is called only when there is something to generate."""
    done = log.keys()
    todo = [r for r in rows if r["key"] not in done]
    if not todo:
        return 0
    # one unit per conversation: all its missing samples at once
    units: dict[str, list[dict]] = {}
    for r in todo:
        units.setdefault(json.dumps(r["messages"], sort_keys=True), []).append(r)
    unit_rows = list(units.values())
    params = GenParams(**unit_rows[0][0]["gen"])
    generator, tokenizer = load_generator()

    with Progress(len(todo), label) as prog:

        def on_batch(indices, answers, counts):
            out = []
            for i, texts, toks in zip(indices, answers, counts):
                for r, text, n in zip(unit_rows[i], texts, toks):
                    out.append({**r, "answer": text, "n_tokens": n})
            log.append(out)
            prog.advance(len(out), sum(sum(c) for c in counts))

        generator.generate_answers(
            tokenizer, [u[0]["messages"] for u in unit_rows], params, [len(u) for u in unit_rows],
            batch_size, seed, on_batch,
        )
    return len(todo)


def answers_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "answers.jsonl"
