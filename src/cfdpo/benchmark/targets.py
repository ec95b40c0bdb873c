"""Target rules: the checks RESULTS.md's "Targets" table reports as met or missed.

A targets file (YAML; the repository's is bench/targets.yaml):

    setting: "Model: ..., CPU."      # optional: the sentence RESULTS.md states the setting in
    targets:
      - recipe: pirate               # a behaviour name, or "*" for every recipe
        config: plain                # plain (default), filter, bestofk, self, rounds, or "*" for every one run
        model: negation              # a model of those runs, a list of them, or "*" (default) for every trained one
        exclude: [enc]               # optional, with "*": trained models left out
        checks:
          - label: "{recipe}/{config}/{model}: nll_ratio ≤ 1.05"   # the row's name
            metric: nll_ratio        # a path in the model's metrics: negative.score, control.mean_words
            compare: at_most         # at_most | at_most_or | at_least | share_of | times_of | points_from | way_to
            threshold: 1.05
            reference: base          # the model compared with (at_most_or, share_of, times_of, points_from, way_to)
            start: base              # way_to only: the model the way starts from

Each check is judged on the mean over seeds of the metric (the row also gives the 95 % t interval over
seeds of the judged quantity: the value, its share or ratio of the reference's, points from it, or the
share of the way, per seed):
- at_most: mean ≤ threshold; at_least: mean ≥ threshold;
- at_most_or: mean ≤ the larger of threshold and the reference model's mean (a bound that rises to the
  reference's own value: KL for ENC and Contrastive, whose chosen answers are the prompted teacher's, as
  dpo.auto's guard does);
- share_of: mean ≤ threshold % of the reference model's mean;
- times_of: mean ≤ threshold × the reference model's mean;
- points_from: a fraction (an accuracy) within `threshold` percentage points of the reference's;
- way_to: the mean has gone at least `threshold` % of the way from the start model's mean to the
  reference's (ENC's "50 % of the way from base to the prompted teacher": start base, reference prompted).
  A way of length zero, or (start base) one whose reference is not distinguishable from base on the
  metric's condition (its paired `vs_base` interval covers 0 in every seed), is not measurable: the row
  says so and is neither met nor missed (`met` None), since a share of a gap within noise is noise.
A rule whose runs or metrics are missing gives no row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cfdpo.benchmark.aggregate import CONFIGS, UNTRAINED, mean_std, metric_values, runs_of, t_interval
from cfdpo.errors import CfdpoError

EVERY = "*"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Check(_Strict):
    label: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    compare: Literal["at_most", "at_most_or", "at_least", "share_of", "times_of", "points_from", "way_to"]
    threshold: float
    reference: str | None = None
    start: str | None = None
    digits: int = Field(3, ge=0, le=6)  # decimals of the measured means (not for points_from)

    @model_validator(mode="after")
    def _reference_when_relative(self) -> Check:
        absolute = self.compare in ("at_most", "at_least")
        if absolute != (self.reference is None):
            raise ValueError("give 'reference' (a model) with at_most_or, share_of, times_of, points_from and way_to, and only with them")
        if (self.compare == "way_to") != (self.start is not None):
            raise ValueError("give 'start' (a model) with way_to, and only with it")
        try:
            self.label.format(recipe="", config="", model="")
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"label '{self.label}': only {{recipe}}, {{config}} and {{model}} are filled in") from None
        return self

    def measure(self, value: float, ref: float | None, start: float | None = None) -> float | None:
        """The judged quantity of one seed (or of the means): the value itself, % of the reference's,
        × the reference's, points from it, or % of the way from start to reference; None where undefined."""
        if self.compare in ("at_most", "at_most_or", "at_least"):
            return value
        if self.compare == "points_from":
            return 100 * (value - ref)
        if self.compare == "way_to":
            return None if ref == start else 100 * (value - start) / (ref - start)
        if not ref:
            return None
        return 100 * value / ref if self.compare == "share_of" else value / ref

    def judge(self, value: float, ref: float | None, start: float | None = None) -> dict:
        """The row for a measured mean (and the reference's and start's means): value, met, gap (+: missed by)."""
        d, t, name = self.digits, self.threshold, self.reference
        if self.compare == "at_most":
            return {"value": f"{value:.{d}f}", "met": value <= t, "gap": f"{value - t:+.{d}f}"}
        if self.compare == "at_least":
            return {"value": f"{value:.{d}f}", "met": value >= t, "gap": f"{t - value:+.{d}f}"}
        if self.compare == "at_most_or":
            bound = max(t, ref)
            return {"value": f"{value:.{d}f} (bound {bound:.{d}f}: {name} {ref:.{d}f})", "met": value <= bound,
                    "gap": f"{value - bound:+.{d}f}"}
        if self.compare == "way_to":
            seen = f"{value:.{d}f} from {self.start} {start:.{d}f} toward {name} {ref:.{d}f}"
            way = self.measure(value, ref, start)
            if way is None:  # no way to go: reported, not judged
                return {"value": f"{seen} (no gap to close)", "met": None, "gap": ""}
            return {"value": f"{seen} ({way:.0f}% of the way)", "met": way >= t, "gap": f"{t - way:+.0f} points"}
        if self.compare == "points_from":
            diff = 100 * (value - ref)
            return {"value": f"{100 * value:.1f}% vs {name} {100 * ref:.1f}% ({diff:+.1f})",
                    "met": abs(diff) <= t, "gap": f"{abs(diff) - t:+.1f} points"}
        if not ref:  # a ratio to nothing: reported, never met
            return {"value": f"{value:.{d}f}", "met": False, "gap": ""}
        vs = f"{value:.{d}f} vs {name} {ref:.{d}f}"
        if self.compare == "share_of":
            unit = self.metric.rsplit(".", 1)[-1]
            return {"value": f"{vs} ({100 * value / ref:.0f}% of {name})", "met": value <= t / 100 * ref,
                    "gap": f"{100 * value / ref - t:+.0f} points of {name}'s {unit}"}
        return {"value": f"{vs} ({value / ref:.2f}×)", "met": value <= t * ref, "gap": f"{value / ref - t:+.2f}×"}


