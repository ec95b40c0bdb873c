"""Recipe: the one YAML file that describes a run (behaviour, prompts, model, knobs).

`load_recipe(path)` returns a validated `Recipe` or raises `CfdpoError` with one line naming
the file, the field and what is expected.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cfdpo.errors import CfdpoError

VARIANTS = ("enc", "dis", "contrastive", "negation")
Variant = Literal["enc", "dis", "contrastive", "negation"]
Placement = Literal["user_prefix", "user_suffix", "system"]
PLACEMENTS: tuple[str, ...] = get_args(Placement)
NAME_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"


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
    name: str = Field(description="registered scorer: lexicon, regex, length, person_names, language")
    params: dict[str, Any] = Field(default_factory=dict)
    desired: Literal["lower", "higher"]

    @model_validator(mode="after")
    def _known(self) -> ScorerSpec:
        from cfdpo.scorers import make_scorer

        try:
            make_scorer(self.name, self.params)
        except CfdpoError as e:
            raise ValueError(str(e)) from None
        return self


class Behaviour(_Strict):
    name: str = Field(min_length=1)
    treatment: str | list[str] | None = Field(
        default=None, description="instruction asking for the desired behaviour, or a list of paraphrases of it")
    negative: str | list[str] | None = Field(
        default=None, description="instruction asking for the undesired behaviour, or a list of paraphrases of it")
    placement: Placement = "user_prefix"
    system_prompt: str | None = Field(default=None, description="fixed system prompt of the deployment")
    scorer: ScorerSpec

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
    source: str = Field(default="general", description="builtin set name or a .jsonl/.csv/.parquet file")
    column: str = "prompt"
    train_size: int = Field(default=48, ge=1)
    eval_size: int = Field(default=24, ge=1)
    seed: int = 0


class GenerationSpec(_Strict):
    backend: Literal["transformers", "vllm"] = "transformers"
    samples: int = Field(default=1, ge=1, le=64)
    max_new_tokens: int = Field(default=96, ge=1, le=8192)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    batch_size: int = Field(default=64, ge=1, le=4096, description="sequences per generate call (k samples count k)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0


class PairsSpec(_Strict):
    filter: bool = Field(default=False, description="drop pairs whose chosen answer does not beat the rejected one")
    best_of_k: bool = Field(default=False, description="per prompt keep only the pair with the largest scorer gap")


class DPOSpec(_Strict):
    beta: float = Field(default=0.1, gt=0.0)
    learning_rate: float = Field(default=5e-4, gt=0.0, lt=1.0)
    epochs: float = Field(default=1.0, gt=0.0)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=512, ge=16)
    loss_type: str | list[str] = "sigmoid"
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    bf16: bool | None = Field(default=None, description="bf16 mixed precision; unset: where the GPU or CPU has native bf16")
    precompute_ref_log_probs: bool = False
    save_steps: int = Field(default=50, ge=1, description="checkpoint every N steps so a killed run resumes there")
    seed: int = 0


class LmEvalSpec(_Strict):
    tasks: list[str] = Field(min_length=1, description="lm-eval task names (hub tasks need a hub; local ones need include_path)")
    limit: int | None = Field(default=None, ge=1, description="at most this many documents per task")
    num_fewshot: int | None = Field(default=None, ge=0)
    include_path: str | None = Field(default=None, description="a folder of extra lm-eval task YAML files")


class InScopeContext(_Strict):
    """A context where the behaviour is legitimate: a deployer asks for it, or the user's prompts call for it."""

    name: str = Field(description="short name for reports: letters, digits, '.', '_', '-', not starting with '.'")
    system_prompt: str | None = Field(
        default=None, description="a deployer's system prompt that asks for the behaviour (e.g. a pirate persona)")
    prompts: str | None = Field(
        default=None,
        description="builtin set name or .jsonl/.csv/.parquet file of prompts where the behaviour is legitimate")
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


