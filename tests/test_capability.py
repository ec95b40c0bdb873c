"""Batched answer-token log-probs against a direct computation, and KL(base || model) on the tiny model."""

from __future__ import annotations

import math

import pytest

from cfdpo.capability import kl_prompt_rows, kl_summary, sample_answer_ids
from cfdpo.generate import GenParams
from cfdpo.likelihood import answer_token_logprobs
from cfdpo.prompts import load_prompts, split
from cfdpo.recipe import Recipe

CONVS = [[{"role": "user", "content": text}] for text in
         ("What is a tide?", "Name three colours of the rainbow, please.", "Why?", "How do bees make honey?")]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), tok


def direct_logprobs(model, tok, conv, answer):
    """One conversation at a time, no padding: log p of each answer token."""
    import torch

    prompt = list(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False))
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
    return [float(logp[len(prompt) - 1 + j, token]) for j, token in enumerate(answer)]


def test_batched_answer_logprobs_match_direct(loaded):
    model, tok = loaded
    answers = [[5, 17, 200, 33, 9], [101], [], [44, 45, 46, 47, 48, 49, 50, tok.eos_token_id]]
    batched = answer_token_logprobs(model, tok, CONVS, answers, batch_size=3)
    assert [len(lp) for lp in batched] == [len(a) for a in answers]
    for conv, answer, got in zip(CONVS, answers, batched):
        assert got == pytest.approx(direct_logprobs(model, tok, conv, answer), abs=1e-4)


def test_sampled_answer_ids_are_seeded(loaded):
    model, tok = loaded
    params = GenParams(max_new_tokens=6, temperature=1.0, top_p=1.0)
    ids = sample_answer_ids(model, tok, CONVS, params, seed=3, batch_size=2)
    assert ids == sample_answer_ids(model, tok, CONVS, params, seed=3, batch_size=2)
    assert all(1 <= len(answer) <= 6 for answer in ids)


def test_sampled_answer_ids_keep_end_of_turn_only_when_the_answer_ended(loaded, monkeypatch):
    import torch

    from cfdpo.backends import transformers as backend

    model, tok = loaded
    eos = tok.eos_token_id
    decoded = torch.tensor([[5, 6, eos, eos, eos, eos], [5, 6, 7, 8, 9, 10]])  # one ended, one cut off
    monkeypatch.setattr(backend, "decode", lambda *args: decoded)
    ids = sample_answer_ids(model, tok, CONVS[:2], GenParams(6, 1.0, 1.0), seed=0, batch_size=2)
    assert ids == [[5, 6, eos], [5, 6, 7, 8, 9, 10]]


def test_kl_of_a_model_with_itself_is_zero_and_of_another_is_positive(loaded):
    import copy

    import torch

    model, tok = loaded
    answers = sample_answer_ids(model, tok, CONVS, GenParams(8, 1.0, 1.0), seed=0, batch_size=4)
    base_lps = answer_token_logprobs(model, tok, CONVS, answers)
    same = kl_summary(base_lps, answer_token_logprobs(model, tok, CONVS, answers))
    assert same["kl"] == 0.0 and same["kl_per_token"] == 0.0 and same["n"] == len(CONVS)

    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    moved = kl_summary(base_lps, answer_token_logprobs(other, tok, CONVS, answers))
    assert moved["kl"] > 0.0 and moved["kl_per_token"] > 0.0
    lo, hi = moved["kl_ci95"]
    assert lo <= moved["kl"] <= hi
    tokens = sum(len(a) for a in answers)
    assert math.isclose(moved["kl_per_token"], moved["kl"] * len(answers) / tokens, rel_tol=1e-9)


def test_kl_prompts_avoid_the_recipes_train_and_eval_prompts():
    recipe = Recipe.model_validate({
        "behaviour": {"name": "x", "negative": "Talk like a pirate.", "scorer": {"name": "length", "desired": "lower"}},
        "prompts": {"source": "general", "train_size": 200, "eval_size": 100, "seed": 2},
        "variants": ["negation"], "evaluation": {"kl_prompts": 30}})
    rows = kl_prompt_rows(recipe)
    train, held_out = split(load_prompts("general"), 200, 100, 2)
    assert len(rows) == 30
    assert not {r["id"] for r in rows} & {r["id"] for r in train + held_out}


def test_kl_answers_are_sampled_from_base_as_it_is(monkeypatch, tmp_path):
    """The estimate is unbiased only for answers drawn from base's own distribution: temperature 1, no
    nucleus cut, whatever the recipe samples its training answers with (here 0.7 / 0.9)."""
    from types import SimpleNamespace

    import cfdpo.evaluate as E
    from cfdpo.validation import plan_validation

    recipe = Recipe.model_validate({
        "behaviour": {"name": "x", "negative": "Talk like a pirate.", "scorer": {"name": "length", "desired": "lower"}},
        "prompts": {"source": "general", "train_size": 20, "eval_size": 10},
        "generation": {"temperature": 0.7, "top_p": 0.9},
        "variants": ["negation"], "evaluation": {"kl_prompts": 3, "max_new_tokens": 16}})
    sampled_with = []
    monkeypatch.setattr(E, "sample_answer_ids",
                        lambda model, tok, convs, params, seed, batch: sampled_with.append(params) or [[1]] * len(convs))
    monkeypatch.setattr(E, "answer_token_logprobs", lambda model, tok, convs, ids, batch: [[-1.0]] * len(convs))
    models = SimpleNamespace(recipe=recipe, base_id="m", labels=["base"], tags={"base": "-"},
                             use=lambda label: (None, None), instruction=lambda label: None)
    plan = E.AnswerPlan(params=GenParams(16, 0.0, 1.0), seed=0, samples=0, sample_params=GenParams(16, 0.7, 0.9),
                        sample_seed=0, draw_seed=0)
    E.kl_results(models, tmp_path / "kl.json", plan, 4)
    assert sampled_with == [GenParams(16, 1.0, 1.0)]
    assert plan_validation(recipe, [{"id": "a", "prompt": "Hi?"}], "negative").kl_params == GenParams(16, 1.0, 1.0)