class Rule(_Strict):
    recipe: str = Field(min_length=1)
    config: str = "plain"
    model: str | list[str] = Field(EVERY, min_length=1)
    exclude: list[str] = Field(default_factory=list)
    checks: list[Check] = Field(min_length=1)

    @model_validator(mode="after")
    def _known_config(self) -> Rule:
        if self.config != EVERY and self.config not in CONFIGS:
            raise ValueError(f"config '{self.config}': expected one of {', '.join(CONFIGS)} or '{EVERY}'")
        if self.exclude and self.model != EVERY:
            raise ValueError(f"exclude: only with model '{EVERY}'")
        return self

    def models(self, recorded: list[str]) -> list[str]:
        """The models this rule checks among a run's `recorded` ones."""
        if self.model == EVERY:
            return [m for m in recorded if m not in UNTRAINED and m not in self.exclude]
        return [self.model] if isinstance(self.model, str) else [m for m in self.model if m in recorded]


class Targets(_Strict):
    source: str = ""  # the file they were read from
    setting: str = ""
    targets: list[Rule] = Field(default_factory=list)


def load_targets(path: Path) -> Targets:
    if not path.is_file():
        raise CfdpoError(f"{path}: targets file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CfdpoError(" ".join(f"{path}: invalid YAML: {e}".splitlines())) from None
    if not isinstance(data, dict):
        raise CfdpoError(f"{path}: expected a mapping with 'targets' (a list of rules) and optionally 'setting'")
    try:
        return Targets.model_validate({**data, "source": str(path)})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise CfdpoError(" ".join(f"{path}: {where}: {first['msg'].removeprefix('Value error, ')}".splitlines())) from None


def target_rows(results: dict, targets: Targets) -> list[dict]:
    """Every rule's checks on the recorded runs, in file order: {target, value, met, gap}."""
    rows = []
    recipes = sorted({r["recipe"] for r in results["runs"]})
    for rule in targets.targets:
        for recipe in recipes if rule.recipe == EVERY else [rule.recipe]:
            for config in CONFIGS if rule.config == EVERY else [rule.config]:
                runs = runs_of(results, recipe, config)
                if not runs:
                    continue
                for model in rule.models(list(runs[0]["metrics"]["models"])):
                    for check in rule.checks:
                        path = check.metric.split(".")
                        values, refs, starts = (metric_values(runs, m, *path) if m else [None] * len(runs)
                                                for m in (model, check.reference, check.start))
                        value, ref, start = (mean_std(v)[0] for v in (values, refs, starts))
                        if value is None or (check.reference and ref is None) or (check.start and start is None):
                            continue
                        per_seed = [check.measure(v, r, s) for v, r, s in zip(values, refs, starts) if v is not None]
                        row = {"target": check.label.format(recipe=recipe, config=config, model=model),
                               **check.judge(value, ref, start),
                               "interval": seed_interval([x for x in per_seed if x is not None])}
                        gap = teacher_gap(runs, check)
                        if gap is not None and row["met"] is not None:
                            row.update(value=f"{row['value']}; not measurable: {gap}", met=None, gap="")
                        rows.append(row)
    return rows


def teacher_gap(runs: list[dict], check: Check) -> str | None:
    """For a way_to check from base: why the way cannot be measured, when the reference model is not
    distinguishable from base on the metric's condition in any seed (its paired difference to base, with
    the interval over prompts, from the first seed); None when it is, or when the runs record no pairing."""
    if check.compare != "way_to" or check.start != "base":
        return None
    paired = metric_values(runs, check.reference, "conditions", check.metric.split(".")[0], "vs_base")
    if not paired or any(p is None or p.get("distinguishable", True) for p in paired):
        return None
    lo, hi = paired[0]["ci95"]
    return (f"{check.reference} not distinguishable from base (difference {paired[0]['diff']:.3g} "
            f"[{lo:.3g}, {hi:.3g}], n={paired[0]['n']})")


def seed_interval(values: list[float]) -> str:
    """'[lo, hi] (n seeds)': the 95 % t interval of the mean over seeds; 'n=1 seed' for a single one."""
    lo_hi = t_interval(values)
    if lo_hi is None:
        return f"n={len(values)} seed{'s' * (len(values) != 1)}"
    return f"[{lo_hi[0]:.3g}, {lo_hi[1]:.3g}] ({len(values)} seeds)"
