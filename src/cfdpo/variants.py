"""The one table of Counterfactual DPO variants; everything else derives from it.

| variant     | prompt given to DPO | chosen            | rejected          | teaches                            |
|-------------|---------------------|-------------------|-------------------|------------------------------------|
| enc         | control  x_c        | treatment y_t     | control   y_c     | do the desired thing unasked       |
| dis         | control  x_c        | control   y_c     | negative  y_n     | move away from the undesired thing |
| contrastive | control  x_c        | treatment y_t     | negative  y_n     | both at once                       |
| negation    | negative x_n        | control   y_c     | negative  y_n     | ignore an inappropriate instruction |
| retain      | negative x_n@system | negative  y_n     | control   y_c     | follow it from the deployer        |
| retain-prompts | scope x_s        | scope     y_s     | scope_rejected y_r | keep it where the prompt calls for it |

A *condition* is one counterfactual version of a prompt (control, treatment, negative); a
*variant* is one row of this table that trains an adapter of its own. A *retain* row (`joins` set)
trains none: its pairs join the pairs of the variant it names when the recipe asks for them
(`pairs.retain: true`), so negation + retain is scope-aware negation: ignore the instruction in the
user turn, follow it from the deployer. Its prompt is the prompt condition's instruction given as
the deployer's system prompt (`placement: system`) instead of where the answers were generated;
chosen and rejected are the same counterfactual answers, so it needs no generation of its own.
The `retain-prompts` row (`pairs.retain_prompts`) is the exception: its prompts x_s are not the
training prompts but ones where the behaviour is legitimate by their content (a user who writes in
French), answered as asked (y_s) and under an instruction that gets an answer without the behaviour
(y_r); those two *scope conditions* are generated for it.
"""

from __future__ import annotations

from dataclasses import dataclass

CONDITIONS = ("control", "treatment", "negative")
SCOPE_CONDITIONS = ("scope", "scope_rejected")  # a retain prompt as asked / under pairs.retain_prompts' instruction


@dataclass(frozen=True)
class VariantSpec:
    name: str
    prompt: str  # condition whose messages form the DPO prompt
    chosen: str  # condition whose answer is preferred
    rejected: str  # condition whose answer is dispreferred
    label: str  # the paper's name, for reports
    teaches: str
    placement: str | None = None  # None: the prompt condition's own messages; else its instruction at this placement
    joins: str | None = None  # a retain row: the variant whose pairs its pairs join (no adapter of its own)
    own_prompts: bool = False  # its prompts are pairs.retain_prompts (the scope conditions), not the training prompts

    @property
    def conditions(self) -> tuple[str, ...]:
        """The conditions this variant needs answers for, in `CONDITIONS` order."""
        used = {self.prompt, self.chosen, self.rejected}
        return tuple(c for c in CONDITIONS if c in used)

    @property
    def instructions(self) -> tuple[str, ...]:
        """The behaviour instructions (treatment, negative) this variant needs."""
        return tuple(c for c in self.conditions if c != "control")

    @property
    def validation_condition(self) -> str:
        """Where `dpo.auto` scores this variant: under the negative instruction when it trains the negative
        answers away (dis, contrastive, negation), where the base shows the behaviour, while unasked it may
        show none of it and the curve would be flat; else under its DPO prompt's condition (enc: control)."""
        return "negative" if self.rejected == "negative" else self.prompt

    @property
    def prefers_behaviour(self) -> bool:
        """Whether the chosen answer is the one that shows the behaviour (the negative condition's)."""
        return self.chosen in ("negative", "scope")


TABLE: tuple[VariantSpec, ...] = (
    VariantSpec("enc", "control", "treatment", "control", "Counterfactual ENC", "do the desired thing unasked"),
    VariantSpec("dis", "control", "control", "negative", "Counterfactual DIS", "move away from the undesired thing"),
    VariantSpec("contrastive", "control", "treatment", "negative", "Contrastive", "both at once"),
    VariantSpec("negation", "negative", "control", "negative", "Instruction Negation",
                "ignore an inappropriate instruction"),
    VariantSpec("retain", "negative", "negative", "control", "Retain (deployer)", "follow the instruction from the deployer",
                placement="system", joins="negation"),
    VariantSpec("retain-prompts", "scope", "scope", "scope_rejected", "Retain (in-scope prompts)",
                "keep the behaviour where the prompt calls for it", joins="negation", own_prompts=True),
)
RETAIN: tuple[VariantSpec, ...] = tuple(v for v in TABLE if v.joins is not None)
BY_NAME: dict[str, VariantSpec] = {v.name: v for v in TABLE if v.joins is None}
NAMES: tuple[str, ...] = tuple(BY_NAME)

# Adapters besides the variants: `sft` (the supervised baseline on the chosen answers) and `multi`
# (one adapter on the pairs of several behaviours, benchmark only). Evaluation and reports list
# trained models in this order.
TRAINED_ORDER: tuple[str, ...] = ("sft", *NAMES, "multi")
# Where the SFT baseline takes its targets from: the first of these variants a recipe trains
# (control prompt -> treatment answer; without treatment answers, negation's negative prompt ->
# control answer, the context-distillation analogue).
SFT_SOURCES: tuple[str, ...] = ("enc", "contrastive", "negation")


def get(name: str) -> VariantSpec:
    from cfdpo.errors import CfdpoError

    if name not in BY_NAME:
        raise CfdpoError(f"unknown variant '{name}'; expected one of: {', '.join(NAMES)}")
    return BY_NAME[name]


def get_row(name: str) -> VariantSpec:
    """A row of the table by name: a variant, or a retain row."""
    return next((v for v in RETAIN if v.name == name), None) or get(name)


def retain_rows(variant: str, own_prompts: bool = False) -> tuple[VariantSpec, ...]:
    """The retain rows whose pairs join `variant`'s pairs; `own_prompts`: with the row that has prompts of
    its own (the recipe gives pairs.retain_prompts)."""
    return tuple(v for v in RETAIN if v.joins == variant and (own_prompts or not v.own_prompts))
