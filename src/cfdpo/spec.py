"""Recipe: the one YAML file that describes a run (behaviour, prompts, model, knobs).

`load_recipe(path)` returns a validated `Recipe` or raises `CfdpoError` with one line naming
the file, the field and what is expected (a misspelt field: the closest known name). A relative
prompt file path is read from the recipe file's folder. `recipe_template()` and `recipe_schema()`
list every field with its description (`cfdpo recipe [--schema]`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cfdpo.errors import CfdpoError

VARIANTS = ("enc", "dis", "contrastive", "negation")
Variant = Literal["enc", "dis", "contrastive", "negation"]


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
    name: str = Field(min_length=1, description="Short name of the behaviour, shown in reports.")
    treatment: str | None = Field(
        default=None, description="Instruction asking for the desired behaviour; needed by enc and contrastive. Default: none.")
    negative: str | None = Field(
        default=None,
        description="Instruction asking for the undesired behaviour; needed by dis, contrastive and negation. Default: none.")
    placement: Literal["user_prefix", "system"] = Field(
        default="user_prefix",
        description="Where an instruction goes: user_prefix puts it in the user turn, a blank line before the "
                    "prompt; system sends it as the system prompt.")
    system_prompt: str | None = Field(
        default=None,
        description="Fixed system prompt of the deployment, sent with every prompt (user_prefix placement only). "
                    "Default: none.")
    scorer: ScorerSpec = Field(description="How the behaviour is measured in one answer.")

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
    source: str = Field(
        default="general",
        description="Builtin prompt set (general: 339 prompts, news: 118 passages) or a .jsonl/.csv/.parquet file; "
                    "a relative path is read from the recipe file's folder.")
    column: str = Field(default="prompt", description="Field (JSONL) or column (CSV, parquet) that holds the prompt text.")
    train_size: int = Field(default=48, ge=1, description="Prompts answered to make the training pairs.")
    eval_size: int = Field(default=24, ge=1,
                           description="Held-out prompts for evaluation; they never overlap the training prompts.")
    seed: int = Field(default=0, description="Seed of the shuffle that splits the prompts: evaluation takes the first "
                                             "eval_size, training the next train_size.")


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


class PairsSpec(_Strict):
    filter: bool = Field(default=False, description="Drop pairs whose chosen answer does not beat the rejected one on "
                                                    "the scorer. Default: keep every pair.")
    best_of_k: bool = Field(
        default=False,
        description="Per prompt, pair the best chosen sample with the worst rejected one (needs generation.samples > 1). "
                    "Default: sample i of the chosen answers pairs with sample i of the rejected ones.")


class DPOSpec(_Strict):
    beta: float = Field(default=0.1, gt=0.0, description="DPO's beta: how far the trained model may move from the "
                                                         "reference; higher keeps it closer.")
    learning_rate: float = Field(default=5e-4, gt=0.0, lt=1.0, description="Initial learning rate of the AdamW optimizer.")
    epochs: float = Field(default=1.0, gt=0.0, description="Passes over the pairs; may be fractional.")
    batch_size: int = Field(default=8, ge=1, description="Pairs per process and step.")
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


class LmEvalSpec(_Strict):
    tasks: list[str] = Field(min_length=1, description="lm-eval task names; hub tasks need the Hub, tasks defined in "
                                                       "include_path's YAML files run offline.")
    limit: int | None = Field(default=None, ge=1, description="At most this many documents per task; unset: all.")
    num_fewshot: int | None = Field(default=None, ge=0,
                                    description="Few-shot examples per question; unset: the task's own default.")
    include_path: str | None = Field(default=None, description="A folder of extra lm-eval task YAML files. Default: none.")


class EvalSpec(_Strict):
    max_new_tokens: int = Field(default=96, ge=1, le=8192, description="Longest evaluation answer, in tokens.")
    temperature: float = Field(default=0.0, ge=0.0, le=5.0,
                               description="Sampling temperature of evaluation answers; 0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0,
                         description="Nucleus sampling threshold of evaluation answers (1.0: all tokens).")
    batch_size: int = Field(default=16, ge=1, description="Prompts per generate call during evaluation.")
    samples: int = Field(default=3, ge=0, description="Sample answers per model shown in the report.")
    mcq: bool = Field(default=False, description="Also score the builtin multiple-choice set (capability retention).")
    mcq_items: int = Field(default=179, ge=1, description="How many multiple-choice items to score (the first N of the set).")
    lm_eval: LmEvalSpec | None = Field(default=None, description="Also run lm-eval tasks on every model (extra "
                                                                 "cfdpo[lmeval]). Default: off.")


class Recipe(_Strict):
    model: str = Field(default="smollm2-135m", description="Model to align: a builtin alias (smollm2-135m, the "
                                                         "embedded default), a local checkpoint folder, a .gguf file "
                                                         "or a Hub id.")
    trust_remote_code: bool = Field(default=False, description="Let the model's own Python code run; the command "
                                                               "line must also pass --trust-remote-code.")
    behaviour: Behaviour = Field(description="The behaviour to teach: its instructions and its scorer.")
    prompts: PromptsSpec = Field(default_factory=PromptsSpec, description="The prompts the model answers, split into "
                                                                          "training and held-out evaluation prompts.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="How the base model answers the "
                                                                                   "control, treatment and negative prompts.")
    variants: list[Variant] = Field(min_length=1, description="Counterfactual DPO variants to train, one adapter "
                                                              "each: enc, dis, contrastive, negation.")
    pairs: PairsSpec = Field(default_factory=PairsSpec, description="How answers become preference pairs.")
    dpo: DPOSpec = Field(default_factory=DPOSpec, description="DPO training: TRL's DPOTrainer with a PEFT LoRA adapter.")
    evaluation: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation of every model on the held-out prompts.")

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

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The recipe section class a field's annotation names (`LmEvalSpec | None` names LmEvalSpec), or None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_names_at(loc: tuple) -> list[str]:
    """The field names of the recipe section at `loc` (() is the top level); [] where `loc` is no section."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = _section_model(field.annotation) if field else None
        if model is None:
            return []
    return list(model.model_fields)


