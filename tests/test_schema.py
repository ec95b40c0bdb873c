"""`cfdpo recipe`: every recipe field documented, as a commented YAML template and as JSON Schema."""

from __future__ import annotations

import json

import yaml

from cfdpo.cli import main
from cfdpo.recipe import Recipe, _section_model, parse_recipe

REQUIRED = {
    "behaviour": {"name": "b", "negative": "Talk like a pirate.",
                  "scorer": {"name": "lexicon", "desired": "lower", "params": {"words": ["arr"]}}},
    "variants": ["negation"],
}


def _stdout(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def _fields(model=Recipe, prefix: str = "") -> dict:
    """Every recipe field by its dotted path, sections included."""
    out = {}
    for name, field in model.model_fields.items():
        out[prefix + name] = field
        section = _section_model(field.annotation)
        if section is not None:
            out |= _fields(section, f"{prefix}{name}.")
    return out


def _key_paths(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        out.add(prefix + key)
        if isinstance(value, dict) and key != "params":
            out |= _key_paths(value, f"{prefix}{key}.")
    return out


def test_schema_describes_every_field(capsys):
    schema = json.loads(_stdout(capsys, ["recipe", "--schema"]))
    sections = [schema, *schema["$defs"].values()]
    assert len(sections) == 13  # the recipe and its 12 section models
    undocumented = [name for s in sections for name, prop in s["properties"].items() if not prop.get("description")]
    assert undocumented == []
    assert set(schema["required"]) == {"behaviour", "variants"}


def test_template_lists_every_field_with_its_description_and_default(capsys):
    text = _stdout(capsys, ["recipe"])
    template = yaml.safe_load(text)
    fields = _fields()
    off = {p for p in fields if p.startswith(("evaluation.lm_eval", "pairs.retain_prompts"))}
    assert _key_paths(template) == set(fields) - off
    assert "  # lm_eval:\n  #   # lm-eval task names" in text  # off by default: shown commented out
    assert "  # retain_prompts:\n  #   # builtin set name" in text
    for path, field in fields.items():
        assert f"# {field.description}\n" in text, path
    filled = template | {"variants": REQUIRED["variants"]}
    filled["behaviour"] = {k: v for k, v in template["behaviour"].items() if v is not None} | REQUIRED["behaviour"]
    assert parse_recipe(filled) == parse_recipe(REQUIRED)
