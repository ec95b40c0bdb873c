"""Safe loading and the run manifest: no pickle, no remote code unless asked, inputs pinned per run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

from cfdpo import manifest
from cfdpo.cli import main
from cfdpo.errors import CfdpoError
from cfdpo.pipeline import open_run

SRC = Path(__file__).resolve().parents[1] / "src" / "cfdpo"


def test_no_pickle_and_no_unasked_remote_code_in_the_source():
    bad = re.compile(r"import pickle|from pickle|torch\.load\(|weights_only\s*=\s*False|trust_remote_code\s*=\s*True"
                     r"|yaml\.load\((?![^)]*Loader=_Loader)|yaml\.unsafe_load|use_safetensors\s*=\s*False|dill|joblib\.load")
    hits = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if bad.search(line)]
    assert hits == []
    assert "use_safetensors=True" in (SRC / "models.py").read_text()


def test_manifest_records_what_the_run_was_made_from(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git checkout: no commit, no failure
    rec = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model))
    run = open_run(tmp_path / "run", rec)
    m = json.loads((run.dir / "manifest.json").read_text())
    assert m["recipe_sha256"] == manifest.build(run.recipe.model_copy(update={"trust_remote_code": False}),
                                                run.model_path)["recipe_sha256"]
    assert m["inputs"]["prompts"]["source"] == "general" and len(m["inputs"]["prompts"]["sha256"]) == 64
    assert m["inputs"]["model"]["id"].startswith("model:")
    assert m["seeds"] == {"prompts": 1, "generation": 0, "dpo": 0}
    assert set(m["packages"]) >= {"cfdpo", "torch", "transformers", "trl", "peft", "datasets"}
    assert all(m["packages"][k] for k in ("cfdpo", "torch", "transformers", "trl", "peft", "datasets"))
    assert m["git_commit"] is None
    manifest.record_stage(run.dir, "generate")
    assert "finished" in json.loads((run.dir / "manifest.json").read_text())["stages"]["generate"]
    repo = SRC.parents[1]
    if (repo / ".git").exists() and shutil.which("git"):
        assert re.fullmatch(r"[0-9a-f]{40}", manifest.git_commit(repo) or "")


def test_resumed_run_with_another_model_checkpoint_is_refused(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    rec = write_recipe(tmp_path / "r.yaml", tiny_recipe(model))
    open_run(tmp_path / "run", rec)
    before = (tmp_path / "run" / "manifest.json").read_bytes()
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (model / "config.json").write_text(json.dumps(cfg))  # same path, different checkpoint
    with pytest.raises(CfdpoError, match="the model changed since this run started"):
        open_run(tmp_path / "run", rec)
    assert main(["generate", str(tmp_path / "run")]) == 2
    assert "the model changed" in capsys.readouterr().err
    assert (tmp_path / "run" / "manifest.json").read_bytes() == before