def _format_validation_error(err: ValidationError, where: str) -> str:
    """One line for the first problem, an unknown field first (a misspelt field also makes its real name 'missing')."""
    problems = err.errors()
    first = next((e for e in problems if e["type"] == "extra_forbidden"), problems[0])
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    msg = first["msg"]
    same_typo = None
    if kind == "extra_forbidden":
        parent, name = first["loc"][:-1], str(first["loc"][-1])
        known = _field_names_at(parent)
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            msg = f"unknown field; did you mean '{close[0]}'?"
            same_typo = (*parent, close[0])
        else:
            msg = f"unknown field; expected one of: {', '.join(known)}"
    elif kind == "missing":
        msg = "field required"
    msg = msg.removeprefix("Value error, ")
    more = sum(1 for e in problems if e is not first and not (e["type"] == "missing" and e["loc"] == same_typo))
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
    return _prompt_file_from(parse_recipe(data, str(p)), p.parent)


def _prompt_file_from(recipe: Recipe, folder: Path) -> Recipe:
    """The recipe with a relative prompt file path made absolute from `folder` (builtin set names stay names).

    A run directory keeps a copy of the recipe, so the copy holds the absolute path and still finds the file.
    """
    from cfdpo.prompts import BUILTIN_SETS

    source = recipe.prompts.source
    if source in BUILTIN_SETS or Path(source).is_absolute():
        return recipe
    prompts = recipe.prompts.model_copy(update={"source": str(folder.resolve() / source)})
    return recipe.model_copy(update={"prompts": prompts})


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def recipe_schema() -> dict:
    """The JSON Schema of a recipe, every field with its description."""
    return Recipe.model_json_schema()


def recipe_template() -> str:
    """Every recipe field as YAML: its description as a comment above it, its default as its value.

    Required fields have no value; an optional section that is off by default (evaluation.lm_eval)
    is commented out.
    """
    return "\n".join(_template_lines(Recipe, "")) + "\n"


def _template_lines(model: type[BaseModel], indent: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        lines.append(f"{indent}# {field.description}")
        section = _section_model(field.annotation)
        required = "  # required" if field.is_required() else ""
        if section is None:
            value = "" if field.is_required() else " " + _yaml_scalar(field.get_default(call_default_factory=True))
            lines.append(f"{indent}{name}:{value}{required}")
        elif field.is_required() or field.get_default(call_default_factory=True) is not None:
            lines.append(f"{indent}{name}:{required}")
            lines.extend(_template_lines(section, indent + "  "))
        else:
            lines.append(f"{indent}# {name}:")
            lines.extend(f"{indent}# {line}" for line in _template_lines(section, "  "))
    return lines


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1_000).removesuffix("...\n").strip()
