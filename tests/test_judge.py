"""Judge scorer: its config checks, the transformers backend on the tiny model, and the openai backend
against a real `cfdpo serve` process (the mechanics: probabilities, batching, cache, errors; not quality)."""

from __future__ import annotations

import shutil
import time

import pytest
import yaml
from conftest import read_jsonl
from test_serve import free_port, posts, served  # noqa: F401 - served is a fixture

from cfdpo.cli import main
from cfdpo.errors import CfdpoError
from cfdpo.scorers import make_scorer
from cfdpo.scorers.judge import TransformersJudge, judge_messages

RUBRIC = "Does this text talk like a pirate?"
ANSWERS = ["Arr matey, ye be a fine sailor on the sea", "The sea is large.", "hi", "Arr matey, ye be a fine sailor on the sea"]


@pytest.mark.parametrize("change, field", [
    ({"backend": "llama"}, "backend"),
    ({"model": " "}, "model"),
    ({"rubric": "  "}, "rubric"),
    ({"labels": ["yes"]}, "labels"),
    ({"labels": "yes"}, "labels"),
    ({"labels": ["yes", "Yes"]}, "labels"),
    ({"labels": ["yes please", "no"]}, "labels"),
    ({"positive": "maybe"}, "positive"),
    ({"base_url": "http://127.0.0.1:1/v1"}, "base_url"),
    ({"batch_size": 0}, "batch_size"),
    ({"temperature": 0}, "temperature"),
])
def test_a_bad_config_is_a_one_line_error(change, field):
    params = {"backend": "transformers", "model": "smollm2-135m", "rubric": RUBRIC, **change}
    with pytest.raises(CfdpoError) as caught:
        make_scorer("judge", params)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and message.startswith("scorer 'judge'") and field in message


