"""Judge scorer: a language model answers a rubric question about each answer; the score is the
probability it gives the positive label.

    scorer: {name: judge, desired: higher, params: {backend: transformers, model: smollm2-135m,
             rubric: "Does this text talk like a pirate?", labels: [yes, no], positive: "yes"}}

The judge sees the rubric, the answer and "Reply with one word: yes or no." A label's
probability is the judge's probability that the first token of its reply is that word (any
token whose text, stripped and lower-cased, is the label). The score is the positive label's
share of the labels' total: `transformers` reads it from the next-token distribution of a local
model (batched); `openai` from the `top_logprobs` of any OpenAI-compatible server (`base_url`,
e.g. `cfdpo serve`; key from $OPENAI_API_KEY), several requests at a time. Where no label is among
the log-probs the server returns (or it returns none), the score is 1.0 if the reply's first label
word is the positive one, else 0.0.

Verdicts (the label probabilities and the reply's label) are cached in a JSONL file keyed by
sha256 of (backend, model, base_url, rubric, labels, answer): `cache_path`, else
$CFDPO_JUDGE_CACHE, else `$CFDPO_CACHE/judge.jsonl` (default ~/.cache/cfdpo). Constructing the
scorer loads nothing and sends nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path

from cfdpo.errors import CfdpoError
from cfdpo.scorers.base import Scorer, words

BACKENDS = ("openai", "transformers")
TOP_LOGPROBS = 20  # the most OpenAI's API returns


def judge_messages(rubric: str, labels: list[str], answer: str) -> list[dict]:
    question = (f"{rubric}\n\nThe text to judge:\n<<<\n{answer}\n>>>\n\n"
                f"Reply with one word: {' or '.join(labels)}.")
    return [{"role": "user", "content": question}]


def label_of(token: str, labels: list[str]) -> str | None:
    """The label a token spells (stripped, case-insensitive), if any."""
    norm = token.strip().lower()
    return next((label for label in labels if label.lower() == norm), None)


def first_label(reply: str, labels: list[str]) -> str | None:
    """The first word of a reply that is a label."""
    return next((found for w in words(reply) if (found := label_of(w, labels))), None)


def score_of(probs: dict[str, float] | None, label: str | None, positive: str) -> float:
    total = sum(probs.values()) if probs else 0.0
    if total > 0:
        return probs.get(positive, 0.0) / total
    return 1.0 if label == positive else 0.0


class TransformersJudge:
    """A local model: the label probabilities from one forward pass per batch of answers."""

    def __init__(self, model: str, rubric: str, labels: list[str], batch_size: int):
        self.name, self.rubric, self.labels, self.batch_size = model, rubric, labels, batch_size
        self.loaded: tuple | None = None

    def load(self) -> tuple:
        if self.loaded is None:
            from cfdpo import dist
            from cfdpo.models import check_available, load_model, load_tokenizer, resolve_model

            path = resolve_model(self.name)
            check_available(path)
            tokenizer = load_tokenizer(path)
            tokenizer.padding_side = "left"
            vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            ids = {label: [i for i, piece in enumerate(vocab) if label_of(piece, [label])] for label in self.labels}
            missing = [label for label, found in ids.items() if not found]
            if missing:
                raise CfdpoError(f"scorer 'judge': label '{missing[0]}' is not one token of {self.name}'s vocabulary; "
                                 "use one-word labels such as yes / no")
            self.loaded = (load_model(path).to(dist.device()), tokenizer, ids)
        return self.loaded

    def judge(self, answers: list[str]) -> list[dict]:
        import torch

        model, tokenizer, ids = self.load()
        out = []
        for start in range(0, len(answers), self.batch_size):
            batch = answers[start : start + self.batch_size]
            texts = [tokenizer.apply_chat_template(judge_messages(self.rubric, self.labels, a), add_generation_prompt=True,
                                                   tokenize=False) for a in batch]
            enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(model.device)
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = model(**enc, position_ids=positions, logits_to_keep=1).logits[:, -1].float()
            probs = torch.softmax(logits, dim=-1).cpu()
            for row in probs:
                label_probs = {label: float(row[ids[label]].sum()) for label in self.labels}
                out.append({"probs": label_probs, "label": max(label_probs, key=label_probs.get)})
        return out


class OpenAIJudge:
    """Any OpenAI-compatible chat completions server, `concurrency` requests at a time."""

    def __init__(self, model: str, base_url: str | None, rubric: str, labels: list[str], concurrency: int, timeout: float):
        self.name, self.base_url, self.rubric, self.labels = model, base_url, rubric, labels
        self.concurrency, self.timeout = concurrency, timeout

    def judge(self, answers: list[str]) -> list[dict]:
        from concurrent.futures import ThreadPoolExecutor

        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                               timeout=self.timeout, max_retries=1)
        url = str(client.base_url)

        def ask(answer: str) -> dict:
            response = client.chat.completions.create(
                model=self.name, messages=judge_messages(self.rubric, self.labels, answer), max_tokens=8, temperature=0,
                logprobs=True, top_logprobs=TOP_LOGPROBS)
            choice = response.choices[0]
            tokens = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
            return {"probs": label_probs(tokens[0], self.labels) if tokens else None,
                    "label": first_label(choice.message.content or "", self.labels)}

        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            return list(pool.map(ask, answers))
        except openai.APIConnectionError:
            raise CfdpoError(f"scorer 'judge': cannot reach {url}; is the server running (e.g. `cfdpo serve RUN`)?") from None
        except openai.APIStatusError as e:
            raise CfdpoError(f"scorer 'judge': {url} answered {e.status_code}: {' '.join(str(e.message).split())[:300]}") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def label_probs(first_token, labels: list[str]) -> dict[str, float] | None:
    """The labels' probabilities among the first reply token's `top_logprobs` (and the token itself);
    None when no label is there."""
    seen = {first_token.token: first_token.logprob}
    for alt in first_token.top_logprobs or []:
        seen.setdefault(alt.token, alt.logprob)
    probs: dict[str, float] = {}
    for token, logprob in seen.items():
        label = label_of(token, labels)
        if label is not None:
            probs[label] = probs.get(label, 0.0) + math.exp(logprob)
    return probs or None


def default_cache_path() -> Path:
    from cfdpo.models import cache_dir

    return Path(os.environ.get("CFDPO_JUDGE_CACHE") or cache_dir() / "judge.jsonl")


class JudgeScorer(Scorer):
    name = "judge"
    unit = "judge's probability of the positive label"

    def __init__(self, backend: str, model: str, rubric: str, labels: list[str] | tuple[str, ...] = ("yes", "no"),
                 positive: str = "yes", base_url: str | None = None, cache_path: str | None = None,
                 batch_size: int = 8, concurrency: int = 4, timeout: float = 120.0):
        if backend not in BACKENDS:
            raise ValueError(f"'backend' must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not isinstance(model, str) or not model.strip():
            raise ValueError("'model' must name the judge model (a model id for openai; a cfdpo model for transformers)")
        if not isinstance(rubric, str) or not rubric.strip():
            raise ValueError("'rubric' must be a non-empty question about the answer, e.g. 'Does this text talk like a pirate?'")
        if (not isinstance(labels, (list, tuple)) or len(labels) < 2
                or not all(isinstance(lb, str) and len(words(lb)) == 1 and lb.strip() == words(lb)[0] for lb in labels)):
            raise ValueError("'labels' must be a list of at least two one-word labels, e.g. [yes, no]")
        if len({lb.lower() for lb in labels}) < len(labels):
            raise ValueError(f"'labels' must differ (ignoring case), got {list(labels)}")
        if label_of(str(positive), list(labels)) is None:
            raise ValueError(f"'positive' must be one of the labels {list(labels)}, got {positive!r}")
        if backend == "openai" and importlib.util.find_spec("openai") is None:
            raise ValueError("the openai backend needs the openai package: pip install 'cfdpo[serve]'")
        if base_url is not None and backend != "openai":
            raise ValueError("'base_url' is for the openai backend only")
        if int(batch_size) < 1 or int(concurrency) < 1:
            raise ValueError("'batch_size' and 'concurrency' must be at least 1")
        self.labels = list(labels)
        self.positive = label_of(str(positive), self.labels)
        self.identity = [backend, model, base_url or "", rubric, self.labels]
        self.cache_path = Path(cache_path) if cache_path else None
        self.backend = (OpenAIJudge(model, base_url, rubric, self.labels, int(concurrency), float(timeout))
                        if backend == "openai" else TransformersJudge(model, rubric, self.labels, int(batch_size)))

    def key(self, answer: str) -> str:
        blob = json.dumps([*self.identity, answer], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def score_one(self, text: str) -> float:
        return self.score_many([text])[0]

    def score_many(self, texts: list[str]) -> list[float]:
        from cfdpo.runio import JsonlLog

        cache = JsonlLog(self.cache_path or default_cache_path())
        known = {row["key"]: row for row in cache.rows}
        todo = {self.key(t): t for t in texts if self.key(t) not in known}
        if todo:
            rows = [{"key": k, **verdict} for k, verdict in zip(todo, self.backend.judge(list(todo.values())))]
            cache.append(rows)
            known.update((row["key"], row) for row in rows)
        verdicts = [known[self.key(t)] for t in texts]
        return [score_of(v["probs"], v["label"], self.positive) for v in verdicts]
