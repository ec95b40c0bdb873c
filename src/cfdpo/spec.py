"""The sections of a recipe (behaviour, prompts, generation, pairs, dpo, evaluation, tracking) as
pydantic models, every field documented. The recipe as a whole, and its files, is `cfdpo.recipe`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cfdpo import variants as variant_table
from cfdpo.errors import CfdpoError


def _known_variant(value: Any) -> Any:
    """A name in the table of variants; otherwise pydantic's own wording for a literal."""
    if value not in variant_table.NAMES:
        quoted = [f"'{name}'" for name in variant_table.NAMES]
        listed = ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]
        raise ValueError(f"Input should be {listed}")
    return value


Variant = Annotated[str, BeforeValidator(_known_variant)]


Placement = Literal["user_prefix", "user_suffix", "system"]
PLACEMENTS: tuple[str, ...] = get_args(Placement)
NAME_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"
DEFAULT_VALIDATION_SIZE = 8  # prompts.validation_size when unset (fewer when the prompt set runs out)


def _normalised(text: str) -> str:
    """Text compared case- and whitespace-insensitively."""
    return " ".join(text.split()).casefold()


def _check_paraphrases(texts: list[str], when_empty: str) -> None:
    """Raise ValueError unless `texts` is a non-empty list of non-empty, distinct instructions."""
    if not texts:
        raise ValueError(when_empty)
    seen = set()
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError("must not be empty" if len(texts) == 1 else f"entry {i} is empty")
        if _normalised(text) in seen:
            raise ValueError(f"entry {i} repeats an earlier one ('{text:.60}')")
        seen.add(_normalised(text))


def draw_paraphrase(options: list[str] | tuple[str, ...], condition: str, prompt_id: str | None, seed: int) -> str:
    """One of `options` for this prompt: the only one, or the one a hash of (seed, prompt_id, condition) picks."""
    if len(options) == 1:
        return options[0]
    if prompt_id is None:
        raise ValueError(f"{len(options)} {condition} paraphrases: pass prompt_id to draw one")
    digest = hashlib.sha256(json.dumps([seed, prompt_id, condition]).encode()).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScorerSpec(_Strict):
    name: str = Field(description="Registered scorer that measures the behaviour in one answer: lexicon, regex, length, "
                                  "person_names or language.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The scorer's parameters, e.g. {words: [arr, ahoy]} for lexicon or {pattern: ...} for regex; "
                    "default: none.")
    desired: Literal["lower", "higher"] = Field(description="Which direction of the score is the desired behaviour: "
                                                            "lower or higher.")

    @model_validator(mode="after")
    def _known(self) -> ScorerSpec:
        from cfdpo.scorers import make_scorer

        try:
            make_scorer(self.name, self.params)
        except CfdpoError as e:
            raise ValueError(str(e)) from None
        return self


