"""What a benchmark runs: the recipes, seeds, sizes, pair-quality, method and multi-behaviour picks,
the target rules, and the recipe each run is made with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cfdpo.benchmark.targets import Targets, load_targets
from cfdpo.errors import CfdpoError
from cfdpo.recipe import Recipe, load_recipe, parse_recipe

REPO_TARGETS = Path("bench") / "targets.yaml"  # the cfdpo repository's rules, used when run from its root


@dataclass
class Sizes:
    train_size: int | None = None
    eval_size: int | None = None
    samples: int | None = None  # generation samples per condition for the pair-quality recipes (best-of-k's k)
    mcq_items: int | None = None


@dataclass
class Plan:
    recipes: dict[str, Path]  # behaviour name -> recipe file
    seeds: int
    out: Path
    docs: Path
    sizes: Sizes = field(default_factory=Sizes)
    pair_quality: list[tuple[str, str]] = field(default_factory=list)  # (recipe name, variant)
    multi: list[tuple[str, str]] = field(default_factory=list)
    command: str = ""
    targets: Targets = field(default_factory=Targets)
    methods: list[tuple[str, str]] = field(default_factory=list)  # (recipe name, variant): steering, self, rounds
    settings: dict[str, dict] = field(default_factory=dict)  # --set: {recipe or "" (every recipe): {section: {field: value}}}

    def settings_for(self, name: str) -> dict[str, dict]:
        """The --set updates of recipe `name`: those for every recipe, then its own on top."""
        return merge_settings(self.settings.get("", {}), self.settings.get(name, {}))


def merge_settings(first: dict[str, dict], then: dict[str, dict]) -> dict[str, dict]:
    return {section: {**first.get(section, {}), **then.get(section, {})} for section in {**first, **then}}


def parse_pick(value: str, recipes: dict[str, Recipe], what: str) -> tuple[str, str]:
    """'pirate:negation' -> ('pirate', 'negation'), checked against the recipes."""
    name, _, variant = value.partition(":")
    if name not in recipes:
        raise CfdpoError(f"{what} '{value}': no recipe named '{name}' in this benchmark ({', '.join(recipes)})")
    if variant not in recipes[name].variants:
        raise CfdpoError(f"{what} '{value}': expected RECIPE:VARIANT with a variant of {name} "
                         f"({', '.join(recipes[name].variants)})")
    return name, variant


def parse_settings(values: list[str] | None) -> dict[str, dict]:
    """--set [RECIPE:]SECTION.FIELD=VALUE (VALUE read as YAML: true, 0.0002, [a, b]) -> {recipe: {section:
    {field: value}}}, recipe "" for a setting without RECIPE: (every recipe)."""
    settings: dict[str, dict] = {}
    for value in values or []:
        key, eq, raw = value.partition("=")
        recipe, _, key = key.strip().rpartition(":")
        section, dot, name = key.partition(".")
        if not (eq and dot and section and name):
            raise CfdpoError(f"--set '{value}': expected [RECIPE:]SECTION.FIELD=VALUE, e.g. dpo.auto=true")
        try:
            settings.setdefault(recipe, {}).setdefault(section, {})[name] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise CfdpoError(f"--set '{value}': VALUE is not valid YAML") from None
    return settings


def derive(recipe: Recipe, seed: int, sizes: Sizes, pair_quality: bool, overrides: dict | None = None,
           variants: list[str] | None = None, steering: bool = False, settings: dict | None = None) -> dict:
    """The recipe as the benchmark runs it for one seed (a plain dict, ready for YAML): `settings` are the
    --set section updates of every run, `overrides` a config's ({"pairs": {...}, "dpo": {...}}, applied
    after them); `steering` adds the steering baseline."""
    d = recipe.model_dump(mode="json")
    for section, values in (settings or {}).items():
        if not isinstance(d.get(section), dict):
            raise CfdpoError(f"--set {section}.*: '{section}' is not a recipe section with fields; expected one of "
                             f"{', '.join(k for k, v in d.items() if isinstance(v, dict))}")
        d[section].update(values)
    d["generation"]["seed"] = seed
    d["dpo"]["seed"] = seed
    d["evaluation"]["mcq"] = True
    if sizes.mcq_items:
        d["evaluation"]["mcq_items"] = sizes.mcq_items
    if sizes.train_size:
        d["prompts"]["train_size"] = sizes.train_size
    if sizes.eval_size:
        d["prompts"]["eval_size"] = sizes.eval_size
    if pair_quality and sizes.samples:
        d["generation"]["samples"] = sizes.samples
    for section, values in (overrides or {}).items():
        d[section].update(values)
    if steering and "steering" not in d["evaluation"]["baselines"]:
        d["evaluation"]["baselines"] = [*d["evaluation"]["baselines"], "steering"]
    if variants:
        d["variants"] = variants
    return d


def _check_splits(recipe: Recipe) -> None:
    """The recipe's prompt set holds its eval, training, validation and extra held-out prompts."""
    from cfdpo.pipeline import Run

    run = Run(Path("."), recipe)
    run.split()
    run.held_out()


