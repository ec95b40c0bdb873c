"""Lexicon scorer: rate of listed words per word (e.g. pirate slang)."""

from __future__ import annotations

from cfdpo.scorers.base import Scorer, words


class LexiconScorer(Scorer):
    name = "lexicon"
    unit = "listed words per word"

    def __init__(self, words: list[str], case_sensitive: bool = False):
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError("'words' must be a non-empty list of non-empty strings")
        self.case_sensitive = bool(case_sensitive)
        norm = (lambda w: w) if self.case_sensitive else str.lower
        single = [norm(w.strip()) for w in words if " " not in w.strip()]
        self.single = set(single)
        self.phrases = [tuple(norm(p) for p in w.split()) for w in words if " " in w.strip()]

    def score_one(self, text: str) -> float:
        toks = words(text)
        if not toks:
            return 0.0
        if not self.case_sensitive:
            toks = [t.lower() for t in toks]
        hits = sum(1 for t in toks if t in self.single)
        for phrase in self.phrases:
            n = len(phrase)
            hits += sum(1 for i in range(len(toks) - n + 1) if tuple(toks[i : i + n]) == phrase)
        return hits / len(toks)
