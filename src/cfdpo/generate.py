"""Answer the counterfactual versions of every prompt; cached and resumable.

Rows go to `answers.jsonl` (append-only, see `runio.JsonlLog`), each keyed by a hash of
(model, messages, generation parameters, sample index, seed): a rerun skips rows that are there,
an interrupted run resumes where it stopped.
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
from cfdpo.spec import Behaviour, GenerationSpec


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


def resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    # CPU: float32. bf16 weights measured only 1.1x faster here (bench/results, 2 shared cores) and
    # evaluation (greedy answers, NLL, multiple-choice log-probs) loads its models with this dtype too;
    # set generation.dtype: bfloat16 to trade that precision for the speed.
    return "float32"


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


def generate_answers(
    model, tokenizer, conversations: Sequence[list[dict]], params: GenParams, num_samples: Sequence[int],
    batch_size: int, seed: int, on_batch: Callable[[list[int], list[list[str]], list[list[int]]], None],
) -> None:
    """Generate `num_samples[i]` answers for each conversation, batched by prompt length.

    Calls `on_batch(indices, answers, token_counts)` after each batch so the caller can persist
    results as they come. The k samples of one conversation come from `num_return_sequences`.
    `model` may also be a `vllm_backend.VllmGenerator`, which does the same with vLLM.
    """
    if hasattr(model, "generate_answers"):
        return model.generate_answers(tokenizer, conversations, params, num_samples, batch_size, seed, on_batch)
    import torch

    device = next(model.parameters()).device
    encoded = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
        for c in conversations
    ]
    encoded = [e["input_ids"] if isinstance(e, dict) else e for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    stop_ids = torch.tensor(sorted({pad_id, *(eos if isinstance(eos, list) else [eos])}))
    # group by equal sample counts so num_return_sequences is uniform inside a batch
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(num_samples[i], []).append(i)
    for k, idxs in sorted(groups.items()):
        per_batch = max(1, batch_size // k)
        for b in range(0, len(idxs), per_batch):
            batch = idxs[b : b + per_batch]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):  # left padding
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]) :] = 1
            sample = params.temperature > 0
            kwargs = dict(
                max_new_tokens=params.max_new_tokens, do_sample=sample, num_return_sequences=k,
                pad_token_id=pad_id, eos_token_id=eos,
            )
            if sample:
                kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            torch.manual_seed(seed * 1_000_003 + b)
            with torch.inference_mode():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = out[:, width:].cpu()
            answers, counts = [], []
            for r in range(len(batch)):
                texts, toks = [], []
                for j in range(k):
                    seq = new[r * k + j]
                    stop = torch.isin(seq, stop_ids)
                    n = int(stop.nonzero()[0]) + 1 if stop.any() else len(seq)
                    toks.append(n)
                    texts.append(tokenizer.decode(seq[:n], skip_special_tokens=True).strip())
                answers.append(texts)
                counts.append(toks)
            on_batch(batch, answers, counts)


def run_generation(
    rows: list[dict], log: JsonlLog, model_loader: Callable[[], tuple], gen: GenerationSpec | None = None,
    batch_size: int = 16, seed: int = 0, label: str = "generate",
) -> int:
    """Produce every planned row not yet in `log`. Returns how many rows were generated."""
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
    model, tokenizer = model_loader()

    with Progress(len(todo), label) as prog:

        def on_batch(indices, answers, counts):
            out = []
            for i, texts, toks in zip(indices, answers, counts):
                for r, text, n in zip(unit_rows[i], texts, toks):
                    out.append({**r, "answer": text, "n_tokens": n})
            log.append(out)
            prog.advance(len(out), sum(sum(c) for c in counts))

        generate_answers(
            model, tokenizer, [u[0]["messages"] for u in unit_rows], params, [len(u) for u in unit_rows],
            batch_size, seed, on_batch,
        )
    return len(todo)


def answers_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "answers.jsonl"
