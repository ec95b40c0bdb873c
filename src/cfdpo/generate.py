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
                    "condition": cond, "sample": s, "messages": msgs, "model": model, "gen": params.as_dict(),
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


CANDIDATES = 256  # top-p is resolved among the most likely tokens when they hold top_p of the mass


def nucleus(probs, top_p: float):
    """The tokens nucleus (top-p) sampling may draw, as (probabilities, token ids) per row, most likely
    first, with the dropped ones at probability 0.

    The same set as transformers' TopPLogitsWarper (keep a token while the mass of the more likely
    tokens is below top_p) without sorting the whole vocabulary: when the `CANDIDATES` most likely
    tokens already hold top_p of the mass no other token can be kept; otherwise a full sort."""
    top, idx = probs.topk(min(CANDIDATES, probs.shape[-1]), dim=-1)
    if bool((top.sum(-1) < top_p).any()):
        top, idx = probs.sort(dim=-1, descending=True)
    return top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0), idx


def sample_next(logits, params: GenParams, generator):
    """One token per row: greedy at temperature 0, else temperature + nucleus sampling."""
    import torch

    if params.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        top, idx = nucleus(probs, params.top_p)
        return idx.gather(-1, torch.multinomial(top, 1, generator=generator))[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def pad_batch(seqs, pad: int, left: bool = True):
    """Token lists as (ids, attention mask) tensors of the longest one's width, padded on the left
    (prompts to continue) or on the right."""
    import torch

    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, x in enumerate(seqs):
        cols = slice(width - len(x), width) if left else slice(0, len(x))
        ids[r, cols] = torch.tensor(x, dtype=torch.long)
        mask[r, cols] = 1
    return ids, mask


def cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: `cache` in newer transformers, else `past_key_values`."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def decode(model, ids, mask, k: int, params: GenParams, stop_ids, seed: int):
    """Sample `k` continuations of each left-padded row of `ids`; returns [rows*k, max_new_tokens]
    token ids (the k samples of a row next to each other), padded with the first stop id after a stop.

    A plain KV-cache loop instead of `model.generate`: one prefill per prompt (the cache is repeated
    for the k samples), logits only for the last position, nucleus sampling without a full sort, and
    rows that have stopped leave the batch (their cache rows are dropped) instead of decoding padding."""
    import torch
    from transformers import DynamicCache

    device = ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = DynamicCache(config=model.config)
    kv = cache_kwarg(model)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **{kv: cache})
    logits = out.logits[:, -1]
    last = pos[:, -1]
    if k > 1:
        cache.batch_repeat_interleave(k)
        logits, mask, last = (t.repeat_interleave(k, dim=0) for t in (logits, mask, last))
    n = ids.shape[0] * k
    result = torch.full((n, params.max_new_tokens), int(stop_ids[0]), dtype=torch.long, device=device)
    alive = torch.arange(n, device=device)  # result row of each row still decoding
    for step in range(params.max_new_tokens):
        nxt = sample_next(logits, params, generator)
        result[alive, step] = nxt
        if step == params.max_new_tokens - 1:
            break
        keep = (~torch.isin(nxt, stop_ids)).nonzero()[:, 0]
        if len(keep) == 0:
            break
        if len(keep) < len(alive):
            cache.batch_select_indices(keep)
            alive, nxt, mask, last = alive[keep], nxt[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                    **{kv: cache})
        logits = out.logits[:, -1]
    return result


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
    results as they come. The k samples of one conversation share one prefill (see `decode`).
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
    # group by equal sample counts so k is uniform inside a batch
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(num_samples[i], []).append(i)
    for k, idxs in sorted(groups.items()):
        per_batch = max(1, batch_size // k)
        for b in range(0, len(idxs), per_batch):
            batch = idxs[b : b + per_batch]
            ids, mask = pad_batch([encoded[i] for i in batch], pad_id)
            with torch.inference_mode():
                new = decode(model, ids.to(device), mask.to(device), k, params, stop_ids.to(device),
                             seed * 1_000_003 + b).cpu()
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