class Behaviour(_Strict):
    name: str = Field(min_length=1, description="Short name of the behaviour, shown in reports and used as a folder "
                                                "name: letters, digits, '.', '_' and '-', not starting with '.'.")
    treatment: str | list[str] | None = Field(
        default=None,
        description="Instruction asking for the desired behaviour, or a list of paraphrases of it (each prompt draws "
                    "one, seeded); needed by enc and contrastive. Default: none.")
    negative: str | list[str] | None = Field(
        default=None,
        description="Instruction asking for the undesired behaviour, or a list of paraphrases of it (each prompt "
                    "draws one, seeded); needed by dis, contrastive and negation. Default: none.")
    placement: Placement = Field(
        default="user_prefix",
        description="Where an instruction goes: user_prefix puts it in the user turn, a blank line before the "
                    "prompt; user_suffix after the prompt; system sends it as the system prompt.")
    system_prompt: str | None = Field(
        default=None,
        description="Fixed system prompt of the deployment, sent with every prompt (user_prefix/user_suffix "
                    "placement only). Default: none.")
    scorer: ScorerSpec = Field(description="How the behaviour is measured in one answer.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:  # a folder in the benchmark: no '/', no '..'
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError(f"'{value:.40}' is not a name: use letters, digits, '.', '_' and '-', not starting with '.'")
        return value

    @field_validator("treatment", "negative", mode="before")
    @classmethod
    def _paraphrases(cls, value: Any) -> Any:
        if value is None:
            return value
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise ValueError("expected an instruction (text) or a list of paraphrases of it (texts)")
        _check_paraphrases(texts, "give one instruction or a non-empty list of paraphrases")
        return value

    @model_validator(mode="after")
    def _one_instruction(self) -> Behaviour:
        if self.treatment is None and self.negative is None:
            raise ValueError("give a treatment instruction, a negative instruction, or both")
        if self.placement == "system" and self.system_prompt:
            raise ValueError("placement 'system' replaces the system prompt; drop system_prompt or use user_prefix")
        return self

    def treatments(self) -> list[str]:
        """The treatment instruction's paraphrases (one entry for a single instruction; none without one)."""
        return _as_list(self.treatment)

    def negatives(self) -> list[str]:
        """The negative instruction's paraphrases (one entry for a single instruction; none without one)."""
        return _as_list(self.negative)

    def instruction_for(self, condition: str, prompt_id: str | None = None, seed: int = 0) -> str:
        """The instruction a prompt gets under `condition` ("treatment" or "negative").

        With one instruction, that instruction. With several paraphrases, the one a hash of
        (seed, prompt_id, condition) picks: the same prompt gets the same paraphrase on every run.
        """
        options = {"treatment": self.treatments, "negative": self.negatives}.get(condition, list)()
        if not options:
            raise ValueError(f"behaviour '{self.name}' has no {condition} instruction")
        return draw_paraphrase(options, condition, prompt_id, seed)


class PromptsSpec(_Strict):
    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("validation_size",)  # newer than the format: see DPOSpec
    source: str = Field(
        default="general",
        description="Builtin prompt set (general: 339 prompts, news: 162 passages, everyday: 160 short prompts) or a "
                    ".jsonl/.csv/.parquet file; "
                    "a relative path is read from the recipe file's folder.")
    column: str = Field(default="prompt", description="Field (JSONL) or column (CSV, parquet) that holds the prompt text.")
    train_size: int = Field(default=48, ge=1, description="Prompts answered to make the training pairs.")
    eval_size: int = Field(default=24, ge=1,
                           description="Held-out prompts for evaluation; they never overlap the training prompts.")
    seed: int = Field(default=0, description="Seed of the shuffle that splits the prompts: evaluation takes the first "
                                             "eval_size, training the next train_size, validation the next "
                                             "validation_size.")
    validation_size: int | None = Field(
        default=None, ge=0,
        description="Prompts dpo.auto validates on while training: the next ones of the shuffle after the training "
                    "prompts, never training or evaluation prompts (they need no generated answers). Must be smaller "
                    f"than train_size. Unset: {DEFAULT_VALIDATION_SIZE}, or as many as the set has left; 0: none "
                    "(dpo.auto then keeps only its step budget).")

    @field_validator("validation_size")
    @classmethod
    def _smaller_than_training(cls, value: int | None, info: ValidationInfo) -> int | None:
        train_size = info.data.get("train_size")
        if value is not None and train_size is not None and value >= train_size:
            raise ValueError(f"{value} is not smaller than train_size ({train_size}); "
                             "expected a few prompts held out beside the training ones")
        return value


class GenerationSpec(_Strict):
    backend: Literal["transformers", "vllm"] = Field(
        default="transformers", description="transformers (CPU or GPU) or vllm (GPU only, extra cfdpo[vllm]).")
    samples: int = Field(default=1, ge=1, le=64,
                         description="Answers per prompt and condition (k); pairs.best_of_k chooses among them.")
    max_new_tokens: int = Field(default=96, ge=1, le=8192, description="Longest answer, in tokens.")
    temperature: float = Field(default=0.7, ge=0.0, le=5.0, description="Sampling temperature; 0 decodes greedily.")
    top_p: float = Field(default=0.9, gt=0.0, le=1.0,
                         description="Nucleus sampling: sample among the most likely tokens that hold this much "
                                     "probability (1.0: all tokens).")
    batch_size: int = Field(default=64, ge=1, le=4096,
                            description="Sequences per generate call (the k samples of a prompt count k).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights dtype for generation; auto: bf16 or fp16 on GPUs, bf16 on CPUs with native bf16, "
                    "float32 elsewhere.")
    seed: int = Field(default=0, description="Sampling seed.")


class RetainPrompts(_Strict):
    """Prompts where the behaviour is legitimate by their own content (e.g. users who write in French), for
    retain pairs of their own: chosen = the answer to the prompt as asked, rejected = the answer with
    `rejected_instruction`, which gets one without the behaviour."""

    source: str = Field(description="builtin set name or .jsonl/.csv/.parquet file of such prompts (a relative path is "
                                    "read from the recipe file's folder); never one of prompts.source's")
    column: str = Field(default="prompt", description="the prompt column of that file")
    size: int = Field(default=24, ge=1, description="how many of them: the first ones that no evaluation.in_scope "
                                                    "context asks (those stay held out)")
    rejected_instruction: str = Field(
        description="the instruction, at behaviour.placement, under which the model answers them without the "
                    "behaviour (the rejected answer; e.g. 'Answer in English.' for French prompts)")

    @field_validator("rejected_instruction")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class PairsSpec(_Strict):
    filter: bool = Field(default=False, description="Drop pairs whose chosen answer does not beat the rejected one on "
                                                    "pairs.score. Default: keep every pair.")
    best_of_k: bool = Field(
        default=False,
        description="Per prompt, pair the best chosen sample with the worst rejected one on pairs.score (needs "
                    "generation.samples > 1). Default: sample i of the chosen answers pairs with sample i of the "
                    "rejected ones.")
    score: Literal["scorer", "self"] = Field(
        default="scorer",
        description="What filter and best_of_k rank answers by: scorer (behaviour.scorer) or self, judge-free: the "
                    "base model's mean per-token log p(answer | treatment prompt) - log p(answer | negative prompt) "
                    "(the control prompt for a missing instruction), cached in pairs/self_scores.jsonl; each pair "
                    "then gets its margin (chosen's minus rejected's). Default: scorer.")
    retain: bool = Field(
        default=False,
        description="Scope-aware negation: add retain pairs to the negation pairs, where the deployer's system "
                    "prompt gives behaviour.negative (there the behaviour is legitimate): chosen = the negative "
                    "answer, rejected = the control answer, from the same answers (no extra generation). Needs the "
                    "negation variant and behaviour.placement user_prefix or user_suffix; dpo.epochs then defaults to 3. "
                    "Default: off.")

    retain_prompts: RetainPrompts | None = Field(
        default=None,
        description="Scope-aware negation for a context the user's own prompt sets (e.g. a user who writes in "
                    "French): retain pairs from these prompts join the negation pairs, chosen = the answer as "
                    "asked, rejected = the answer under their rejected_instruction (two answers per prompt "
                    "generated), each kept only where the scorer finds less of the behaviour in the rejected "
                    "answer (the instruction may not take). Needs pairs.retain. Default: none.")

    # Left out of the saved and hashed recipe while at its default, so recipes written before it
    # existed keep their digest, manifest hash and recipe.yaml.
    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("retain", "score", "retain_prompts")


class DPOSpec(_Strict):
    # Fields newer than the recipe format, left out of the saved and hashed recipe while at their default.
    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("auto", "min_steps", "eval_every", "patience", "max_kl", "rounds")
    beta: float = Field(default=0.1, gt=0.0, description="DPO's beta: how far the trained model may move from the "
                                                         "reference; higher keeps it closer.")
    learning_rate: float = Field(default=5e-4, gt=0.0, lt=1.0, description="Initial learning rate of the AdamW optimizer.")
    epochs: float = Field(default=1.0, gt=0.0, description="Passes over the pairs; may be fractional. Default 1; "
                                                          "3 with pairs.retain (mirrored pairs learn their "
                                                          "boundary slowly).")
    batch_size: int = Field(default=4, ge=1, description="Pairs per process and step (4: twice the optimizer "
                                                         "steps of 8 at the same cost; on 32 pairs 8 steps moved "
                                                         "new behaviours where 4 steps barely did).")
    grad_accum: int = Field(default=1, ge=1, description="Steps whose gradients add up before each update; the "
                                                         "effective batch is batch_size x grad_accum x processes.")
    max_length: int = Field(default=512, ge=16, description="Longest prompt + answer, in tokens; longer ones are truncated.")
    loss_type: str | list[str] = Field(default="sigmoid", description="TRL's DPO loss: sigmoid (the DPO paper), ipo, "
                                                                      "hinge, ...; a list combines several.")
    lora_r: int = Field(default=16, ge=1, description="Rank of the LoRA adapter.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA scaling alpha; the adapter's update is scaled by "
                                                          "lora_alpha / lora_r.")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout probability on the LoRA input.")
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                                    description="Names of the modules that get a LoRA adapter.")
    bf16: bool | None = Field(default=None, description="bf16 mixed precision (frozen base in bf16, LoRA in fp32); "
                                                        "unset: on GPUs and CPUs with native bf16, fp32 elsewhere.")
    precompute_ref_log_probs: bool = Field(default=False, description="Compute the reference model's log-probs once "
                                                                      "before training instead of at every step.")
    save_steps: int = Field(default=50, ge=1, description="Checkpoint every N steps, so a killed run resumes from there.")
    seed: int = Field(default=0, description="Training seed (LoRA initialisation, order of the pairs).")
    auto: bool = Field(
        default=False,
        description="Validation-driven training (the pipeline's train stage; opt-in: each validation decodes the "
                    "validation prompts, minutes per validation for the 135M default on 2 CPU cores): at least "
                    "min_steps optimizer steps "
                    "(epochs becomes a lower bound), the adapter scored on prompts.validation_size held-out "
                    "training-set prompts every eval_every steps, the best step within max_kl published instead of "
                    "the last, and an early stop after patience evaluations without a better step. false: exactly "
                    "epochs passes, the last step published.")
    min_steps: int = Field(default=24, ge=1, description="dpo.auto: optimizer steps at least (epochs are raised to "
                                                         "reach them); no early stop before them unless the last "
                                                         "patience validations all broke the max_kl guard.")
    eval_every: int = Field(default=6, ge=1, description="dpo.auto: validate every N optimizer steps (and at step 0, "
                                                         "at every step before N, and at the last step).")
    patience: int = Field(default=2, ge=1, description="dpo.auto: stop once the best step is this many validations "
                                                       "old (after min_steps, or sooner when that many in a row "
                                                       "broke the max_kl guard).")
    max_kl: float = Field(
        default=0.1, gt=0.0,
        description="dpo.auto: capability guard, in nats per answer token: a step is published only if "
                    "KL(base || model) on a few answers the base sampled to validation prompts stays within it "
                    "(0.1 per token lets a style move a few tokens of an answer a lot, not every token a little); "
                    "if none does, the step with the lowest KL. For enc and contrastive (chosen = the teacher's "
                    "answer) the guard rises to the prompted teacher's own KL on the same answers where that is "
                    "larger. The steering baseline's grid is held to max_kl too.")
    rounds: int = Field(
        default=1, ge=1,
        description="Iterative on-policy rounds: after the first round (answers of the base model, pairs, adapter), "
                    "each further round answers the same prompts again with the previous round's adapter applied, "
                    "builds the variant's pairs from those answers and continues training the same adapter (the DPO "
                    "reference stays the base model). Each round costs one more generation and training; rounds "
                    "stop early when a round's score (validation with auto, else the adapter's own answers under the variant's DPO prompt) "
                    "does not improve on the previous round's. 1: a single round, no rounds/ folder.")


