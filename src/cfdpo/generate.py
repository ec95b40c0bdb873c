"""Answer the counterfactual versions of every prompt; cached and resumable.

Rows go to `answers.jsonl` (append-only, see `runio.JsonlLog`), each keyed by a hash of
(model, messages, generation parameters, sample index, seed): a rerun skips rows that are there,
an interrupted run resumes where it stopped and writes the answers an uninterrupted run would
(see `run_generation`). The answers themselves come from a generation backend
(`cfdpo.backends`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cfdpo import counterfactual
from cfdpo.progress import GenerationProgress
from cfdpo.runio import JsonlLog
from cfdpo.spec import Behaviour
from cfdpo.variants import SCOPE_CONDITIONS


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
    """Every row the stage should produce (without answers), in a deterministic order.

    A behaviour with several paraphrases of an instruction gives each prompt the one drawn from
    (`seed`, the prompt's id, the condition): every sample of that prompt and condition uses it.
    """
    asked = [(p, cond, counterfactual.messages(p["prompt"], cond, behaviour, p["id"], seed))
             for p in prompts for cond in conditions]
    return _rows(asked, samples, model, params, seed, extra)


def plan_scope_rows(prompts: Sequence[dict], rejected_instruction: str, behaviour: Behaviour, samples: int, model: str,
                    params: GenParams, seed: int) -> list[dict]:
    """The rows of `pairs.retain_prompts` (`prompts`: their ids already tagged, see `prompts.scope_prompts`):
    each prompt as asked (`scope`) and with `rejected_instruction` at behaviour.placement (`scope_rejected`)."""
    asked = [(p, cond, counterfactual.conversation(p["prompt"], instruction, behaviour.placement, behaviour.system_prompt))
             for p in prompts for cond, instruction in zip(SCOPE_CONDITIONS, (None, rejected_instruction))]
    return _rows(asked, samples, model, params, seed)


def _rows(asked: list[tuple[dict, str, list[dict]]], samples: int, model: str, params: GenParams, seed: int,
          extra: dict | None = None) -> list[dict]:
    """Answer rows (without answers) of (prompt row, condition, messages) triples, `samples` each."""
    return [{"key": row_key(model, msgs, params, s, seed), "prompt_id": p["id"], "prompt": p["prompt"],
             "condition": cond, "sample": s, "messages": msgs, "model": model, "gen": params.as_dict(),
             "seed": seed, **(extra or {})}
            for p, cond, msgs in asked for s in range(samples)]




def run_generation(
    rows: list[dict], log: JsonlLog, load_generator: Callable[[], tuple], batch_size: int = 16, seed: int = 0,
    label: str = "generate", have: frozenset[str] | set[str] = frozenset(),
) -> int:
    """Produce every planned row not yet in `log` (nor in `have`, keys written elsewhere). Returns how
    many rows were generated.

    Deterministic under interruption: the backend plans its batches over ALL of `rows`' conversations
    (same order, same batches, each batch seeded from its place in that plan) and replays, whole, only
    the batches holding a missing row; only the missing rows are written. So a killed and resumed run
    writes the same answers as an uninterrupted one. The plan is over the rows given: under several
    processes each rank plans its own shard (`dist.shard_rows`), so answers are reproducible for the
    same world size only.

    `load_generator()` returns (generator, tokenizer), the generator from a backend's `load` (see
    `cfdpo.backends`); it is called only when there is something to generate."""
    done = log.keys() | have
    missing = sum(r["key"] not in done for r in rows)
    if not missing:
        return 0
    # one unit per conversation: all its planned samples at once
    units: dict[str, list[dict]] = {}
    for r in rows:
        units.setdefault(json.dumps(r["messages"], sort_keys=True), []).append(r)
    unit_rows = list(units.values())
    todo = {i for i, unit in enumerate(unit_rows) if any(r["key"] not in done for r in unit)}
    params = GenParams(**unit_rows[0][0]["gen"])
    generator, tokenizer = load_generator()

    with GenerationProgress(missing, label) as prog:

        def on_batch(indices, answers, counts):
            out = [{**r, "answer": text, "n_tokens": n}
                   for i, texts, toks in zip(indices, answers, counts)
                   for r, text, n in zip(unit_rows[i], texts, toks) if r["key"] not in done]
            log.append(out)
            done.update(r["key"] for r in out)
            prog.advance(len(out), sum(sum(c) for c in counts))

        generator.generate_answers(
            tokenizer, [u[0]["messages"] for u in unit_rows], params, [len(u) for u in unit_rows],
            batch_size, seed, on_batch, todo,
        )
    return missing


def answers_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "answers.jsonl"
