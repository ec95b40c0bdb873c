"""Self-reward scoring of answers (`pairs.score: self`): judge-free, from the base model's own log-probs.

An answer's *self-score* is how much more likely the base model (no adapter) finds it under the
desired instruction than under the undesired one, each log-prob the mean over the answer's tokens:

    self_score(a) = log p(a | x_t) - log p(a | x_n)

with x_t / x_n the prompt's treatment / negative conversations (the instruction drawn as for the
answers); a behaviour without a treatment uses the control conversation x_c for x_t, one without a
negative uses x_c for x_n. A pair's *margin* is self_score(chosen) - self_score(rejected): positive
when the chosen answer is the more desired one.

`contrast_conditions`, `contrast_conversations`, `mean_logprob`, `self_score` and `margin` are pure;
`score_answers` is the I/O shell: it computes the log-probs a cache file lacks in one batched pass
(`likelihood.answer_token_logprobs`) and appends them there, keyed by (model, conversation, answer).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

from cfdpo import counterfactual
from cfdpo.errors import CfdpoError
from cfdpo.runio import JsonlLog
from cfdpo.spec import Behaviour


def contrast_conditions(behaviour: Behaviour) -> tuple[str, str]:
    """(desired, undesired) conditions of the self-score: treatment or control, negative or control."""
    desired = "treatment" if behaviour.treatment is not None else "control"
    undesired = "negative" if behaviour.negative is not None else "control"
    if desired == undesired:
        raise CfdpoError("pairs.score 'self' needs behaviour.treatment or behaviour.negative "
                         "(it compares an answer's likelihood with and without an instruction)")
    return desired, undesired


def contrast_conversations(row: dict, behaviour: Behaviour) -> tuple[list[dict], list[dict]]:
    """The desired and undesired conversations of an answer row's prompt (the instructions drawn as for its answers)."""
    return tuple(counterfactual.messages(row["prompt"], condition, behaviour, row["prompt_id"], row.get("seed", 0))
                 for condition in contrast_conditions(behaviour))


def mean_logprob(token_logprobs: Sequence[float]) -> float:
    """The length-normalised log-prob of an answer: the mean over its tokens (0.0 for an empty answer: no evidence)."""
    return sum(token_logprobs) / len(token_logprobs) if token_logprobs else 0.0


def self_score(logprob_desired: float, logprob_undesired: float) -> float:
    """log p(a | x_t) - log p(a | x_n): above 0 when the answer reads as asked for by the desired instruction."""
    return logprob_desired - logprob_undesired


def margin(chosen_score: float, rejected_score: float) -> float:
    """A pair's self margin from its answers' self-scores: above 0 when the chosen answer is the more desired one."""
    return chosen_score - rejected_score


def cache_key(model: str, messages: list[dict], answer: str) -> str:
    blob = json.dumps([model, messages, answer], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's tokens as they follow the chat template's generation prompt (no end-of-turn token)."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])


def score_answers(rows: list[dict], behaviour: Behaviour, model: str, cache: JsonlLog,
                  load: Callable[[], tuple], batch_size: int = 16) -> dict[str, float]:
    """{answer row key: self-score} for answer rows (`key`, `prompt_id`, `prompt`, `seed`, `answer`).

    Mean log-probs already in `cache` (rows `key`, `model`, `prompt_id`, `condition`, `answer_key`,
    `mean_logprob`, `n_tokens`) are reused; the missing ones are computed in one batched pass with
    the model from `load()` -> (model, tokenizer), called only then, and appended to `cache`."""
    conditions = contrast_conditions(behaviour)
    wanted: dict[str, dict] = {}  # cache key -> the cache row to compute
    keys_of: dict[str, tuple[str, str]] = {}  # answer row key -> its (desired, undesired) cache keys
    for row in rows:
        pair = []
        for condition, messages in zip(conditions, contrast_conversations(row, behaviour)):
            key = cache_key(model, messages, row["answer"])
            pair.append(key)
            wanted.setdefault(key, {"key": key, "model": model, "prompt_id": row["prompt_id"], "condition": condition,
                                    "answer_key": row["key"], "messages": messages, "answer": row["answer"]})
        keys_of[row["key"]] = tuple(pair)
    have = cache.keys()
    missing = [item for key, item in wanted.items() if key not in have]
    if missing:
        from cfdpo.likelihood import answer_token_logprobs

        scorer, tokenizer = load()
        ids = [answer_ids(tokenizer, item["answer"]) for item in missing]
        logprobs = answer_token_logprobs(scorer, tokenizer, [item["messages"] for item in missing], ids, batch_size)
        cache.append([{**{k: v for k, v in item.items() if k not in ("messages", "answer")},
                       "mean_logprob": mean_logprob(lp), "n_tokens": len(lp)} for item, lp in zip(missing, logprobs)])
    found = {row["key"]: row["mean_logprob"] for row in cache.rows}
    return {answer_key: self_score(found[desired], found[undesired])
            for answer_key, (desired, undesired) in keys_of.items()}
