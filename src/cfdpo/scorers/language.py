"""Language scorer: share of answers detected as a given language (langdetect, seeded)."""

from __future__ import annotations

from cfdpo.scorers.base import Scorer, words


class LanguageScorer(Scorer):
    name = "language"
    unit = "share of answers in the language"

    def __init__(self, lang: str = "en", min_words: int = 3):
        if not isinstance(lang, str) or not lang.strip():
            raise ValueError("'lang' must be a language code such as 'en' or 'fr'")
        self.lang = lang.strip().lower()
        self.min_words = int(min_words)

    def score_one(self, text: str) -> float:
        from langdetect import DetectorFactory, LangDetectException, detect

        DetectorFactory.seed = 0
        if len(words(text)) < self.min_words:
            return 0.0
        try:
            return 1.0 if detect(text) == self.lang else 0.0
        except LangDetectException:
            return 0.0
