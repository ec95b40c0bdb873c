"""pairs.score self: answers ranked by the base model's log p(a | x_t) - log p(a | x_n) (cfdpo.self_reward)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_recipe, write_recipe

from cfdpo import counterfactual
from cfdpo.cli import main
from cfdpo.errors import CfdpoError
from cfdpo.pairs import build_pairs
from cfdpo.recipe import parse_recipe
from cfdpo.runio import JsonlLog
from cfdpo.self_reward import contrast_conditions, score_answers
from cfdpo.spec import Behaviour, ScorerSpec

PIRATE = Behaviour(name="pirate", treatment="Answer plainly.", negative="Talk like a pirate.",
                   scorer=ScorerSpec(name="lexicon", desired="lower", params={"words": ["arr"]}))
ANSWERS = {"control": "The sea is big and blue.", "treatment": "The ocean is large.",
           "negative": "Arr matey, ye sea be big!"}


def answer_rows(prompts: dict[str, str], samples: int = 1) -> list[dict]:
    return [{"key": f"{pid}-{cond}-{s}", "prompt_id": pid, "prompt": text, "condition": cond, "sample": s, "seed": 0,
             "messages": counterfactual.messages(text, cond, PIRATE, pid), "answer": f"{ANSWERS[cond]} {s}"}
            for pid, text in prompts.items() for cond in ANSWERS for s in range(samples)]


def loader(model_path, calls: list | None = None, sharpen: float = 1.0):
    """load() -> (model, tokenizer); `sharpen` scales the random model's layer weights (not the embedding) so
    that an instruction in the context moves the answer's log-probs measurably."""
    def load():
        import torch

        from cfdpo.models import load_model, load_tokenizer

        if calls is not None:
            calls.append(1)
        model = load_model(str(model_path))
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if weight.dim() == 2 and "embed" not in name:
                    weight.mul_(sharpen)
        return model, load_tokenizer(str(model_path))
    return load


def direct_mean_logprob(model, tokenizer, messages: list[dict], answer: str) -> float:
    """Mean log-prob of the answer's tokens after the generation prompt, from one plain forward pass."""
    import torch

    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    picked = [float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(answer_ids)]
    return sum(picked) / len(picked)


def test_margin_equals_a_direct_computation(tiny_model, tmp_path):
    rows = answer_rows({"p1": "Tell me about the sea.", "p2": "What is a ship?"})
    load = loader(tiny_model, sharpen=5.0)
    scores = score_answers(rows, PIRATE, "tiny", JsonlLog(tmp_path / "self_scores.jsonl"), load, 2)
    pairs = build_pairs(rows, "contrastive", self_scores=scores)  # chosen y_t, rejected y_n
    assert len(pairs) == 2
    model, tokenizer = load()
    by_key = {r["key"]: r for r in rows}
    for pair in pairs:
        def score(key):
            row = by_key[key]
            x_t = counterfactual.messages(row["prompt"], "treatment", PIRATE, row["prompt_id"])
            x_n = counterfactual.messages(row["prompt"], "negative", PIRATE, row["prompt_id"])
            return (direct_mean_logprob(model, tokenizer, x_t, row["answer"])
                    - direct_mean_logprob(model, tokenizer, x_n, row["answer"]))
        expected = score(pair["chosen_key"]) - score(pair["rejected_key"])
        assert pair["margin"] == pytest.approx(expected, abs=1e-5)
        assert abs(expected) > 1e-3  # the instruction changes the log-probs: the comparison means something


def test_filter_keeps_exactly_the_pairs_with_a_positive_margin():
    rows = answer_rows({f"p{i}": f"Question {i}?" for i in range(5)})
    # self-score of each answer; dis pairs chosen y_c, rejected y_n: margin = control's - negative's
    control = {"p0": 1.0, "p1": -0.5, "p2": 0.2, "p3": 0.0, "p4": 3.0}
    negative = {"p0": 0.5, "p1": 0.5, "p2": 0.2, "p3": -0.1, "p4": 4.0}
    scores = {r["key"]: {"control": control, "negative": negative}.get(r["condition"], {}).get(r["prompt_id"], 0.0)
              for r in rows}
    every = build_pairs(rows, "dis", self_scores=scores)
    kept = build_pairs(rows, "dis", filter_pairs=True, self_scores=scores)
    assert {p["prompt_id"]: p["margin"] for p in every} == pytest.approx(
        {pid: control[pid] - negative[pid] for pid in control})
    assert [p["prompt_id"] for p in kept] == ["p0", "p3"]
    assert all(p["margin"] > 0 for p in kept)


