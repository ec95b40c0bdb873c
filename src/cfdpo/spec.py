"""Recipe: the one YAML file that describes a run (behaviour, prompts, model, knobs).

`load_recipe(path)` returns a validated `Recipe` or raises `CfdpoError` with one line naming
the file, the field and what is expected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    treatment: str | None = Field(default=None, description="instruction asking for the desired behaviour")
    negative: str | None = Field(default=None, description="instruction asking for the undesired behaviour")
    placement: Literal["user_prefix", "system"] = "user_prefix"
    system_prompt: str | None = Field(default=None, description="fixed system prompt of the deployment")
    scorer: ScorerSpec

    @model_validator(mode="after")
    def _one_instruction(self) -> Behaviour:
        for field in ("treatment", "negative"):
            value = getattr(self, field)
            if value is not None and not value.strip():
                raise ValueError(f"{field} must not be empty")
        if self.treatment is None and self.negative is None:
            raise ValueError("give a treatment instruction, a negative instruction, or both")
        if self.placement == "system" and self.system_prompt:
            raise ValueError("placement 'system' replaces the system prompt; drop system_prompt or use user_prefix")
        return self


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


class EvalSpec(_Strict):
    max_new_tokens: int = Field(default=96, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    batch_size: int = Field(default=16, ge=1)
    samples: int = Field(default=3, ge=0, description="sample answers per model shown in the report")
    mcq: bool = Field(default=False, description="also score the builtin multiple-choice set (capability retention)")
    mcq_items: int = Field(default=179, ge=1, description="how many multiple-choice items (the first N of the set)")
    lm_eval: LmEvalSpec | None = Field(default=None, description="also run lm-eval tasks on every model (extra cfdpo[lmeval])")


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
        for v in self.variants:
            for instruction in variant_table.BY_NAME[v].instructions:
                if getattr(self.behaviour, instruction) is None:
                    raise ValueError(f"variant '{v}' needs behaviour.{instruction}")
        return self

    def needed_conditions(self) -> list[str]:
        """Which counterfactual versions of each prompt the chosen variants need."""
        need = {"control"}.union(*(variant_table.BY_NAME[v].conditions for v in self.variants))
        return [c for c in variant_table.CONDITIONS if c in need]

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

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
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