def by_hand(model_dir, answer: str, labels: list[str]) -> dict[str, float]:
    """The label probabilities of one unpadded judge prompt, from the model's full next-token distribution."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template(judge_messages(RUBRIC, labels, answer), add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)
    return {label: sum(float(probs[i]) for i in range(len(tok)) if tok.decode([i]).strip().lower() == label)
            for label in labels}


def test_transformers_backend_batched_probabilities_and_cache(tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "judge.jsonl"
    params = {"backend": "transformers", "model": str(tiny_model), "rubric": RUBRIC, "labels": ["it", "he"],
              "positive": "it", "batch_size": 2, "cache_path": str(cache)}
    scorer = make_scorer("judge", params)
    scores = scorer.score_many(ANSWERS)
    assert all(0.0 <= s <= 1.0 for s in scores) and scores[0] == scores[3]
    rows = {row["key"]: row for row in read_jsonl(cache)}
    assert len(rows) == 3  # the repeated answer is judged once
    for answer in ANSWERS[:3]:
        probs = rows[scorer.key(answer)]["probs"]
        assert 0.0 < sum(probs.values()) <= 1.0
        expected = by_hand(tiny_model, answer, ["it", "he"])  # batched + left-padded == one at a time
        assert probs == pytest.approx(expected, rel=1e-4)
        assert scores[ANSWERS.index(answer)] == pytest.approx(expected["it"] / sum(expected.values()), rel=1e-4)
    # from the cache alone: the other label as positive gives the complement
    monkeypatch.setattr(TransformersJudge, "load", lambda self: pytest.fail("judge model loaded despite the cache"))
    other = make_scorer("judge", {**params, "positive": "he"}).score_many(ANSWERS)
    assert [a + b for a, b in zip(scores, other)] == pytest.approx([1.0] * 4)


def test_transformers_backend_refuses_a_label_that_is_not_one_token(tiny_model, tmp_path):
    scorer = make_scorer("judge", {"backend": "transformers", "model": str(tiny_model), "rubric": RUBRIC,
                                   "labels": ["zebra", "he"], "positive": "he", "cache_path": str(tmp_path / "c.jsonl")})
    with pytest.raises(CfdpoError, match="label 'zebra' is not one token"):
        scorer.score_many(["hi"])


def wait_for_posts(log, at_least: int, within_s: float = 10.0) -> int:
    deadline = time.monotonic() + within_s
    while posts(log) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return posts(log)


def first_token_label_probs(url: str, answer: str, labels: list[str]) -> dict[str, float]:
    """The labels' probabilities among the first reply token's top 20, asked directly."""
    import math

    import openai

    reply = openai.OpenAI(base_url=url, api_key="x").chat.completions.create(
        model="base", messages=judge_messages(RUBRIC, labels, answer), max_tokens=1, temperature=0, logprobs=True,
        top_logprobs=20)
    probs = dict.fromkeys(labels, 0.0)
    for alt in reply.choices[0].logprobs.content[0].top_logprobs:
        if alt.token.strip().lower() in probs:
            probs[alt.token.strip().lower()] += math.exp(alt.logprob)
    return probs


def test_openai_backend_against_cfdpo_serve(served, tmp_path):  # noqa: F811 - the fixture
    url, _, log = served
    labels = ["of", "at"]  # words the tiny run's base model puts among its 20 most likely first tokens
    params = {"backend": "openai", "model": "base", "base_url": url, "rubric": RUBRIC, "labels": labels,
              "positive": "of", "concurrency": 2, "cache_path": str(tmp_path / "judge.jsonl")}
    before = posts(log)
    scorer = make_scorer("judge", params)
    scores = scorer.score_many(ANSWERS)
    assert wait_for_posts(log, before + 3) == before + 3  # one request per distinct answer
    assert all(0.0 <= s <= 1.0 for s in scores) and scores[0] == scores[3]
    rows = {row["key"]: row for row in read_jsonl(tmp_path / "judge.jsonl")}
    for answer, score in zip(ANSWERS[:3], scores):
        probs = rows[scorer.key(answer)]["probs"]
        assert set(probs) == set(labels) and 0.0 < sum(probs.values()) <= 1.0
        expected = first_token_label_probs(url, answer, labels)
        assert probs == pytest.approx(expected, rel=1e-4)
        assert score == pytest.approx(expected["of"] / sum(expected.values()), rel=1e-4)
    asked = wait_for_posts(log, before + 6)
    assert make_scorer("judge", params).score_many(ANSWERS) == scores
    time.sleep(1.0)
    assert posts(log) == asked  # all from the cache


def test_a_server_that_is_down_is_a_one_line_error_naming_the_url(served, tmp_path, capsys):  # noqa: F811
    _, run, _ = served
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    scorer = make_scorer("judge", {"backend": "openai", "model": "base", "base_url": url, "rubric": RUBRIC,
                                   "cache_path": str(tmp_path / "judge.jsonl")})
    with pytest.raises(CfdpoError) as caught:
        scorer.score_many(["hi"])
    assert len(str(caught.value).splitlines()) == 1 and f"127.0.0.1:{port}" in str(caught.value)
    # through the CLI: a run whose recipe scores with that judge; building pairs scores the answers
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["behaviour"]["scorer"] = {"name": "judge", "desired": "lower", "params": {
        "backend": "openai", "model": "base", "base_url": url, "rubric": RUBRIC, "cache_path": str(tmp_path / "c.jsonl")}}
    (tmp_path / "judged.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "judged").mkdir()
    shutil.copy(run / "answers.jsonl", tmp_path / "judged" / "answers.jsonl")
    capsys.readouterr()
    assert main(["pairs", str(tmp_path / "judged"), "--recipe", str(tmp_path / "judged.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err, err
    assert not (tmp_path / "c.jsonl").exists() or not read_jsonl(tmp_path / "c.jsonl")


def test_judge_cache_default_follows_the_environment(tmp_path, monkeypatch):
    from cfdpo.scorers.judge import default_cache_path

    monkeypatch.setenv("CFDPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CFDPO_JUDGE_CACHE", raising=False)
    assert default_cache_path() == tmp_path / "cache" / "judge.jsonl"
    monkeypatch.setenv("CFDPO_JUDGE_CACHE", str(tmp_path / "j.jsonl"))
    assert default_cache_path() == tmp_path / "j.jsonl"
