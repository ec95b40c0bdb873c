"""An adapter is reused only when what it was trained from is unchanged (pairs, model, dpo settings,
kind, cfdpo version), for the pipeline's adapters and the benchmark's multi adapter alike; and its
hash in evaluation keys does not depend on the order PEFT wrote `target_modules` in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import cfdpo.train as T
from cfdpo.spec import DPOSpec


def conv(text, role="user"):
    return [{"role": role, "content": text}]


@pytest.fixture
def pairs():
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [conv(f"Question {i}?") for i in range(2)],
        "chosen": [conv(f"Plain answer {i}.", "assistant") for i in range(2)],
        "rejected": [conv(f"Arr matey ye answer {i}!", "assistant") for i in range(2)],
        "prompt_id": ["p0", "p1"], "sample": [0, 0], "chosen_key": ["c0", "c1"], "rejected_key": ["r0", "r1"],
    })


@pytest.fixture
def trainings(monkeypatch):
    """How many times a model was loaded for training."""
    loads = []
    real = T.last_checkpoint
    monkeypatch.setattr(T, "last_checkpoint", lambda work: loads.append(work) or real(work))
    return loads


SPEC = DPOSpec(batch_size=2, save_steps=10, max_length=64, lora_r=2, lora_alpha=4)


def test_changed_dpo_settings_retrain_and_an_unchanged_recipe_does_not(tiny_model, tmp_path, pairs, trainings):
    out = tmp_path / "adapters" / "enc"
    T.train_dpo(str(tiny_model), pairs, SPEC, out)
    identity = json.loads((out / T.IDENTITY).read_text())
    assert identity == T.adapter_identity("dpo", str(tiny_model), SPEC, T.pairs_fingerprint(pairs))
    assert identity["dpo"]["learning_rate"] == SPEC.learning_rate and identity["model"].startswith("model:")
    T.train_dpo(str(tiny_model), pairs, SPEC, out)
    assert len(trainings) == 1
    faster = SPEC.model_copy(update={"learning_rate": SPEC.learning_rate * 2})
    T.train_dpo(str(tiny_model), pairs, faster, out)
    assert len(trainings) == 2
    assert json.loads((out / T.IDENTITY).read_text())["dpo"]["learning_rate"] == faster.learning_rate


def test_identity_covers_model_kind_and_version(tiny_model, tmp_path, pairs, monkeypatch):
    out = tmp_path / "enc"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"w")
    identity = T.adapter_identity("dpo", str(tiny_model), SPEC, "f" * 64)
    (out / T.IDENTITY).write_text(json.dumps(identity))
    assert T.adapter_is_current(out, identity, merge=False)
    for field, other in [("model", "other:0123"), ("kind", "sft"), ("pairs_sha256", "e" * 64), ("cfdpo", "9.9")]:
        assert not T.adapter_is_current(out, {**identity, field: other}, merge=False), field
    monkeypatch.setattr("cfdpo.__version__", "9.9")
    assert T.adapter_identity("dpo", str(tiny_model), SPEC, "f" * 64)["cfdpo"] == "9.9"


def test_multi_adapter_follows_the_same_rule(tiny_model, tmp_path, pairs, trainings):
    from cfdpo.benchmark.runner import same_adapter, train_multi
    from cfdpo.pairs import write_pairs

    runs = {}
    for name in ("a", "b"):
        d = tmp_path / name
        write_pairs(pairs.to_list(), d / "pairs" / "enc", {"count": len(pairs)})
        runs[name] = SimpleNamespace(dir=d, model_path=str(tiny_model), recipe=SimpleNamespace(dpo=SPEC))
    plan = SimpleNamespace(multi=[("a", "enc"), ("b", "enc")], out=tmp_path / "bench")
    adapter = train_multi(plan, runs, 0)
    copy = tmp_path / "copy"
    shutil.copytree(adapter, copy)
    assert same_adapter(adapter, copy) and not same_adapter(adapter, tmp_path / "none")
    train_multi(plan, runs, 0)
    assert len(trainings) == 1
    runs["b"].recipe = SimpleNamespace(dpo=SPEC.model_copy(update={"learning_rate": SPEC.learning_rate / 2}))
    train_multi(plan, runs, 0)  # the lowest learning rate of the two changed
    assert len(trainings) == 2 and not same_adapter(adapter, copy)


def _adapter(d: Path, targets: list[str], weights: bytes) -> Path:
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": targets, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(weights)
    return d


def test_adapter_hash_is_stable_under_reordered_target_modules(tmp_path):
    from cfdpo.evaluate import adapter_hash

    one = adapter_hash(_adapter(tmp_path / "one", ["q_proj", "v_proj"], b"weights"))
    assert adapter_hash(_adapter(tmp_path / "two", ["v_proj", "q_proj"], b"weights")) == one
    assert adapter_hash(_adapter(tmp_path / "three", ["v_proj", "q_proj"], b"other")) != one
    assert adapter_hash(_adapter(tmp_path / "four", ["q_proj", "k_proj"], b"weights")) != one


def test_a_rerun_removes_temporary_folders_a_killed_training_left(tiny_model, tmp_path, pairs):
    out = tmp_path / "adapters" / "enc"
    out.parent.mkdir(parents=True)
    killed = out.parent / ".enc-k1ll3d_x"  # the name tempfile.mkdtemp gives a training's temporary folder
    (killed / "adapter").mkdir(parents=True)
    other = out.parent / ".dis-k1ll3d_x"  # another variant's: not ours to remove
    other.mkdir()
    T.train_dpo(str(tiny_model), pairs, SPEC, out)
    assert not killed.exists() and other.is_dir()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".enc-")] == []
