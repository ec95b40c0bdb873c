"""What the scorecard evaluates, planned from the recipe alone (no model): conditions and answer drift.

A `Condition` is one way of asking the evaluation prompts:

| kind       | name                         | instruction                        | prompts                  |
|------------|------------------------------|------------------------------------|--------------------------|
| control    | control                      | none                               | eval                     |
| treatment  | treatment                    | the trained one(s)                 | eval                     |
| negative   | negative                     | the trained one(s)                 | eval                     |
| paraphrase | negative:para1, treatment:.. | a held-out rewording               | eval_subset              |
| placement  | negative@user_suffix, ...    | the trained one(s), elsewhere      | eval_subset              |
| in_scope   | in_scope:NAME                | none; a deployer's system prompt,  | eval_subset, or the      |
|            |                              | or prompts where it is legitimate  | context's own prompt set |

"eval" is the whole eval split, "eval_subset" its first `evaluation.subset_size` prompts, and an
in-scope prompt set is also cut to its first `subset_size` prompts (see `condition_prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cfdpo import stats
from cfdpo.counterfactual import conversation
from cfdpo.prompts import load_prompts
from cfdpo.recipe import Recipe
from cfdpo.scorers.base import words
from cfdpo.spec import PLACEMENTS, draw_paraphrase

KINDS = ("control", "treatment", "negative", "paraphrase", "placement", "in_scope")
INSTRUCTION_CONDITIONS = ("treatment", "negative")


@dataclass(frozen=True)
class Condition:
    name: str
    kind: str  # one of KINDS
    instructions: tuple[str, ...]  # none (control, in_scope), one, or the trained paraphrases (one drawn per prompt)
    placement: str  # where the instruction goes: user_prefix, user_suffix or system
    system_prompt: str | None  # the deployment's system prompt (an in-scope context's own, for those)
    prompt_source: str  # "eval", "eval_subset", or an in-scope context's prompt set
    instruction_of: str | None = None  # "treatment" or "negative": whose instruction this is (None: no instruction)
    prompt_column: str = "prompt"  # the prompt column of an in-scope prompt set
    expect: str | None = None  # in_scope: "higher" or "lower", the way the behaviour score should stay

    @property
    def instruction(self) -> str | None:
        """The instruction when there is exactly one (None without one, or when one is drawn per prompt)."""
        return self.instructions[0] if len(self.instructions) == 1 else None

    def messages(self, prompt: str, prompt_id: str | None = None, seed: int = 0) -> list[dict]:
        """The conversation for one prompt; with several trained paraphrases, the one training drew for it."""
        instruction = None
        if self.instructions:
            instruction = draw_paraphrase(self.instructions, self.instruction_of, prompt_id, seed)
        return conversation(prompt, instruction, self.placement, self.system_prompt)


def scored_placements(recipe: Recipe) -> list[str]:
    """The placements besides the training one that the trained instructions are scored under."""
    if recipe.evaluation.placements is not None:
        return list(recipe.evaluation.placements)
    return [p for p in PLACEMENTS if p != recipe.behaviour.placement]


def plan_conditions(recipe: Recipe) -> list[Condition]:
    """Every condition the recipe's scorecard asks for, in report order."""
    b, ev = recipe.behaviour, recipe.evaluation
    trained = {"treatment": tuple(b.treatments()), "negative": tuple(b.negatives())}
    conditions = [Condition("control", "control", (), b.placement, b.system_prompt, "eval")]
    for which in INSTRUCTION_CONDITIONS:
        if trained[which]:
            conditions.append(Condition(which, which, trained[which], b.placement, b.system_prompt, "eval", which))
    for which in INSTRUCTION_CONDITIONS:
        for i, text in enumerate(getattr(ev, f"{which}_paraphrases") or [], 1):
            conditions.append(Condition(f"{which}:para{i}", "paraphrase", (text,), b.placement, b.system_prompt,
                                        "eval_subset", which))
    for placement in scored_placements(recipe):
        for which in INSTRUCTION_CONDITIONS:
            if trained[which]:
                conditions.append(Condition(f"{which}@{placement}", "placement", trained[which], placement,
                                            b.system_prompt, "eval_subset", which))
    present = "lower" if b.scorer.desired == "higher" else "higher"  # where legitimate, the behaviour is there
    for context in ev.in_scope:
        expect = context.expect or present
        if context.system_prompt is not None:
            conditions.append(Condition(f"in_scope:{context.name}", "in_scope", (), b.placement, context.system_prompt,
                                        "eval_subset", expect=expect))
        else:
            conditions.append(Condition(f"in_scope:{context.name}", "in_scope", (), b.placement, b.system_prompt,
                                        context.prompts, prompt_column=context.column, expect=expect))
    return conditions


def condition_prompts(condition: Condition, eval_rows: list[dict], subset_size: int) -> list[dict]:
    """The prompt rows a condition is asked on (an in-scope prompt set is read from its source)."""
    if condition.prompt_source == "eval":
        return eval_rows
    if condition.prompt_source == "eval_subset":
        return eval_rows[:subset_size]
    return load_prompts(condition.prompt_source, condition.prompt_column)[:subset_size]


