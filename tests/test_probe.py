"""`cfdpo probe`: each condition's score, the teacher against the answers as asked, and each variant's
chosen-minus-rejected signal oriented to the scorer's direction, before any training."""

from __future__ import annotations

import json

from conftest import read_jsonl, tiny_recipe, write_recipe

from cfdpo.cli import main
from cfdpo.probe import probe, probe_lines


def _rows(scores_by_condition: dict[str, list[float]]) -> tuple[list[dict], list[float]]:
    rows, scores = [], []
    for condition, values in scores_by_condition.items():
        for i, v in enumerate(values):
            rows.append({"prompt_id": f"p{i}", "condition": condition, "answer": "-"})
            scores.append(v)
    return rows, scores


# 12 prompts: the treatment answers are 5 words shorter on every prompt, the negative answers as long as
# the control ones up to a ±1 wobble that averages out.
CONTROL = [30.0 + i for i in range(12)]
ROWS, SCORES = _rows({"control": CONTROL, "treatment": [c - 5 for c in CONTROL],
                      "negative": [c + (1 if i % 2 else -1) for i, c in enumerate(CONTROL)]})


def test_probe_orients_each_variant_signal_to_the_scorer_direction():
    shorter = probe(ROWS, SCORES, "lower", ["enc", "dis", "contrastive", "negation"])
    assert shorter["n_prompts"] == 12
    assert shorter["conditions"]["treatment"]["score"] == sum(CONTROL) / 12 - 5
    assert shorter["teacher"]["diff"] == -5 and shorter["teacher"]["distinguishable"]  # raw, not oriented
    enc = shorter["variants"]["enc"]
    assert (enc["chosen"], enc["rejected"]) == ("treatment", "control")
    assert enc["signal"]["diff"] == 5 and enc["verdict"] == "carries"  # shorter is better: +5 toward it
    assert shorter["variants"]["dis"]["verdict"] == "within noise"  # negative ≈ control
    assert shorter["variants"]["negation"]["verdict"] == "within noise"
    assert shorter["variants"]["contrastive"]["verdict"] == "carries"

    longer = probe(ROWS, SCORES, "higher", ["enc"])
    assert list(longer["variants"]) == ["enc"]  # only the recipe's variants
    assert longer["variants"]["enc"]["signal"]["diff"] == -5 and longer["variants"]["enc"]["verdict"] == "wrong way"


def test_probe_without_a_treatment_has_no_teacher_and_averages_samples_per_prompt():
    rows, scores = _rows({"control": [0.0] * 8, "negative": [1.0] * 8})
    rows += [{**r, "sample": 1} for r in rows]
    scores += [0.0 if r["condition"] == "control" else 3.0 for r in rows[:16]]  # negative: mean of 1 and 3
    result = probe(rows, scores, "lower", ["negation", "enc"])
    assert result["teacher"] is None and "enc" not in result["variants"]
    assert result["conditions"]["negative"]["score"] == 2.0
    assert result["variants"]["negation"]["signal"]["diff"] == 2.0
    assert result["variants"]["negation"]["verdict"] == "carries"
    text = "\n".join(probe_lines(result, "words per answer"))
    assert "words per answer; lower is better" in text and "negation" in text and "carries" in text


def test_probe_cli_writes_probe_json_from_the_answers_a_run_reuses(tiny_model, tmp_path, capsys):
    rec = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model))
    run = tmp_path / "run"
    assert main(["probe", str(rec), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "probe.json").read_text())
    assert set(result["variants"]) == {"enc", "dis", "contrastive", "negation"}
    assert set(result["conditions"]) == {"control", "treatment", "negative"} and result["n_prompts"] == 6
    assert result["unit"] and "probe over 6 training prompts" in out
    answers = read_jsonl(run / "answers.jsonl")
    assert len(answers) == 6 * 3 * 2  # train prompts × conditions × samples
    assert main(["generate", str(run)]) == 0  # the answers are the run's: nothing new to generate
    assert "generated 0 new answers" in capsys.readouterr().err
