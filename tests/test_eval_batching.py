"""Evaluation decodes every model in the same batches (PEFT mixed-adapter batches): its greedy answers
are the ones each model gives decoded on its own, and a resumed evaluation decodes only missing rows."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
from conftest import tiny_recipe

ADAPTERS = ("dis", "negation")


def save_adapter(model_dir: Path, out: Path, seed: int) -> None:
    """A random LoRA adapter (B not zero, so it changes the answers) saved where evaluation finds it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    for seed, name in enumerate(ADAPTERS):
        save_adapter(tiny_model, run / "adapters" / name, seed)
    return run


def plan(run: Path, tiny_model: Path, batch_size: int = 8):
    """(models, rows by (label, condition), answer plan) of the tiny recipe's evaluation of `run`."""
    from cfdpo import scorecard
    from cfdpo.evaluate import AnswerPlan, EvalModels, find_adapters, plan_answers
    from cfdpo.generate import GenParams
    from cfdpo.prompts import load_prompts, split
    from cfdpo.recipe import parse_recipe

    evaluation = {"max_new_tokens": 12, "batch_size": batch_size, "samples": 2, "temperature": 0.0}
    recipe = parse_recipe(tiny_recipe(tiny_model, variants=list(ADAPTERS), evaluation=evaluation))
    p = recipe.prompts
    _, held_out = split(load_prompts(p.source), p.train_size, p.eval_size, p.seed)
    conditions = scorecard.plan_conditions(recipe)
    prompts_by = {c.name: scorecard.condition_prompts(c, held_out, recipe.evaluation.subset_size) for c in conditions}
    ev = recipe.evaluation
    answer_plan = AnswerPlan(params=GenParams(ev.max_new_tokens, 0.0, 1.0), seed=0, samples=0,
                             sample_params=GenParams(ev.max_new_tokens, 0.8, 1.0), sample_seed=0, draw_seed=0)
    models = EvalModels(str(tiny_model), recipe, find_adapters(run))
    return models, plan_answers(models, conditions, prompts_by, answer_plan), answer_plan


def one_model_at_a_time(models, rows_by, log, batch_size: int) -> dict[str, str]:
    """Answers by key, each model decoded in batches of its own rows only (as before mixed batches)."""
    from cfdpo.generate import run_generation

    for label in models.labels:
        rows = [r for (row_label, _), planned in rows_by.items() if row_label == label for r in planned]
        run_generation(rows, log, partial(models.generator, label), batch_size=batch_size, seed=0)
    return {r["key"]: r["answer"] for r in log.rows}


def test_mixed_batches_give_each_models_own_greedy_answers(run_dir, tiny_model, tmp_path):
    from cfdpo.evaluate import decode_answers
    from cfdpo.runio import JsonlLog

    models, rows_by, answer_plan = plan(run_dir, tiny_model)
    assert models.decode_groups() == [["base", "prompted", *ADAPTERS]]
    alone = one_model_at_a_time(models, rows_by, JsonlLog(tmp_path / "alone.jsonl"), 8)
    mixed = {key: row["answer"] for key, row in
             decode_answers(models, rows_by, JsonlLog(tmp_path / "mixed.jsonl"), 8, answer_plan).items()}
    assert mixed == alone
    # the adapters matter: each model answers differently from base on some prompt
    for name in ADAPTERS:
        assert any(mixed[own["key"]] != mixed[base["key"]]
                   for own, base in zip(rows_by[(name, "control")], rows_by[("base", "control")]))


def test_a_label_without_adapter_name_decodes_on_its_own(run_dir, tiny_model, tmp_path, monkeypatch):
    from cfdpo.evaluate import EvalModels, decode_answers
    from cfdpo.runio import JsonlLog

    models, rows_by, answer_plan = plan(run_dir, tiny_model)
    own = EvalModels.adapter_name
    monkeypatch.setattr(EvalModels, "adapter_name", lambda self, label: None if label == "dis" else own(self, label))
    assert models.decode_groups() == [["base", "prompted", "negation"], ["dis"]]
    alone = one_model_at_a_time(models, rows_by, JsonlLog(tmp_path / "alone.jsonl"), 8)
    got = decode_answers(models, rows_by, JsonlLog(tmp_path / "mixed.jsonl"), 8, answer_plan)
    assert {key: row["answer"] for key, row in got.items()} == alone


def test_a_resumed_evaluation_decodes_only_missing_rows(run_dir, tiny_model, tmp_path):
    from cfdpo.evaluate import decode_answers
    from cfdpo.runio import JsonlLog

    models, rows_by, answer_plan = plan(run_dir, tiny_model)
    path = tmp_path / "answers.jsonl"
    full = decode_answers(models, rows_by, JsonlLog(path), 8, answer_plan)
    lines = path.read_text(encoding="utf-8").splitlines()
    dropped = {json.loads(line)["key"] for line in lines[3:7]}
    path.write_text("\n".join(lines[:3] + lines[7:]) + "\n", encoding="utf-8")
    resumed = decode_answers(models, rows_by, JsonlLog(path), 8, answer_plan)
    after = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(after) == len(lines)
    assert {row["key"] for row in after[len(lines) - 4:]} == dropped
    assert {k: r["answer"] for k, r in resumed.items()} == {k: r["answer"] for k, r in full.items()}
