"""Iterative on-policy rounds (`dpo.rounds`): round 2 answers with round 1's adapter, trains on from it,
resumes without redoing round 1; rounds: 1 is the single-round run; rounds: 0 is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_jsonl, tiny_recipe, write_recipe

from cfdpo import rounds
from cfdpo.rounds import mean_condition_score, score_source, stop_reason, validation_score


def rounds_recipe(model: Path, rounds: int) -> dict:
    return tiny_recipe(
        model,
        prompts={"source": "general", "train_size": 3, "eval_size": 1, "seed": 1},
        generation={"samples": 1, "max_new_tokens": 6, "temperature": 0.8, "batch_size": 4},
        variants=["dis"],
        # a large step so the adapter visibly changes the tiny model's answers
        dpo={"epochs": 2, "batch_size": 4, "max_length": 128, "lora_r": 4, "lora_alpha": 8, "learning_rate": 0.05,
             "rounds": rounds},
    )


def train_run(out: Path, recipe: dict):
    from cfdpo import pipeline

    run = pipeline.open_run(out, write_recipe(out.parent / f"{out.name}.yaml", recipe))
    pipeline.generate(run)
    pipeline.build_pairs(run)
    pipeline.train(run)
    return run


def scored(monkeypatch, *scores: float) -> None:
    """The on-policy control scores of round 1's, round 2's, ... adapter, in that order (the tiny random
    model's answers score the same whatever the adapter)."""
    given = iter(scores)
    monkeypatch.setattr(rounds, "mean_condition_score", lambda rows, scorer, condition: next(given))


@pytest.fixture(scope="module")
def two_rounds(tiny_model, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        scored(monkeypatch, 0.3, 0.2)  # round 2 improves: it is kept
        return train_run(tmp_path_factory.mktemp("rounds") / "run", rounds_recipe(tiny_model, 2))


def mtimes(paths: list[Path]) -> dict[str, int]:
    return {str(f): f.stat().st_mtime_ns for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))}


def test_stop_reason_stops_when_a_round_does_not_improve():
    assert stop_reason([0.5], "lower") is None
    assert stop_reason([0.5, 0.4], "lower") is None
    assert "round 2's score 0.5 did not improve on round 1's 0.5" in stop_reason([0.5, 0.5], "lower")
    assert stop_reason([0.4, 0.5], "higher") is None
    assert stop_reason([0.5, 0.4], "higher") is not None


def test_a_round_is_scored_where_its_variant_shows_its_behaviour():
    assert score_source("dis", validated=False) == "control"
    assert score_source("enc", validated=False) == "control"
    assert score_source("negation", validated=False) == "negative"  # pirate talk unasked is ~0 for every model
    assert score_source("negation", validated=True) == "validation"


def test_scores_are_the_mean_control_score_and_the_published_validation_step():
    from cfdpo.scorers import make_scorer

    scorer = make_scorer("lexicon", {"words": ["arr"]})
    rows = [{"condition": "control", "answer": "arr arr"}, {"condition": "control", "answer": "no"},
            {"condition": "negative", "answer": "arr"}]
    assert mean_condition_score(rows, scorer, "control") == 0.5
    assert mean_condition_score(rows, scorer, "negative") == 1.0
    log = {"validation": [{"step": 0, "score": 0.9}, {"step": 2, "score": 0.4}, {"step": 4, "score": 0.6}], "best_step": 2}
    assert validation_score(log) == 0.4


def test_round_two_answers_with_round_one_adapter_and_trains_on_from_it(two_rounds):
    import torch
    from peft import PeftModel

    from cfdpo.backends.transformers import generate_answers
    from cfdpo.evaluate import adapter_hash
    from cfdpo.generate import GenParams
    from cfdpo.models import load_model, load_tokenizer
    from cfdpo.runtime import resolve_dtype

    d, r = two_rounds.dir, two_rounds.recipe
    first = d / "rounds" / "1" / "adapters" / "dis"
    rows = read_jsonl(d / "rounds" / "2" / "answers.jsonl")
    assert rows and all(row["model"].endswith(f"|dis|{adapter_hash(first)}") for row in rows)

    # the same answers as the base model with round 1's adapter applied, generated directly
    tok = load_tokenizer(two_rounds.model_path)
    tok.padding_side = "left"
    g = r.generation
    # in the dtype the rounds generate in (bf16 on a CPU with native bf16)
    model = PeftModel.from_pretrained(load_model(two_rounds.model_path, resolve_dtype(g.dtype)), str(first)).eval()
    direct: dict[int, str] = {}
    with torch.no_grad():
        generate_answers(model, tok, [row["messages"] for row in rows], GenParams(g.max_new_tokens, g.temperature, g.top_p),
                         [1] * len(rows), g.batch_size, g.seed, lambda ids, texts, _n: direct.update(zip(ids, (t[0] for t in texts))))
    assert [row["answer"] for row in rows] == [direct[i] for i in range(len(rows))]
    base = {(row["prompt_id"], row["condition"]): row["answer"] for row in read_jsonl(d / "answers.jsonl")}
    assert any(row["answer"] != base[(row["prompt_id"], row["condition"])] for row in rows)  # the adapter matters

    second = d / "rounds" / "2" / "adapters" / "dis"
    assert json.loads((second / "identity.json").read_text())["start"] == adapter_hash(first)
    assert "start" not in json.loads((first / "identity.json").read_text())
    pairs = json.loads((d / "rounds" / "2" / "pairs" / "dis" / "stats.json").read_text())
    assert pairs["count"] > 0
    summary = json.loads((d / "rounds" / "summary.json").read_text())["dis"]
    assert summary == {"source": "control", "rounds": [{"round": 1, "score": 0.3}, {"round": 2, "score": 0.2}],
                       "kept": 2, "stopped": "all 2 rounds ran"}
    assert json.loads((d / "rounds" / "2" / "score.json").read_text()) == {"dis": {"score": 0.2, "source": "control"}}
    assert adapter_hash(d / "adapters" / "dis") == adapter_hash(second)
    # round 2's adapter was scored on its own control answers, generated after the last round
    last = read_jsonl(d / "rounds" / "3" / "answers.jsonl")
    assert {row["condition"] for row in last} == {"control"}
    assert all(row["model"].endswith(f"|dis|{adapter_hash(second)}") for row in last)