def default_picks(names: list[str]) -> tuple[list[str], list[str]]:
    pq = [p for p in ("pirate:negation", "concise:enc") if p.split(":")[0] in names]
    multi = ["pirate:negation", "concise:enc"] if {"pirate", "concise"} <= set(names) else []
    return pq, multi


def picks(given: list[str] | None, default: list[str]) -> list[str]:
    """The picks given on the command line; none given: the default; `none`: no such runs."""
    if given is None:
        return default
    return [] if given == ["none"] else given


def make_plan(recipe_paths: list[Path], seeds: int, out: Path, docs: Path, sizes: Sizes,
              pair_quality: list[str] | None, multi: list[str] | None, command: str,
              targets: Path | None = None, methods: list[str] | None = None, settings: list[str] | None = None) -> Plan:
    """`targets` None: the repository's bench/targets.yaml when the current directory has one, else no targets.
    `settings`: --set [RECIPE:]SECTION.FIELD=VALUE for every run (of RECIPE), checked on every recipe here
    together with the prompt splits they ask for, so a set too small fails now, not hours into the runs."""
    if seeds < 1:
        raise CfdpoError("--seeds: expected 1 or more")
    sets = parse_settings(settings)
    recipes: dict[str, Recipe] = {}
    paths: dict[str, Path] = {}
    for p in recipe_paths:
        r = load_recipe(p)
        name = r.behaviour.name
        if name in recipes:
            raise CfdpoError(f"{p}: behaviour '{name}' is already in this benchmark; names must differ")
        mine = merge_settings(sets.get("", {}), sets.get(name, {}))
        r = parse_recipe(derive(r, 0, sizes, False, settings=mine), f"{p} with --set") if mine else r
        _check_splits(r)
        recipes[name] = r
        paths[name] = p
    unknown = sorted(set(sets) - {""} - set(recipes))
    if unknown:
        raise CfdpoError(f"--set '{unknown[0]}:...': no recipe named '{unknown[0]}' in this benchmark ({', '.join(recipes)})")
    dpq, dmulti = default_picks(list(recipes))
    pq = [parse_pick(v, recipes, "--pair-quality") for v in picks(pair_quality, dpq)]
    mu = [parse_pick(v, recipes, "--multi") for v in picks(multi, dmulti)]
    me = [parse_pick(v, recipes, "--methods") for v in picks(methods, [])]
    for what, chosen in (("--pair-quality", pq), ("--methods", me)):
        if len({n for n, _ in chosen}) < len(chosen):
            raise CfdpoError(f"{what}: one RECIPE:VARIANT per recipe")
    if len(mu) == 1:
        raise CfdpoError("--multi: give two or more RECIPE:VARIANT picks")
    if targets is None and REPO_TARGETS.is_file():
        targets = REPO_TARGETS
    rules = load_targets(targets) if targets is not None else Targets()
    return Plan(paths, seeds, out, docs, sizes, pq, mu, command, rules, me, sets)
