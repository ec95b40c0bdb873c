"""Scorers: turn one answer into a number; a behaviour's score is the mean over answers.

Each scorer is a small class in its own module with `score_one(text) -> float`.
`make_scorer(name, params)` builds one from a recipe, raising `CfdpoError` on unknown names or
bad parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from cfdpo.errors import CfdpoError
from cfdpo.scorers.base import Scorer
from cfdpo.scorers.judge import JudgeScorer
from cfdpo.scorers.language import LanguageScorer
from cfdpo.scorers.length import LengthScorer
from cfdpo.scorers.lexicon import LexiconScorer
from cfdpo.scorers.person_names import PersonNamesScorer
from cfdpo.scorers.regex import RegexScorer

REGISTRY: dict[str, type[Scorer]] = {
    "lexicon": LexiconScorer,
    "regex": RegexScorer,
    "length": LengthScorer,
    "person_names": PersonNamesScorer,
    "language": LanguageScorer,
    "judge": JudgeScorer,
}


def make_scorer(name: str, params: dict[str, Any] | None = None) -> Scorer:
    cls = REGISTRY.get(name)
    if cls is None:
        raise CfdpoError(f"unknown scorer '{name}'; expected one of: {', '.join(sorted(REGISTRY))}")
    params = dict(params or {})
    sig = inspect.signature(cls.__init__)
    allowed = [p for p in sig.parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise CfdpoError(f"scorer '{name}': unknown parameter '{unknown[0]}'; expected: {', '.join(allowed) or 'none'}")
    missing = [
        p.name for p in sig.parameters.values()
        if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in params
    ]
    if missing:
        raise CfdpoError(f"scorer '{name}': missing parameter '{missing[0]}'")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise CfdpoError(f"scorer '{name}': {e}") from None


def mean_score(scorer: Scorer, texts: Iterable[str]) -> float:
    values = scorer.score_many(list(texts))
    return sum(values) / len(values) if values else 0.0


__all__ = ["REGISTRY", "Scorer", "make_scorer", "mean_score"]