def test_training_continues_from_the_start_adapter(two_rounds, tmp_path):
    from safetensors.torch import load_file

    from cfdpo.pairs import load_pairs
    from cfdpo.train import train_dpo

    first = two_rounds.dir / "rounds" / "1" / "adapters" / "dis"
    spec = two_rounds.recipe.dpo.model_copy(update={"learning_rate": 1e-12, "epochs": 1})
    out = train_dpo(two_rounds.model_path, load_pairs(two_rounds.dir / "rounds" / "2" / "pairs" / "dis"), spec,
                    tmp_path / "dis", start=first)
    before, after = load_file(str(first / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all((before[k] - after[k]).abs().max() < 1e-6 for k in before)


def test_a_rerun_after_a_kill_in_round_two_keeps_round_one(two_rounds, monkeypatch):
    import shutil

    from cfdpo import pipeline
    from cfdpo.evaluate import adapter_hash

    d = two_rounds.dir
    second = d / "rounds" / "2" / "adapters" / "dis"
    made = adapter_hash(second)
    done = [d / "answers.jsonl", d / "pairs", d / "rounds" / "1", d / "rounds" / "2" / "answers.jsonl",
            d / "rounds" / "2" / "pairs"]
    before = mtimes(done)
    shutil.rmtree(second)
    scored(monkeypatch, 0.3, 0.4)  # this time round 2 does worse: round 1 is kept
    run = pipeline.open_run(d)
    pipeline.generate(run)
    pipeline.build_pairs(run)
    pipeline.train(run)
    assert mtimes(done) == before
    assert adapter_hash(second) == made  # trained again, to the same weights
    summary = json.loads((d / "rounds" / "summary.json").read_text())["dis"]
    assert summary["kept"] == 1 and summary["stopped"].startswith("round 2's score 0.4 did not improve on round 1's 0.3")
    assert adapter_hash(d / "adapters" / "dis") == adapter_hash(d / "rounds" / "1" / "adapters" / "dis")


def test_one_round_writes_no_rounds_folder(tiny_model, tmp_path):
    run = train_run(tmp_path / "run", rounds_recipe(tiny_model, 1))
    assert not (run.dir / "rounds").exists()
    identity = json.loads((run.dir / "adapters" / "dis" / "identity.json").read_text())
    log = json.loads((run.dir / "adapters" / "dis" / "train_log.json").read_text())
    assert "start" not in identity and "rounds" not in identity["dpo"] and "rounds" not in log["spec"]
    assert "rounds" not in (run.dir / "recipe.yaml").read_text()
    assert sorted(p.name for p in run.dir.iterdir() if not p.name.startswith(".")) == [
        "adapters", "answers.jsonl", "manifest.json", "pairs", "recipe.yaml"]


def test_zero_rounds_is_a_one_line_error(tiny_model, tmp_path, capsys):
    from cfdpo.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", rounds_recipe(tiny_model, 0))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "dpo.rounds" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_validated_rounds_stop_when_the_validation_score_does_not_improve(tiny_model, tmp_path):
    from cfdpo.evaluate import adapter_hash

    recipe = rounds_recipe(tiny_model, 3)
    recipe["behaviour"]["scorer"] = {"name": "regex", "desired": "lower", "params": {"pattern": "QQQQ"}}  # always 0
    recipe["prompts"]["validation_size"] = 1
    recipe["dpo"].update(auto=True, min_steps=1, eval_every=1, patience=1, epochs=1)
    d = train_run(tmp_path / "run", recipe).dir
    summary = json.loads((d / "rounds" / "summary.json").read_text())["dis"]
    assert summary["source"] == "validation" and summary["kept"] == 1
    assert summary["rounds"] == [{"round": 1, "score": 0.0}, {"round": 2, "score": 0.0}]
    assert summary["stopped"].startswith("round 2's score 0 did not improve on round 1's 0")
    assert not (d / "rounds" / "3").exists()  # no third round after the stop, not even its answers
    assert adapter_hash(d / "adapters" / "dis") == adapter_hash(d / "rounds" / "1" / "adapters" / "dis")
