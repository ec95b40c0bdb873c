"""Scorers: turn one answer into a number; a behaviour's score is the mean over answers.

Each scorer is a small class in its own module with `score_one(text) -> float`.
`make_scorer(name, params)` builds one from a recipe, raising `CfdpoError` on unknown names or
bad parameters. Other packages add scorers through the entry-point group `cfdpo.scorers`
(`name = "module:ScorerClass"`); a builtin of the same name wins. `list_scorers()` lists both.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
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
PLUGIN_GROUP = "cfdpo.scorers"


def plugin_entry_points() -> dict[str, EntryPoint]:
    """The installed scorer plugins by name, builtin names left out (a builtin wins)."""
    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name not in REGISTRY}


def _load_plugin(ep: EntryPoint) -> type[Scorer]:
    where = f"scorer plugin '{ep.name}' ({ep.value})"
    try:
        cls = ep.load()
    except Exception as e:  # noqa: BLE001 - whatever a third-party module raises on import
        raise CfdpoError(f"{where}: cannot be imported ({type(e).__name__}: {_first_line(e)})") from None
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise CfdpoError(f"{where}: is not a subclass of cfdpo.scorers.Scorer")
    return cls


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:200]


def make_scorer(name: str, params: dict[str, Any] | None = None) -> Scorer:
    cls = REGISTRY.get(name)
    plugin = None
    if cls is None:
        plugin = plugin_entry_points().get(name)
        if plugin is None:
            known = sorted({*REGISTRY, *plugin_entry_points()})
            raise CfdpoError(f"unknown scorer '{name}'; expected one of: {', '.join(known)}")
        cls = _load_plugin(plugin)
    where = f"scorer plugin '{name}' ({plugin.value})" if plugin else f"scorer '{name}'"
    params = dict(params or {})
    sig = inspect.signature(cls.__init__)
    allowed = [p for p in sig.parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise CfdpoError(f"{where}: unknown parameter '{unknown[0]}'; expected: {', '.join(allowed) or 'none'}")
    missing = [
        p.name for p in sig.parameters.values()
        if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in params
    ]
    if missing:
        raise CfdpoError(f"{where}: missing parameter '{missing[0]}'")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise CfdpoError(f"{where}: {e if plugin is None else _first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a plugin's own failure, named; a builtin's propagates
        if plugin is None:
            raise
        raise CfdpoError(f"{where}: cannot be constructed ({type(e).__name__}: {_first_line(e)})") from None


@dataclass(frozen=True)
class ScorerInfo:
    name: str
    source: str  # "builtin", or the plugin's "module:Class"
    unit: str
    description: str  # first line of the class's (else its module's) docstring; for a broken plugin, the error


def _describe(cls: type[Scorer]) -> str:
    doc = cls.__doc__ or sys.modules[cls.__module__].__doc__
    return (doc or "").strip().split("\n", 1)[0]


def list_scorers() -> list[ScorerInfo]:
    """Every builtin scorer, then every plugin (a plugin that cannot be imported is listed with its error)."""
    found = [ScorerInfo(name, "builtin", cls.unit, _describe(cls)) for name, cls in REGISTRY.items()]
    for name, ep in sorted(plugin_entry_points().items()):
        try:
            cls = _load_plugin(ep)
        except CfdpoError as e:
            found.append(ScorerInfo(name, ep.value, "", f"error: {e}"))
            continue
        found.append(ScorerInfo(name, ep.value, cls.unit, _describe(cls)))
    return found


def mean_score(scorer: Scorer, texts: Iterable[str]) -> float:
    values = scorer.score_many(list(texts))
    return sum(values) / len(values) if values else 0.0


__all__ = ["PLUGIN_GROUP", "REGISTRY", "Scorer", "ScorerInfo", "list_scorers", "make_scorer", "mean_score"]
