"""Regex scorer: matches per answer, or 1/0 for whether the answer matches at all."""

from __future__ import annotations

import re

from cfdpo.scorers.base import Scorer


class RegexScorer(Scorer):
    name = "regex"
    unit = "matches per answer"

    def __init__(self, pattern: str, mode: str = "count", ignore_case: bool = True, multiline: bool = True):
        if mode not in ("count", "any"):
            raise ValueError("'mode' must be 'count' or 'any'")
        flags = (re.IGNORECASE if ignore_case else 0) | (re.MULTILINE if multiline else 0)
        try:
            self.regex = re.compile(pattern, flags)
        except (re.error, TypeError) as e:
            raise ValueError(f"invalid pattern: {e}") from None
        self.mode = mode
        if mode == "any":
            self.unit = "share of answers matching"

    def score_one(self, text: str) -> float:
        if self.mode == "any":
            return 1.0 if self.regex.search(text) else 0.0
        return float(len(self.regex.findall(text)))
