"""The recipe: the one YAML file that describes a run (model, behaviour, prompts, knobs).

`Recipe` joins the sections of `cfdpo.spec` and checks what spans them. `load_recipe(path)`
returns a validated `Recipe` or raises `CfdpoError` with one
line naming the file, the field and what is expected (a misspelt field: the closest known name).
A relative prompt file path is read from the recipe file's folder. `recipe_template()` and
`recipe_schema()` list every field with its description (`cfdpo recipe [--schema]`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from cfdpo import variants as variant_table
from cfdpo.errors import CfdpoError
from cfdpo.spec import (
    Behaviour,
    DPOSpec,
    EvalSpec,
    GenerationSpec,
    PairsSpec,
    PromptsSpec,
    TrackingSpec,
    Variant,
    _normalised,
    _Strict,
)

# dpo.epochs when pairs.retain is on and the recipe does not set it: a retain pair mirrors a negation pair
# (the same two answers, the instruction moved to the deployer's system prompt), so their gradients cancel
# except where the two contexts differ, and the boundary needs more passes than plain pairs do. On the
# no-spanish behaviour (3 seeds) one pass left the instruction followed as often as base's; three passes
# ignored it from the user turn and kept the deployer's tutor (README, "Does it work on my behaviour?").
RETAIN_EPOCHS = 3.0


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
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec,
        description="Experiment tracking: where the training curves and cfdpo's figures are reported. Default: none.")

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

    @model_validator(mode="after")
    def _retain_has_a_negation(self) -> Recipe:
        scope = self.pairs.retain_prompts
        if scope is not None and not self.pairs.retain:
            raise ValueError("pairs.retain_prompts needs pairs.retain: true (its pairs are retain pairs)")
        if scope is not None and scope.source == self.prompts.source:
            raise ValueError("pairs.retain_prompts.source: the training prompts' source; expected prompts where the "
                             "behaviour is legitimate (e.g. a set written in the language)")
        if scope is not None and self.pairs.score == "self":
            raise ValueError("pairs.retain_prompts does not combine with pairs.score: self (its prompts have no "
                             "counterfactual versions to self-score against)")
        if scope is not None and self.dpo.rounds > 1:
            raise ValueError("pairs.retain_prompts does not combine with dpo.rounds > 1 (the rounds answer the "
                             "training prompts only)")
        if not self.pairs.retain:
            return self
        if self.behaviour.negative is None:
            raise ValueError("pairs.retain needs behaviour.negative (the instruction the deployer's system prompt gives)")
        joined = sorted({row.joins for row in variant_table.RETAIN})
        if not set(joined) & set(self.variants):
            raise ValueError(f"pairs.retain needs the {' or '.join(joined)} variant in variants (retain pairs join its pairs)")
        if self.behaviour.placement == "system":
            raise ValueError("pairs.retain needs behaviour.placement user_prefix or user_suffix (retain pairs give the "
                             "instruction as the deployer's system prompt, where negation pairs must not)")
        return self

    @model_validator(mode="after")
    def _retain_trains_longer(self) -> Recipe:
        if self.pairs.retain and "epochs" not in self.dpo.model_fields_set:
            self.dpo = self.dpo.model_copy(update={"epochs": RETAIN_EPOCHS})
        return self

    def needed_conditions(self) -> list[str]:
        """Which counterfactual versions of each prompt the chosen variants need."""
        need = {"control"}.union(*(variant_table.BY_NAME[v].conditions for v in self.variants))
        return [c for c in variant_table.CONDITIONS if c in need]

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

    @model_validator(mode="after")
    def _in_scope_produces_the_behaviour(self) -> Recipe:
        """An in-scope context must ask for the behaviour: one that is the control condition (the deployment's
        own system prompt, or the recipe's own prompts) has nothing in it that produces the behaviour, so
        its retention would measure nothing."""
        b, p = self.behaviour, self.prompts
        for i, context in enumerate(self.evaluation.in_scope):
            where = f"evaluation.in_scope.{i} ('{context.name}')"
            if context.system_prompt is not None and _normalised(context.system_prompt) == _normalised(b.system_prompt or ""):
                raise ValueError(f"{where}: system_prompt is behaviour.system_prompt, the control condition, where nothing "
                                 "asks for the behaviour; expected a deployer's system prompt that asks for it")
            if context.prompts is not None and (context.prompts, context.column) == (p.source, p.column):
                raise ValueError(f"{where}: prompts '{context.prompts}' are the recipe's own prompts (prompts.source), the "
                                 "control condition, where nothing asks for the behaviour; expected prompts that call for it")
        return self

    def to_data(self) -> dict:
        """The recipe as plain data, as saved and hashed (fields newer than the format left out at their default)."""
        data = self.model_dump(mode="json")
        for section, spec in (("prompts", PromptsSpec), ("dpo", DPOSpec), ("evaluation", EvalSpec), ("pairs", PairsSpec)):
            for name in spec.OMITTED_AT_DEFAULT:
                if getattr(getattr(self, section), name) == spec.model_fields[name].get_default(call_default_factory=True):
                    del data[section][name]
        if self.tracking == TrackingSpec():
            del data["tracking"]
        return data

    def canonical_json(self) -> str:
        return json.dumps(self.to_data(), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def changed_from(self, old: Recipe) -> list[str]:
        """The sections (`evaluation.<field>` for evaluation) in which this recipe differs from `old`."""
        changed = [k for k in type(self).model_fields if k != "evaluation" and getattr(old, k) != getattr(self, k)]
        return changed + [f"evaluation.{k}" for k in EvalSpec.model_fields
                          if getattr(old.evaluation, k) != getattr(self.evaluation, k)]

    def only_evaluation_changed_from(self, old: Recipe) -> bool:
        """This recipe differs from `old` only in evaluation settings no earlier stage reads, so `old`'s
        answers, pairs and adapters stand and only evaluate and report need to run again."""
        changed = self.changed_from(old)
        return bool(changed) and all(c.startswith("evaluation.") and c.split(".", 1)[1] not in UPSTREAM_EVAL_FIELDS
                                     for c in changed)


# evaluation settings that training also reads (dpo.auto's validation answers, the on-policy rounds' batches)
UPSTREAM_EVAL_FIELDS = ("max_new_tokens", "batch_size")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The recipe section class a field's annotation names (`LmEvalSpec | None` names LmEvalSpec), or None.

    A list of sections (`evaluation.in_scope`) is a value, not a section."""
    if get_origin(annotation) is list:
        return None
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
    """The recipe with each relative prompt file path (`prompts.source`, `evaluation.kl_source`, an in-scope
    context's `prompts`, `pairs.retain_prompts.source`) made absolute from `folder`; builtin set names stay names.

    A run directory keeps a copy of the recipe, so the copy holds the absolute paths and still finds the files.
    """
    from cfdpo.prompts import BUILTIN_SETS

    def located(source: str | None) -> str | None:
        if source is None or source in BUILTIN_SETS or Path(source).is_absolute():
            return source
        return str(folder.resolve() / source)

    ev, scope = recipe.evaluation, recipe.pairs.retain_prompts
    in_scope = [c.model_copy(update={"prompts": located(c.prompts)}) for c in ev.in_scope]
    if scope is not None:
        scope = scope.model_copy(update={"source": located(scope.source)})
    return recipe.model_copy(update={
        "prompts": recipe.prompts.model_copy(update={"source": located(recipe.prompts.source)}),
        "pairs": recipe.pairs.model_copy(update={"retain_prompts": scope}),
        "evaluation": ev.model_copy(update={"kl_source": located(ev.kl_source), "in_scope": in_scope})})


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_data(), sort_keys=False, allow_unicode=True)


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
