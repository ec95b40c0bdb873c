"""`cfdpo chat`: a run's adapter (and the base model beside it) answering prompts from stdin or --prompt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

import cfdpo
from cfdpo.cli import main

PROMPT = "What is the sea?"


def make_tiny_run(tiny_model: Path, root: Path) -> Path:
    """A run directory with trained enc and negation adapters, on a copy of the tiny model with its own
    random output layer: the tied tiny model answers newlines only, this one answers tokens, and the
    adapters (a large learning rate) change its answers."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = root / "model"
    shutil.copytree(tiny_model, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.tie_word_embeddings = False
    torch.manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(model_dir, safe_serialization=True)
    recipe = tiny_recipe(model_dir, variants=["enc", "negation"])
    recipe["generation"] = {"samples": 1, "max_new_tokens": 8, "temperature": 0.8, "batch_size": 8}
    recipe["dpo"] = {**recipe["dpo"], "learning_rate": 0.3}
    run = root / "run"
    assert main(["generate", str(run), "--recipe", str(write_recipe(root / "recipe.yaml", recipe))]) == 0
    assert main(["pairs", str(run)]) == 0
    assert main(["train", str(run)]) == 0
    return run


def cfdpo_env() -> dict:
    """The environment for a `python -m cfdpo` subprocess that imports this checkout's cfdpo."""
    src = str(Path(cfdpo.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    return make_tiny_run(tiny_model, tmp_path_factory.mktemp("chat"))


def single_model_answer(run: Path, adapter: str | None, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer of the base model alone, or with only `adapter` loaded on it."""
    from cfdpo.chat import GenParams, generate_answers, read_run  # the decode loop, from its one import site
    from cfdpo.counterfactual import messages
    from cfdpo.models import load_model, load_tokenizer

    recipe, adapters = read_run(run)
    model = load_model(recipe.model)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapters[adapter])).eval()
    got = []
    generate_answers(model, load_tokenizer(recipe.model), [messages(prompt, "control", recipe.behaviour)],
                     GenParams(max_new_tokens, 0.0, 1.0), [1], 1, 0, lambda _i, answers, _c: got.append(answers[0][0]))
    return got[0]


def test_prompt_answers_once_with_the_chosen_adapter_or_base(tiny_run, capsys):
    for adapter in ("negation", "base"):
        capsys.readouterr()
        assert main(["chat", str(tiny_run), "--adapter", adapter, "--prompt", PROMPT, "--max-new-tokens", "10"]) == 0
        expected = single_model_answer(tiny_run, None if adapter == "base" else adapter, PROMPT, 10)
        assert expected.strip()
        assert capsys.readouterr().out == expected + "\n"
    assert single_model_answer(tiny_run, "negation", PROMPT, 10) != single_model_answer(tiny_run, None, PROMPT, 10)


def test_piped_stdin_compare_answers_each_line_until_quit(tiny_run):
    done = subprocess.run(
        [sys.executable, "-m", "cfdpo", "chat", str(tiny_run), "--compare"], input=f"{PROMPT}\n\n/quit\nhello\n",
        capture_output=True, text=True, env=cfdpo_env(), timeout=300,
    )
    assert done.returncode == 0, done.stderr
    enc, base = (single_model_answer(tiny_run, a, PROMPT, 8) for a in ("enc", None))  # enc: first in TRAINED_ORDER
    assert enc != base
    header = next(line for line in done.stdout.splitlines() if "base" in line)
    assert header.split()[1:4:2] == ["enc", "base"]
    assert done.stdout.count("base") == 1  # one answered prompt: blank lines skipped, nothing after /quit
    assert enc in done.stdout and base in done.stdout


def test_unknown_adapter_is_a_one_line_error_listing_the_available_ones(tiny_run, capsys):
    assert main(["chat", str(tiny_run), "--adapter", "nope", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'nope'" in err and "available: base, enc, negation" in err


def test_compare_needs_an_adapter(tiny_run, capsys):
    assert main(["chat", str(tiny_run), "--adapter", "base", "--compare", "--prompt", "hi"]) == 2
    assert "--compare" in capsys.readouterr().err


def test_a_directory_without_recipe_is_refused(tmp_path, capsys):
    assert main(["chat", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no recipe.yaml" in capsys.readouterr().err
