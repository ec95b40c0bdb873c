"""`generation.backend: vllm` on a machine without vLLM or without a GPU: one clear line, exit 2, nothing written."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import tiny_recipe, write_recipe

from cfdpo.cli import main


def _vllm_usable() -> bool:
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.skipif(_vllm_usable(), reason="vLLM and a GPU are here: the backend would run")
def test_vllm_backend_without_gpu_fails_with_one_line(tiny_model, tmp_path, capsys):
    rec = tiny_recipe(tiny_model)
    rec["generation"] = {**rec["generation"], "backend": "vllm"}
    run = tmp_path / "run"
    assert main(["generate", str(run), "--recipe", str(write_recipe(tmp_path / "r.yaml", rec))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generation.backend 'vllm'" in err[0], err
    assert ("not installed" in err[0]) or ("no CUDA GPU" in err[0])
    assert "Traceback" not in err[0]
    assert not (run / "answers.jsonl").exists() or (run / "answers.jsonl").read_text() == ""