# --- statistics of one model under one condition ---

def retention(model: dict[str, float], base: dict[str, float], expect: str, seed: int = 0) -> dict:
    """How much of base's in-scope behaviour a model kept, oriented so that 1.0 = kept as base has it
    and below 1 = lost (`stats.ratio_ci`'s keys, plus "orientation").

    expect "higher" (the behaviour shows as a higher score): model mean / base mean.
    expect "lower" (it shows as a lower score, e.g. shorter answers): base mean / model mean, so a
    model whose score rises away from the behaviour drops below 1.
    """
    if expect == "lower":
        return {**stats.ratio_ci(base, model, seed=seed), "orientation": "base/model"}
    return {**stats.ratio_ci(model, base, seed=seed), "orientation": "model/base"}


def condition_entry(condition: Condition, per_prompt: dict[str, float], base_per_prompt: dict[str, float],
                    seed: int = 0) -> dict:
    """One model under one condition: its mean score over prompts with a 95 % interval, the paired
    difference from base on the same prompts, and for an in-scope condition the retention."""
    entry = {"kind": condition.kind, "instruction": " / ".join(condition.instructions) or None,
             "placement": condition.placement, **stats.summary(per_prompt, seed=seed),
             "vs_base": stats.paired(per_prompt, base_per_prompt, seed=seed)}
    if condition.kind == "in_scope":
        entry["retention"] = retention(per_prompt, base_per_prompt, condition.expect or "higher", seed)
    return entry


def primary_instruction(conditions: list[Condition]) -> str:
    """The instruction the scorecard's headline follows: the negative one when trained, else the treatment."""
    return "negative" if any(c.kind == "negative" for c in conditions) else "treatment"


def pooled(per_prompt_by_condition: list[dict[str, float]]) -> dict[str, float]:
    """{prompt id: mean over the conditions that scored it} (one value per prompt for a group of conditions)."""
    values: dict[str, list[float]] = {}
    for per_prompt in per_prompt_by_condition:
        for pid, value in per_prompt.items():
            values.setdefault(pid, []).append(value)
    return {pid: sum(v) / len(v) for pid, v in values.items()}


def group_entries(conditions: list[Condition], per_prompt: dict[str, dict[str, float]],
                  base_per_prompt: dict[str, dict[str, float]], seed: int = 0) -> dict:
    """The scorecard's groups for one model: under the primary instruction (`primary_instruction`), its
    held-out paraphrases pooled and its other placements pooled (per prompt: the mean over the group's
    conditions), each with `stats.summary` and `stats.paired` vs base; {"instruction_of", "paraphrase",
    "placement"}, a group None when the recipe has none."""
    which = primary_instruction(conditions)
    groups: dict = {"instruction_of": which}
    for kind in ("paraphrase", "placement"):
        names = [c.name for c in conditions if c.kind == kind and c.instruction_of == which]
        if not names:
            groups[kind] = None
            continue
        model = pooled([per_prompt[name] for name in names])
        base = pooled([base_per_prompt[name] for name in names])
        groups[kind] = {"conditions": names, **stats.summary(model, seed=seed),
                        "vs_base": stats.paired(model, base, seed=seed)}
    return groups


# --- drift: length and degenerate answers ---

REPEAT_COPIES = 3  # a span of words occurring this many times in a row ...
REPEAT_MIN_WORDS = 8  # ... and covering at least this many words ...
REPEAT_MAX_SPAN = 20  # ... with a span of at most this many words, makes an answer degenerate


def is_repetitive(answer: str) -> bool:
    """Degenerate repetition: some span of 1 to REPEAT_MAX_SPAN words occurs REPEAT_COPIES or more
    times back to back, and those copies cover REPEAT_MIN_WORDS or more words.

    Words (`scorers.base.words`) are compared lower-cased, punctuation ignored: "Arrr, arrr, arrr, arrr, arrr, arrr,
    arrr, arrr" (one word, eight times) and "I am here. I am here. I am here." (three words, three
    times, nine words) are repetitive; "very, very, very good" and a word that merely recurs in a
    paragraph are not.
    """
    tokens = [w.casefold() for w in words(answer)]
    for span in range(1, REPEAT_MAX_SPAN + 1):
        needed = max((REPEAT_COPIES - 1) * span, REPEAT_MIN_WORDS - span)  # positions equal to the one `span` ahead
        run = 0
        for i in range(len(tokens) - span):
            run = run + 1 if tokens[i] == tokens[i + span] else 0
            if run >= needed:
                return True
    return False


def drift(answers: list[str]) -> dict:
    """{"n", "mean_words", "empty_share", "repeated_share"} over a model's answers (None without answers).

    Words as the length scorer counts them; empty: nothing but whitespace; repeated: `is_repetitive`.
    """
    if not answers:
        return {"n": 0, "mean_words": None, "empty_share": None, "repeated_share": None}
    n = len(answers)
    return {
        "n": n,
        "mean_words": sum(len(words(a)) for a in answers) / n,
        "empty_share": sum(not a.strip() for a in answers) / n,
        "repeated_share": sum(is_repetitive(a) for a in answers) / n,
    }