class EvalSpec(_Strict):
    max_new_tokens: int = Field(default=96, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    batch_size: int = Field(default=16, ge=1)
    samples: int = Field(default=3, ge=0, description="sample answers per model shown in the report")
    mcq: bool = Field(default=False, description="also score the builtin multiple-choice set (capability retention)")
    mcq_items: int = Field(default=179, ge=1, description="how many multiple-choice items (the first N of the set)")
    lm_eval: LmEvalSpec | None = Field(default=None, description="also run lm-eval tasks on every model (extra cfdpo[lmeval])")
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
    subset_size: int = Field(
        default=40, ge=1,
        description="prompts the paraphrase, placement and in-scope conditions use: the first N of the eval split "
                    "(all of it when smaller)")
    kl_prompts: int = Field(default=16, ge=0, description="prompts on which KL(base || model) is estimated (0: no KL)")
    kl_source: str = Field(
        default="general", min_length=1,
        description="builtin set or prompt file for the KL estimate: prompts unrelated to the behaviour")

    # Scorecard fields: left out of the saved and hashed recipe while at their default, so recipes
    # written before they existed keep their digest, manifest hash and recipe.yaml.
    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = (
        "negative_paraphrases", "treatment_paraphrases", "placements", "in_scope", "samples_per_prompt",
        "subset_size", "kl_prompts", "kl_source",
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

    @field_validator("in_scope")
    @classmethod
    def _names_unique(cls, value: list[InScopeContext]) -> list[InScopeContext]:
        names = [context.name for context in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"in-scope context name '{name}' is used twice")
        return value


class Recipe(_Strict):
    model: str = "smollm2-135m"
    trust_remote_code: bool = False
    behaviour: Behaviour
    prompts: PromptsSpec = Field(default_factory=PromptsSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    variants: list[Variant] = Field(min_length=1)
    pairs: PairsSpec = Field(default_factory=PairsSpec)
    dpo: DPOSpec = Field(default_factory=DPOSpec)
    evaluation: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("variants must not repeat")
        return v

    @model_validator(mode="after")
    def _variants_have_instructions(self) -> Recipe:
        b = self.behaviour
        for v in self.variants:
            if v in ("enc", "contrastive") and b.treatment is None:
                raise ValueError(f"variant '{v}' needs behaviour.treatment")
            if v in ("dis", "contrastive", "negation") and b.negative is None:
                raise ValueError(f"variant '{v}' needs behaviour.negative")
        return self

    def needed_conditions(self) -> list[str]:
        """Which counterfactual versions of each prompt the chosen variants need."""
        need = {"control"}
        for v in self.variants:
            if v in ("enc", "contrastive"):
                need.add("treatment")
            if v in ("dis", "contrastive", "negation"):
                need.add("negative")
        return [c for c in ("control", "treatment", "negative") if c in need]

    @model_validator(mode="after")
    def _scorecard_matches_behaviour(self) -> Recipe:
        b, ev = self.behaviour, self.evaluation
        training = {_normalised(text) for text in b.treatments() + b.negatives()}
        for condition in ("treatment", "negative"):
            field = f"evaluation.{condition}_paraphrases"
            held_out = getattr(ev, f"{condition}_paraphrases")
            if held_out is None:
                continue
            if getattr(b, condition) is None:
                raise ValueError(f"{field} needs behaviour.{condition} (the instruction they reword)")
            for i, text in enumerate(held_out):
                if _normalised(text) in training:
                    raise ValueError(f"{field}.{i}: '{text:.60}' is a training instruction; "
                                     "held-out paraphrases must differ from behaviour.treatment and behaviour.negative")
        if ev.placements is not None and b.placement in ev.placements:
            raise ValueError(f"evaluation.placements: '{b.placement}' is the training placement (behaviour.placement), "
                             "scored anyway; list only the others")
        return self

    def to_data(self) -> dict:
        """The recipe as plain data, as saved and hashed (scorecard fields at their default left out)."""
        data = self.model_dump(mode="json")
        for name in EvalSpec.OMITTED_AT_DEFAULT:
            if getattr(self.evaluation, name) == EvalSpec.model_fields[name].get_default(call_default_factory=True):
                del data["evaluation"][name]
        return data

    def canonical_json(self) -> str:
        return json.dumps(self.to_data(), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    msg = first["msg"]
    if kind == "extra_forbidden":
        msg = "unknown field"
    elif kind == "missing":
        msg = "field required"
    msg = msg.removeprefix("Value error, ")
    more = len(err.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return " ".join(f"{where}: {loc}: {msg}{tail}".splitlines())  # one line, whatever the keys hold


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise CfdpoError(f"{where}: expected a mapping of recipe fields at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise CfdpoError(_format_validation_error(err, where)) from None
    except RecursionError:
        raise CfdpoError(f"{where}: nested too deeply; expected a recipe mapping") from None


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load`, except that a key given twice in one mapping is an error (not: the last one wins)."""


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            pass
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
MAX_RECIPE_BYTES = 1_000_000


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise CfdpoError(f"{p}: recipe file not found")
    raw = p.read_bytes()
    if len(raw) > MAX_RECIPE_BYTES:
        raise CfdpoError(f"{p}: {len(raw)} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CfdpoError(f"{p}: not valid UTF-8 (byte {e.start}); save the recipe as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or (str(e).splitlines() or ["unreadable"])[0]
        raise CfdpoError(" ".join(f"{p}:{line}: invalid YAML: {problem}".splitlines())) from None
    except RecursionError:
        raise CfdpoError(f"{p}: invalid YAML: nested too deeply") from None
    return parse_recipe(data, str(p))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_data(), sort_keys=False, allow_unicode=True)
