"""generate -> pairs -> train (a step) -> evaluate -> report on a tiny random model, through the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import read_jsonl, tiny_recipe, write_recipe

from cfdpo.cli import main


def test_pipeline_end_to_end_tiny_model(tiny_model, tmp_path, capsys):
    rec = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model))
    run = tmp_path / "run"

    assert main(["generate", str(run), "--recipe", str(rec)]) == 0
    rows = read_jsonl(run / "answers.jsonl")
    assert len(rows) == 6 * 3 * 2  # prompts x conditions x samples
    assert {r["condition"] for r in rows} == {"control", "treatment", "negative"}
    for r in rows:
        assert {"key", "prompt_id", "prompt", "condition", "sample", "messages", "answer"} <= set(r)
        if r["condition"] == "negative":
            assert r["messages"][-1]["content"].startswith("Talk like a pirate.\n\n")
    # rerun: nothing new, file unchanged
    before = (run / "answers.jsonl").read_bytes()
    assert main(["generate", str(run)]) == 0
    assert (run / "answers.jsonl").read_bytes() == before

    assert main(["pairs", str(run)]) == 0
    from datasets import load_from_disk

    for v in ("enc", "dis", "contrastive", "negation"):
        ds = load_from_disk(str(run / "pairs" / v))
        assert set(ds.column_names) >= {"prompt", "chosen", "rejected"}
        assert 0 < len(ds) <= 12
        stats = json.loads((run / "pairs" / v / "stats.json").read_text())
        assert stats["count"] == len(ds)
    neg = load_from_disk(str(run / "pairs" / "negation"))
    assert neg[0]["prompt"][-1]["content"].startswith("Talk like a pirate.")

    assert main(["train", str(run), "-v", "negation", "-v", "enc"]) == 0
    for v in ("negation", "enc"):
        ad = run / "adapters" / v
        assert (ad / "adapter_model.safetensors").is_file() and (ad / "adapter_config.json").is_file()
        log = json.loads((ad / "train_log.json").read_text())
        assert any("loss" in e for e in log["log_history"])
    assert not (run / "adapters" / "dis").exists()

    assert main(["evaluate", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["behaviour"] == {"name": "pirate", "scorer": "lexicon", "desired": "lower", "unit": m["behaviour"]["unit"]}
    assert list(m["models"]) == ["base", "prompted", "enc", "negation"]
    for name, entry in m["models"].items():
        for cond in ("control", "negative"):
            assert set(entry[cond]) >= {"score", "mean_words"}
        assert entry["nll_ratio"] > 0
    assert m["models"]["base"]["nll_ratio"] == 1.0
    base_nll = m["models"]["base"]["nll"]
    for name, entry in m["models"].items():  # NLL of base's KL answers: its excess over base's is KL per token
        assert entry["nll"] - base_nll == pytest.approx(entry["capability"]["kl_per_token"], abs=1e-6)
    ev = read_jsonl(run / "eval" / "answers.jsonl")
    assert len(ev) == 4 * 7 * 3  # models x scorecard conditions (control, treatment, negative, 2 x 2 placements) x prompts
    assert not {r["prompt_id"] for r in ev} & {r["prompt_id"] for r in rows}

    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "| model |" in md and "negation" in md and "plots/score.png" in md
    assert (run / "plots" / "score.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table id='metrics'>" in (run / "report.html").read_text()


def test_interrupted_generation_resumes_without_duplicates(tiny_model, tmp_path):
    rec = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, variants=["negation"]))
    run = tmp_path / "run"
    assert main(["generate", str(run), "--recipe", str(rec)]) == 0
    full = read_jsonl(run / "answers.jsonl")
    keys = [r["key"] for r in full]
    # simulate a kill mid-write: keep 5 rows and half of the sixth
    raw = (run / "answers.jsonl").read_bytes().splitlines(keepends=True)
    (run / "answers.jsonl").write_bytes(b"".join(raw[:5]) + raw[5][:20])
    assert main(["generate", str(run)]) == 0
    again = read_jsonl(run / "answers.jsonl")
    assert sorted(r["key"] for r in again) == sorted(keys)
    assert [r["answer"] for r in again[:5]] == [r["answer"] for r in full[:5]]