class LmEvalSpec(_Strict):
    tasks: list[str] = Field(min_length=1, description="lm-eval task names; hub tasks need the Hub, tasks defined in "
                                                       "include_path's YAML files run offline.")
    limit: int | None = Field(default=None, ge=1, description="At most this many documents per task; unset: all.")
    num_fewshot: int | None = Field(default=None, ge=0,
                                    description="Few-shot examples per question; unset: the task's own default.")
    include_path: str | None = Field(default=None, description="A folder of extra lm-eval task YAML files. Default: none.")


class InScopeContext(_Strict):
    """A context where the behaviour is legitimate: a deployer asks for it, or the user's prompts call for it.

    It must produce the behaviour, so it is never the control condition: its system_prompt is not
    behaviour.system_prompt and its prompts are not prompts.source (the recipe checks both)."""

    name: str = Field(description="short name for reports: letters, digits, '.', '_', '-', not starting with '.'")
    system_prompt: str | None = Field(
        default=None, description="a deployer's system prompt that asks for the behaviour (e.g. a pirate persona); "
                                  "not behaviour.system_prompt, the control condition, where nothing asks for it")
    prompts: str | None = Field(
        default=None,
        description="builtin set name or .jsonl/.csv/.parquet file of prompts where the behaviour is legitimate "
                    "(a relative path is read from the recipe file's folder); not prompts.source, the control "
                    "condition's prompts, where nothing calls for it")
    column: str = Field(default="prompt", description="the prompt column of that file")
    expect: Literal["higher", "lower"] | None = Field(
        default=None,
        description="which way the behaviour score should stay here (default: the opposite of behaviour.scorer.desired)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError(f"'{value:.40}' is not a name: use letters, digits, '.', '_' and '-', not starting with '.'")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> InScopeContext:
        given = [field for field in ("system_prompt", "prompts") if getattr(self, field) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of system_prompt (a deployer's system prompt asking for the behaviour) "
                             "or prompts (a prompt set where it is legitimate)")
        if not getattr(self, given[0]).strip():
            raise ValueError(f"{given[0]} must not be empty")
        return self


class SteeringSpec(_Strict):
    layer: int | None = Field(
        default=None, ge=0,
        description="Decoder layer (0 = the first) whose output the steering vector is added to. Unset: chosen on "
                    "the validation prompts among the layers at 1/4, 1/2 and 3/4 of the model's depth (best "
                    "behaviour score within dpo.max_kl and without more degenerate answers than base).")
    strength: float | None = Field(
        default=None, ge=0.0,
        description="How much of the unit steering vector is added, in units of that layer's mean residual-stream "
                    "norm over the training answers' tokens (0: no change). Unset: chosen on the validation prompts "
                    "among 0.125, 0.25, 0.5 and 1, held to dpo.max_kl like the layer.")


class EvalSpec(_Strict):
    max_new_tokens: int = Field(default=96, ge=1, le=8192, description="Longest evaluation answer, in tokens.")
    temperature: float = Field(default=0.0, ge=0.0, le=5.0,
                               description="Sampling temperature of evaluation answers; 0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0,
                         description="Nucleus sampling threshold of evaluation answers (1.0: all tokens).")
    batch_size: int = Field(default=64, ge=1, description="Prompts per generate call during evaluation (64: on a "
                                                           "2-core CPU 1.6x the tokens per second of 24).")
    samples: int = Field(default=3, ge=0, description="Sample answers per model shown in the report.")
    mcq: bool = Field(default=False, description="Also score the builtin multiple-choice set (capability retention).")
    mcq_items: int = Field(default=179, ge=1, description="How many multiple-choice items to score (the first N of the set).")
    lm_eval: LmEvalSpec | None = Field(default=None, description="Also run lm-eval tasks on every model (extra "
                                                                 "cfdpo[lmeval]). Default: off.")
    negative_paraphrases: list[str] | None = Field(
        default=None,
        description="held-out rewordings of behaviour.negative, scored on the eval subset (never trained on)")
    treatment_paraphrases: list[str] | None = Field(
        default=None,
        description="held-out rewordings of behaviour.treatment, scored on the eval subset (never trained on)")
    placements: list[Placement] | None = Field(
        default=None,
        description="other placements the trained instructions are also scored under "
                    "(default: the two of user_prefix, user_suffix, system that are not behaviour.placement)")
    in_scope: list[InScopeContext] = Field(
        default_factory=list, description="contexts where the behaviour is legitimate and must be kept (retention vs base)")
    samples_per_prompt: int = Field(
        default=0, ge=0, description="sampled answers per prompt at generation.temperature, besides the greedy one")
    extra_prompts: int = Field(
        default=0, ge=0,
        description="held-out prompts evaluated besides the eval split: the next ones of the prompt shuffle after the "
                    "training and validation prompts, never trained or validated on. The held-out set grows while "
                    "the training split stays as it is, so a finished run can be re-evaluated in place on more "
                    "prompts. The control and trained-instruction conditions use all of them; the other conditions "
                    "the first subset_size.")
    subset_size: int = Field(
        default=40, ge=1,
        description="prompts the paraphrase, placement and in-scope conditions use: the first N of the held-out "
                    "prompts (the eval split, then extra_prompts; all of them when fewer)")
    kl_prompts: int = Field(default=16, ge=0, description="prompts on which KL(base || model) is estimated (0: no KL)")
    kl_source: str = Field(
        default="general", min_length=1,
        description="builtin set or prompt file for the KL estimate: prompts unrelated to the behaviour (a "
                    "relative path is read from the recipe file's folder)")
    baselines: list[Literal["steering"]] = Field(
        default_factory=list,
        description="Extra models scored on the same scorecard: steering (the base model with a CAA-style steering "
                    "vector, the mean difference of the treatment and negative training answers' activations, added "
                    "to one layer). Default: none.")
    steering: SteeringSpec = Field(
        default_factory=SteeringSpec,
        description="The steering baseline's layer and strength; unset ones are chosen on the validation prompts.")

    # Scorecard fields: left out of the saved and hashed recipe while at their default, so recipes
    # written before they existed keep their digest, manifest hash and recipe.yaml.
    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = (
        "negative_paraphrases", "treatment_paraphrases", "placements", "in_scope", "samples_per_prompt",
        "subset_size", "kl_prompts", "kl_source", "baselines", "steering", "extra_prompts",
    )

    @field_validator("negative_paraphrases", "treatment_paraphrases")
    @classmethod
    def _held_out(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            _check_paraphrases(value, "give at least one held-out paraphrase, or leave the field out")
        return value

    @field_validator("placements")
    @classmethod
    def _placements_unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("placements must not repeat")
        return value

    @field_validator("baselines")
    @classmethod
    def _baselines_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("baselines must not repeat")
        return value

    @model_validator(mode="after")
    def _steering_needs_its_baseline(self) -> EvalSpec:
        if self.steering != SteeringSpec() and "steering" not in self.baselines:
            raise ValueError("steering is set but baselines does not list steering; add it to evaluation.baselines")
        return self

    @field_validator("in_scope")
    @classmethod
    def _names_unique(cls, value: list[InScopeContext]) -> list[InScopeContext]:
        names = [context.name for context in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"in-scope context name '{name}' is used twice")
        return value


class TrackingSpec(_Strict):
    report_to: list[str] = Field(
        default_factory=list,
        description="Experiment trackers that get the training curves (TRL's report_to: tensorboard, mlflow, wandb, "
                    "...); tensorboard and mlflow also get cfdpo's own figures after evaluation. Default: none.")
    project: str | None = Field(
        default=None, min_length=1,
        description="Project the runs are filed under: MLflow's experiment, TRL's project (trackio). "
                    "Default: the tracker's own.")
    run_name: str | None = Field(default=None, min_length=1,
                                 description="Name of the run in the trackers. Default: the run directory's name.")
    tracking_uri: str | None = Field(
        default=None, min_length=1,
        description="MLflow tracking URI: a server (http://...) or a local store (MLflow 3 refuses file:// stores "
                    "unless MLFLOW_ALLOW_FILE_STORE=true). Default: MLflow's own (MLFLOW_TRACKING_URI; MLflow 3's "
                    "sqlite:///mlflow.db needs the full mlflow package, not mlflow-skinny).")

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: list[str]) -> list[str]:
        if value:  # transformers is imported only for a recipe that asks for tracking
            from cfdpo.tracking import check_trackers

            check_trackers(value)
        return value
