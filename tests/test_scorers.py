from __future__ import annotations

import pytest

from cfdpo.errors import CfdpoError
from cfdpo.scorers import make_scorer, mean_score


def test_lexicon_rate_per_word_case_insensitive_and_phrases():
    s = make_scorer("lexicon", {"words": ["arr", "matey", "shiver me timbers"]})
    assert s.score_one("Arr, matey! Hello there.") == pytest.approx(2 / 4)
    assert s.score_one("Shiver me timbers") == pytest.approx(1 / 3)
    assert s.score_one("") == 0.0
    assert mean_score(s, ["arr", "no"]) == pytest.approx(0.5)


def test_regex_count_and_any():
    assert make_scorer("regex", {"pattern": r"^\s*[-*] "}).score_one("- a\n- b\nc") == 2.0
    s = make_scorer("regex", {"pattern": "bonjour", "mode": "any"})
    assert s.score_many(["Bonjour!", "hello"]) == [1.0, 0.0]


def test_length_counts_words():
    assert make_scorer("length").score_one("The sky is blue, isn't it?") == 6.0


def test_person_names_counts_spacy_person_entities():
    s = make_scorer("person_names")
    text = "Mayor Elena Brooks met coach David Okafor in London on Monday."
    assert s.score_one(text) >= 2.0
    assert s.score_one("The council met on Monday to discuss the budget.") == 0.0


def test_language_share():
    s = make_scorer("language", {"lang": "fr"})
    vals = s.score_many(["Le ciel est bleu parce que la lumière du soleil est diffusée par l'air.",
                         "The sky is blue because sunlight is scattered by the air."])
    assert vals == [1.0, 0.0]


@pytest.mark.parametrize("name,params,msg", [
    ("nope", {}, "unknown scorer 'nope'"),
    ("lexicon", {}, "missing parameter 'words'"),
    ("lexicon", {"words": []}, "non-empty list"),
    ("lexicon", {"words": ["a"], "colour": 1}, "unknown parameter 'colour'"),
    ("regex", {"pattern": "("}, "invalid pattern"),
    ("regex", {"pattern": "a", "mode": "all"}, "'mode' must be"),
    ("person_names", {"model": "no_such_spacy_model"}, "not installed"),
])
def test_bad_scorer_specs(name, params, msg):
    with pytest.raises(CfdpoError, match=msg):
        make_scorer(name, params)
