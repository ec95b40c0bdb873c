"""Length scorer: words per answer."""

from __future__ import annotations

from cfdpo.scorers.base import Scorer, words


class LengthScorer(Scorer):
    name = "length"
    unit = "words per answer"

    def __init__(self) -> None:
        pass

    def score_one(self, text: str) -> float:
        return float(len(words(text)))
