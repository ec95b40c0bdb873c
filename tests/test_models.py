"""Model identity by content: retrained weights of the same size are another model; hashes are cached."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

from cfdpo import models, runio
from cfdpo.errors import CfdpoError
from cfdpo.pipeline import open_run


@pytest.fixture
def model(tiny_model, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CFDPO_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The files whose content is read for their sha256."""
    seen = []
    real = runio.file_sha256
    monkeypatch.setattr(runio, "file_sha256", lambda path: seen.append(Path(path)) or real(path))
    return seen


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_same_size_weights_with_other_content_are_another_model(model, tmp_path):
    retrained = Path(shutil.copytree(model, tmp_path / "retrained" / "model"))
    flip_last_byte(retrained / "model.safetensors")  # a retrained checkpoint: same names, same sizes
    assert (retrained / "model.safetensors").stat().st_size == (model / "model.safetensors").stat().st_size
    first, second = models.model_id(str(model)), models.model_id(str(retrained))
    assert first != second
    assert first.startswith("model:") and len(first.split(":")[1]) == 16
    assert models.model_id(str(model)) == first


def test_chat_template_file_is_part_of_the_identity(model):
    before = models.model_id(str(model))
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("helpful", "useful"))
    assert models.model_id(str(model)) != before


def test_a_second_call_reads_the_cache(model, hashed):
    first = models.model_id(str(model))
    assert {p.name for p in hashed} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert (Path(os.environ["CFDPO_CACHE"]) / models.HASH_CACHE).is_file()
    hashed.clear()
    assert models.model_id(str(model)) == first
    assert hashed == []


def test_a_touched_file_is_hashed_again_and_keeps_its_id(model, hashed):
    first = models.model_id(str(model))
    hashed.clear()
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert models.model_id(str(model)) == first
    assert hashed == [weights]


def test_a_damaged_cache_is_ignored(model):
    first = models.model_id(str(model))
    (Path(os.environ["CFDPO_CACHE"]) / models.HASH_CACHE).write_text("{not json")
    assert models.model_id(str(model)) == first


def test_a_hub_id_is_its_own_identity():
    assert models.model_id("org/name") == "org/name" and models.model_sha256("org/name") is None


def test_manifest_records_the_content_hash_and_refuses_an_older_scheme(model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model))
    open_run(tmp_path / "run", recipe)
    path = tmp_path / "run" / "manifest.json"
    m = json.loads(path.read_text())
    assert m["inputs"]["model"]["sha256"] == models.model_sha256(str(model))
    assert m["inputs"]["model"]["id"] == f"model:{m['inputs']['model']['sha256'][:16]}"
    open_run(tmp_path / "run", recipe)  # unchanged model: reopened

    del m["inputs"]["model"]["sha256"]  # a manifest written by a cfdpo that hashed file sizes
    m["inputs"]["model"]["id"] = "model:0123456789abcdef"
    path.write_text(json.dumps(m))
    with pytest.raises(CfdpoError, match="made by an older cfdpo, which identified a model by its file sizes only"):
        open_run(tmp_path / "run", recipe)
