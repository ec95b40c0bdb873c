"""Probe a recipe before training: do its instructions change the behaviour score at all?

Counterfactual pairs carry only what the prompted model does when asked. From the training answers (the
generate stage's `answers.jsonl`), `probe` gives, per condition, the mean behaviour score over prompts with
its 95 % interval, and per variant the signal its pairs carry: the chosen condition's score minus the
rejected condition's, paired over the same prompts, oriented so that positive is the way the recipe wants
(`behaviour.scorer.desired`). A variant whose interval excludes 0 on the good side *carries* the behaviour;
one whose interval covers 0 has it *within noise* (nothing reliable to learn: reword the instruction, or
pick another variant); one on the bad side goes *the wrong way*. It also says whether the teacher (the
treatment condition) is distinguishable from the control answers, without which the benchmark's "share of
the way from base to the teacher" is not measurable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from cfdpo.stats import paired, per_prompt_means, summary
from cfdpo.variants import CONDITIONS, TABLE


def _verdict(ci95: Sequence[float] | None) -> str:
    if ci95 is None:
        return "within noise"
    lo, hi = ci95
    return "carries" if lo > 0 else "wrong way" if hi < 0 else "within noise"


def probe(rows: Iterable[Mapping], scores: Sequence[float], desired: str, variants: Sequence[str],
          seed: int = 0) -> dict:
    """The probe of answer `rows` (dicts with prompt_id and condition) whose behaviour scores are `scores`
    (one per row, same order), for a scorer where `desired` ("higher" / "lower") is better.

    {"n_prompts", "desired", "conditions": {condition: summary over prompts}, "teacher": paired treatment −
    control (raw, not oriented) or None, "variants": {variant: {"chosen", "rejected", "signal": paired
    chosen − rejected oriented to `desired`, "verdict"}}}.
    """
    sign = 1.0 if desired == "higher" else -1.0
    scored = [{**row, "score": s} for row, s in zip(rows, scores, strict=True) if row["condition"] in CONDITIONS]
    means = {c: per_prompt_means([r for r in scored if r["condition"] == c], "score") for c in CONDITIONS}
    conditions = {c: summary(m, seed) for c, m in means.items() if m}
    out_variants = {}
    for spec in TABLE:
        if spec.name not in variants or not (means[spec.chosen] and means[spec.rejected]):
            continue
        signal = paired({k: sign * v for k, v in means[spec.chosen].items()},
                        {k: sign * v for k, v in means[spec.rejected].items()}, seed)
        out_variants[spec.name] = {"chosen": spec.chosen, "rejected": spec.rejected, "signal": signal,
                                   "verdict": _verdict(signal["ci95"])}
    teacher = paired(means["treatment"], means["control"], seed) if means["treatment"] and means["control"] else None
    return {"n_prompts": len(set().union(*means.values())), "desired": desired, "conditions": conditions,
            "teacher": teacher, "variants": out_variants}


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f"[{_num(ci[0])}, {_num(ci[1])}]"


def probe_lines(result: Mapping, unit: str = "") -> list[str]:
    """The probe as text: one line per condition, the teacher line, one line per variant."""
    lines = [f"probe over {result['n_prompts']} training prompts ({unit or 'score'}; {result['desired']} is better):"]
    for c, s in result["conditions"].items():
        lines.append(f"  {c:<10} {_num(s['score'])} {_ci(s['ci95'])} (n={s['n']})")
    t = result["teacher"]
    if t is not None:
        seen = "distinguishable" if t["distinguishable"] else "NOT distinguishable"
        lines.append(f"  teacher (treatment − control): {_num(t['diff'])} {_ci(t['ci95'])}, p={_num(t['p'])}: {seen}"
                     " from the answers as asked")
    for name, v in result["variants"].items():
        s = v["signal"]
        lines.append(f"  {name:<11} chosen {v['chosen']} − rejected {v['rejected']}, toward {result['desired']}: "
                     f"{_num(s['diff'])} {_ci(s['ci95'])}: {v['verdict']}")
    return lines
