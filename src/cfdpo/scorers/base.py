"""The scorer interface."""

from __future__ import annotations

import re

WORD_RE = re.compile(r"[A-Za-z0-9\u00C0-\u024F']+")


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


class Scorer:
    """Maps an answer to a number. Subclasses implement `score_one`."""

    name = "scorer"
    unit = ""

    def score_one(self, text: str) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def score_many(self, texts: list[str]) -> list[float]:
        return [self.score_one(t) for t in texts]
