"""Scorer plugins: a third-party package registers scorers under the entry-point group `cfdpo.scorers`.

The plugin is a real distribution: a package with a pyproject, built and installed by pip into a
folder of the test's own (`pip install --target`, so the shared environment is left as it was) that is
then put on sys.path, where `importlib.metadata` finds its entry points like any installed package's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

from cfdpo.cli import main
from cfdpo.errors import CfdpoError
from cfdpo.scorers import make_scorer

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "cfdpo-shout"
version = "0.1"

[project.entry-points."cfdpo.scorers"]
shout = "shout_scorer:ShoutScorer"
explodes = "shout_scorer:ExplodingScorer"
notascorer = "shout_scorer:helper"
broken = "broken_scorer:Broken"
lexicon = "shout_scorer:ShoutScorer"

[tool.setuptools]
py-modules = ["shout_scorer", "broken_scorer"]
"""

MODULE = '''\
from cfdpo.scorers import Scorer


class ShoutScorer(Scorer):
    """Shout scorer: share of letters in upper case."""

    name = "shout"
    unit = "upper-case share of letters"

    def __init__(self, min_letters: int = 1):
        self.min_letters = min_letters

    def score_one(self, text):
        letters = [c for c in text if c.isalpha()]
        return sum(c.isupper() for c in letters) / len(letters) if len(letters) >= self.min_letters else 0.0


class ExplodingScorer(Scorer):
    unit = "nothing"

    def __init__(self):
        raise RuntimeError("no licence key\\nsecond line")


def helper():
    return 1
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    package = root / "cfdpo-shout"
    package.mkdir()
    (package / "pyproject.toml").write_text(PYPROJECT)
    (package / "shout_scorer.py").write_text(MODULE)
    (package / "broken_scorer.py").write_text("raise ImportError('needs torch-shout')\n")
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(package)], check=True, capture_output=True)
    assert (next(site.glob("cfdpo_shout-*.dist-info")) / "entry_points.txt").is_file()
    return site


@pytest.fixture
def plugin(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    yield
    for name in ("shout_scorer", "broken_scorer"):
        sys.modules.pop(name, None)


def test_plugin_scorer_is_made_by_name(plugin):
    scorer = make_scorer("shout", {"min_letters": 2})
    assert type(scorer).__name__ == "ShoutScorer" and scorer.score_one("HEllo") == 0.4 and scorer.score_one("A") == 0.0
    assert type(make_scorer("lexicon", {"words": ["arr"]})).__name__ == "LexiconScorer"  # a builtin wins


def test_unknown_scorer_lists_the_plugins(plugin):
    with pytest.raises(CfdpoError, match="unknown scorer 'nope'; expected one of: .*person_names, regex, shout"):
        make_scorer("nope")


@pytest.mark.parametrize("name,fragment", [
    ("broken", "scorer plugin 'broken' (broken_scorer:Broken): cannot be imported (ImportError: needs torch-shout)"),
    ("explodes", "scorer plugin 'explodes' (shout_scorer:ExplodingScorer): cannot be constructed (RuntimeError: no licence key)"),
    ("notascorer", "scorer plugin 'notascorer' (shout_scorer:helper): is not a subclass of cfdpo.scorers.Scorer"),
], ids=["broken", "explodes", "notascorer"])
def test_a_failing_plugin_is_one_line_naming_it(name, fragment, plugin, tiny_model, tmp_path, capsys):
    with pytest.raises(CfdpoError) as err:
        make_scorer(name)
    assert str(err.value) == fragment
    data = tiny_recipe(tiny_model, variants=["negation"])
    data["behaviour"]["scorer"] = {"name": name, "desired": "lower"}
    rec = write_recipe(tmp_path / "r.yaml", data)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--recipe", str(rec)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_recipe_uses_a_plugin_scorer_for_its_pairs(plugin, tiny_model, tmp_path):
    data = tiny_recipe(tiny_model, variants=["negation"], pairs={"filter": True})
    data["behaviour"]["scorer"] = {"name": "shout", "desired": "lower", "params": {"min_letters": 1}}
    rec = write_recipe(tmp_path / "r.yaml", data)
    run = tmp_path / "run"
    assert main(["generate", str(run), "--recipe", str(rec)]) == 0
    assert main(["pairs", str(run)]) == 0
    stats = json.loads((run / "pairs" / "negation" / "stats.json").read_text())
    assert stats["scorer"] == "shout" and stats["filter"] is True
    assert 0 < stats["count"] < stats["candidates"]  # the plugin's scores decided which pairs the filter kept
    assert stats["score_chosen"] < stats["score_rejected"]


def test_cfdpo_scorers_lists_builtins_and_plugins(plugin, capsys):
    capsys.readouterr()
    assert main(["scorers"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert list(lines)[:6] == ["name", "lexicon", "regex", "length", "person_names", "language"]
    assert "listed words per word" in lines["lexicon"] and "builtin" in lines["lexicon"]
    assert "upper-case share of letters" in lines["shout"] and "shout_scorer:ShoutScorer" in lines["shout"]
    assert "Shout scorer: share of letters in upper case." in lines["shout"]
    assert "error: scorer plugin 'broken'" in lines["broken"]
    assert lines["lexicon"].count("builtin") == 1 and "ShoutScorer" not in lines["lexicon"]  # the shadowed plugin is not listed