def test_best_of_k_picks_the_samples_by_self_score():
    rows = answer_rows({"p1": "Q?"}, samples=3)
    scores = {r["key"]: {"control-0": 0.1, "control-1": 0.9, "control-2": 0.3,
                         "negative-0": -0.2, "negative-1": 0.4, "negative-2": -0.7}.get(r["key"][3:], 0.0) for r in rows}
    (pair,) = build_pairs(rows, "dis", best_of_k=True, self_scores=scores)
    assert (pair["chosen_key"], pair["rejected_key"]) == ("p1-control-1", "p1-negative-2")
    assert pair["margin"] == pytest.approx(0.9 - (-0.7))


def test_the_cache_is_reused_without_a_second_model_call(tiny_model, tmp_path):
    rows = answer_rows({"p1": "Tell me about the sea."})
    calls: list = []
    first = score_answers(rows, PIRATE, "tiny", JsonlLog(tmp_path / "s.jsonl"), loader(tiny_model, calls))
    assert calls == [1] and len(JsonlLog(tmp_path / "s.jsonl").rows) == 2 * len(rows)
    again = score_answers(rows, PIRATE, "tiny", JsonlLog(tmp_path / "s.jsonl"), loader(tiny_model, calls))
    assert calls == [1] and again == first


def test_a_behaviour_with_nothing_to_contrast_is_refused():
    bare = Behaviour.model_construct(name="x", treatment=None, negative=None, placement="user_prefix",
                                     system_prompt=None, scorer=PIRATE.scorer)
    with pytest.raises(CfdpoError, match="pairs.score 'self' needs behaviour.treatment or behaviour.negative"):
        contrast_conditions(bare)
    assert contrast_conditions(PIRATE.model_copy(update={"treatment": None})) == ("control", "negative")


def test_self_score_through_the_cli_and_the_digest_at_the_default(tiny_model, tmp_path, monkeypatch):
    data = tiny_recipe(tiny_model, pairs={"score": "self", "filter": True}, variants=["dis", "negation"])
    rec, run = write_recipe(tmp_path / "r.yaml", data), tmp_path / "run"
    assert main(["generate", str(run), "--recipe", str(rec)]) == 0
    assert main(["pairs", str(run)]) == 0
    from datasets import load_from_disk

    for variant in ("dis", "negation"):
        stats = json.loads((run / "pairs" / variant / "stats.json").read_text())
        ds = load_from_disk(str(run / "pairs" / variant))
        assert stats["score"] == "self" and stats["count"] == len(ds) <= stats["candidates"]
        assert all(m > 0 for m in ds["margin"])
    cached = (run / "pairs" / "self_scores.jsonl").read_bytes()

    def no_model(*args, **kwargs):
        raise AssertionError("a rerun loaded the model")

    monkeypatch.setattr("cfdpo.models.load_model", no_model)
    assert main(["pairs", str(run)]) == 0
    assert (run / "pairs" / "self_scores.jsonl").read_bytes() == cached
    plain = tiny_recipe(tiny_model)
    assert "score" not in parse_recipe(plain).to_data()["pairs"]
    assert parse_recipe(plain).digest() == parse_recipe({**plain, "pairs": {"score": "scorer"}}).digest()


def test_self_score_without_treatment_or_negative_is_a_one_line_error(tiny_model, tmp_path, capsys):
    data = tiny_recipe(tiny_model, pairs={"score": "self"}, variants=["dis"])
    del data["behaviour"]["treatment"], data["behaviour"]["negative"]
    rec = write_recipe(tmp_path / "r.yaml", data)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--recipe", str(rec)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "treatment" in lines[0] and "negative" in lines[0]
