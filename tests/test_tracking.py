"""Experiment tracking: a tiny run reports to TensorBoard and a local MLflow store; bad tracker names are refused."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from conftest import tiny_recipe, write_recipe

from cfdpo import tracking
from cfdpo.cli import main
from cfdpo.recipe import parse_recipe
from cfdpo.spec import TrackingSpec

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

PROJECT = "cfdpo-test"


@pytest.fixture(scope="module")
def tracked_run(tiny_model, tmp_path_factory):
    """`cfdpo run` of a tiny recipe that reports to TensorBoard and to a file-store MLflow; (run dir, store URI, env after)."""
    base = tmp_path_factory.mktemp("tracked")
    store = f"file://{base / 'mlruns'}"
    recipe = tiny_recipe(tiny_model, variants=["negation"],
                         tracking={"report_to": ["tensorboard", "mlflow"], "project": PROJECT, "tracking_uri": store})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CFDPO_CACHE", str(base / "cache"))
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
        for name in tracking.ENVIRONMENT:
            mp.delenv(name, raising=False)
        assert main(["run", str(write_recipe(base / "r.yaml", recipe)), "--out", str(base / "run")]) == 0
        left = {name: os.environ[name] for name in tracking.ENVIRONMENT if name in os.environ}
    return base / "run", store, left


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_training_curve_and_cfdpo_figures(tracked_run):
    run, _, _ = tracked_run
    curves = _scalars(run / "tracking" / "tensorboard" / "negation")
    assert "train/loss" in curves and curves["train/loss"]
    figures = _scalars(run / "tracking" / "tensorboard" / "cfdpo")
    count = json.loads((run / "pairs" / "negation" / "stats.json").read_text())["count"]
    assert figures["pairs/negation/count"] == [count]
    assert "metrics/negation/nll_ratio" in figures and "stages/train/finished_after_s" in figures


def test_mlflow_run_holds_the_recipe_metrics_and_training_child(tracked_run, monkeypatch):
    import mlflow

    run, store, left = tracked_run
    assert left == {}  # the tracking settings were only in the environment while tracking
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    found = mlflow.search_runs(experiment_names=[PROJECT], output_format="list")
    parent_id = json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
    parent = next(r for r in found if r.info.run_id == parent_id)
    assert parent.info.run_name == "run"
    assert parent.data.params["dpo.beta"] == "0.1" and parent.data.params["variants"] == '["negation"]'
    count = json.loads((run / "pairs" / "negation" / "stats.json").read_text())["count"]
    assert parent.data.metrics["pairs/negation/count"] == count
    assert "metrics/base/control/score" in parent.data.metrics
    child = next(r for r in found if r.info.run_id != parent_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id and child.info.run_name == "run/negation"
    assert "loss" in child.data.metrics


def test_unknown_tracker_is_one_line_error(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "model", tracking={"report_to": ["tensorbord"]})
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tracking.report_to: 'tensorbord' is not a tracking integration" in err and "tensorboard, " in err
    assert not (tmp_path / "run").exists()


def test_tracker_without_its_package_names_the_package(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "comet_ml" else real(name, *a))
    recipe = tiny_recipe(tmp_path / "model", tracking={"report_to": ["comet_ml"]})
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'comet_ml' needs the comet-ml package: pip install comet-ml" in err


def test_tracking_at_its_default_leaves_the_recipe_digest_alone(tmp_path):
    plain = tiny_recipe(tmp_path / "model")
    assert "tracking" not in parse_recipe(plain).to_data()
    assert parse_recipe({**plain, "tracking": {"report_to": []}}).digest() == parse_recipe(plain).digest()
    tracked = parse_recipe({**plain, "tracking": {"report_to": ["tensorboard"]}})
    assert tracked.to_data()["tracking"]["report_to"] == ["tensorboard"]


def test_no_tracking_outside_training(tmp_path):
    assert tracking.trainer_args(tmp_path / ".enc-work") == {"report_to": []}
    with tracking.training(tmp_path, TrackingSpec()):
        assert tracking.trainer_args(tmp_path / ".enc-work") == {"report_to": []}


def test_run_scalars_read_what_is_there(tmp_path):
    (tmp_path / "pairs" / "enc").mkdir(parents=True)
    (tmp_path / "pairs" / "enc" / "stats.json").write_text(json.dumps({"candidates": 12, "count": 9}))
    (tmp_path / "pairs" / "dis").mkdir()
    (tmp_path / "pairs" / "dis" / "stats.json").write_text("not json")
    (tmp_path / "manifest.json").write_text(json.dumps({
        "created": "2026-01-01T10:00:00+0000",
        "stages": {"generate": {"finished": "2026-01-01T10:01:30+0000"}, "pairs": {"finished": "garbled"}}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"conditions": ["control", "negative"], "models": {
        "base": {"control": {"score": 0.25}, "negative": {}, "nll_ratio": 1.0},
        "enc": {"control": {"score": 0.1}, "nll_ratio": None, "mcq_accuracy": 0.5, "capability": {"kl": 0.02},
                "conditions": {"negative@system": {"score": 0.4}, "in_scope:persona": {"n": 3}}},
        "broken": "not a mapping"}}))
    assert tracking.run_scalars(tmp_path) == {
        "pairs/enc/candidates": 12.0, "pairs/enc/count": 9.0, "stages/generate/finished_after_s": 90.0,
        "metrics/base/control/score": 0.25, "metrics/base/nll_ratio": 1.0, "metrics/enc/control/score": 0.1,
        "metrics/enc/mcq_accuracy": 0.5, "metrics/enc/kl": 0.02, "metrics/enc/negative_system/score": 0.4,
    }
    assert tracking.run_scalars(tmp_path / "nothing") == {}
