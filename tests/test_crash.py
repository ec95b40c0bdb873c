"""Crash safety: `cfdpo run` killed with SIGKILL at random points resumes to the same result.

The kill test runs the real CLI in a subprocess on the tiny model and kills it at least 20 times:
some kills at a random moment of the start-up, most 0-2 s after the process was seen
writing something (an answer row, a pairs dataset, a checkpoint every training
step, evaluation rows, the report), so the kills land inside the writes and every attempt
makes progress. It checks the run directory after every kill, then lets a rerun finish and checks the end
state: the planned answer keys all there exactly once, every line whole JSON, pairs loadable and
built from the final answers, adapters trained on those pairs, no checkpoint directories left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

KILLS = 20
DEADLINE_S = 420  # a bound on the whole kill loop; on this project's 2-core box it takes about 2-3 minutes


def crash_recipe(model: Path) -> dict:
    return tiny_recipe(
        model,
        prompts={"source": "general", "train_size": 3, "eval_size": 2, "seed": 1},
        generation={"samples": 2, "max_new_tokens": 6, "temperature": 0.8, "batch_size": 4},
        variants=["enc", "negation"],
        dpo={"epochs": 1, "batch_size": 2, "max_length": 128, "lora_r": 4, "lora_alpha": 8, "save_steps": 1},
        evaluation={"max_new_tokens": 4, "batch_size": 4, "samples": 1},
    )


def cli(recipe: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cfdpo", "run", str(recipe), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )


def planned_keys(recipe: Path, out: Path) -> set[str]:
    """The answer keys an uninterrupted run produces (planning is deterministic and needs no model)."""
    from cfdpo.generate import GenParams, plan_rows
    from cfdpo.models import model_id
    from cfdpo.pipeline import Run
    from cfdpo.recipe import load_recipe

    r = load_recipe(recipe)
    run = Run(out, r)
    train, _ = run.split()
    g = r.generation
    rows = plan_rows(train, r.needed_conditions(), r.behaviour, g.samples, model_id(run.model_path),
                     GenParams(g.max_new_tokens, g.temperature, g.top_p), g.seed)
    return {row["key"] for row in rows}


def snapshot(out: Path) -> list[tuple[str, int]]:
    """What the run has written so far (the manifest's stage notes do not count as progress)."""
    found = []
    # os.walk, not Path.rglob: the run renames and removes temporary directories while we look, and
    # rglob raises FileNotFoundError for a directory that vanishes mid-walk; os.walk skips it
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            if name.startswith((".manifest.json", "manifest.json", "cache-", "tmp")):
                continue  # stage notes and the trainer's tokenisation cache beside the pairs are not progress
            p = Path(root, name)
            try:
                found.append((str(p.relative_to(out)), p.stat().st_size))
            except OSError:  # removed while we looked
                pass
    return sorted(found)


def stage_of(out: Path) -> str:
    if (out / "report.html").exists():
        return "report"
    if (out / "eval").exists():
        return "evaluate"
    if (out / "adapters").exists():
        return "train"
    if (out / "pairs").exists():
        return "pairs"
    if (out / "answers.jsonl").exists():
        return "generate"
    return "startup"


def check_answers(path: Path, keys: set[str], complete: bool) -> list[dict]:
    """No duplicate keys; every complete line is a JSON row; only the very last line may be cut short."""
    from cfdpo.runio import JsonlLog

    if not path.exists():
        assert not complete, f"{path} missing"
        return []
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" when the file ends in a newline
    rows = [json.loads(line) for line in lines]
    if complete:
        assert tail == b"", "a finished run left a partial line"
    seen = [r["key"] for r in rows]
    assert len(seen) == len(set(seen)), "duplicate rows in answers.jsonl"
    assert set(seen) <= keys
    assert [r["key"] for r in JsonlLog(path).rows] == seen  # the tail repair keeps every whole row
    if complete:
        assert set(seen) == keys
    return rows


def check_pairs(out: Path, rows: list[dict], variants: list[str], complete: bool) -> None:
    from cfdpo.pairs import build_pairs, load_pairs

    for v in variants:
        d = out / "pairs" / v
        if not complete and not d.exists():
            continue
        ds = load_pairs(d)
        stats = json.loads((d / "stats.json").read_text())
        assert stats["count"] == len(ds)
        if complete:
            expected = build_pairs(rows, v)
            assert len(ds) == len(expected)
            assert sorted(ds["chosen_key"]) == sorted(p["chosen_key"] for p in expected)


def test_sigkill_at_random_points_then_resume(tiny_model, tmp_path):
    from cfdpo.pairs import load_pairs
    from cfdpo.train import pairs_fingerprint

    recipe = write_recipe(tmp_path / "crash.yaml", crash_recipe(tiny_model))
    rng = random.Random(int(os.environ.get("CFDPO_CRASH_SEED", "5")))
    start = time.monotonic()
    kills: list[str] = []
    cycle, finished_cycles = 0, 0
    out = tmp_path / f"run{cycle}"
    keys = planned_keys(recipe, out)
    variants = ["enc", "negation"]

    while len(kills) < KILLS:
        assert time.monotonic() - start < DEADLINE_S, f"only {len(kills)} kills in {DEADLINE_S}s"
        before = snapshot(out)
        proc = cli(recipe, out)
        if rng.random() < 0.2:  # anywhere in the start-up
            time.sleep(rng.uniform(0.2, 4.0))
        else:  # just after it was seen writing
            while proc.poll() is None and snapshot(out) == before:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is None:
            stage = stage_of(out)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append(stage)
            rows = check_answers(out / "answers.jsonl", keys, complete=False)
            check_pairs(out, rows, variants, complete=False)
            continue
        err = proc.stderr.read().decode(errors="replace")  # it finished before the kill
        assert proc.returncode == 0, err
        finished_cycles += 1
        cycle += 1  # this directory is done; kill the next one from the start
        out = tmp_path / f"run{cycle}"

    # let the last (interrupted) directory run to completion
    proc = cli(recipe, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode(errors="replace")
    print(f"kills by stage: {kills}; runs finished between kills: {finished_cycles}")

    for d in [tmp_path / f"run{i}" for i in range(cycle + 1)]:
        rows = check_answers(d / "answers.jsonl", keys, complete=True)
        check_pairs(d, rows, variants, complete=True)
        for v in variants:
            log = json.loads((d / "adapters" / v / "train_log.json").read_text())
            assert log["pairs_sha256"] == pairs_fingerprint(load_pairs(d / "pairs" / v))
            steps = [e["step"] for e in log["log_history"] if "loss" in e]
            assert steps == sorted(set(steps)), "a resumed training logged a step twice"
            assert not (d / "adapters" / f".{v}-work").exists()
        assert (d / "report.html").is_file() and json.loads((d / "metrics.json").read_text())["models"]
        check_answers(d / "eval" / "answers.jsonl", {r["key"] for r in map(json.loads, (d / "eval" / "answers.jsonl")
                                                                          .read_text().splitlines())}, complete=True)
    assert len(kills) >= KILLS


def test_training_resumes_from_the_last_checkpoint(tiny_model, tmp_path, monkeypatch):
    """A training killed after step 2 restarts from checkpoint-2 (not from scratch) and logs every step once."""
    from datasets import Dataset
    from transformers import TrainerCallback

    import cfdpo.train as T
    from cfdpo.spec import DPOSpec

    def conv(text, role="user"):
        return [{"role": role, "content": text}]

    ds = Dataset.from_dict({
        "prompt": [conv(f"Question {i}?") for i in range(5)],
        "chosen": [conv(f"Plain answer {i}.", "assistant") for i in range(5)],
        "rejected": [conv(f"Arr matey ye answer {i}!", "assistant") for i in range(5)],
    })
    spec = DPOSpec(batch_size=1, save_steps=1, max_length=64, lora_r=4, lora_alpha=8)
    out = tmp_path / "adapters" / "enc"

    class Crash(Exception):
        pass

    class Kill(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:  # two steps done: checkpoints 1 and 2 are on disk
                raise Crash

    quiet = T._quiet
    monkeypatch.setattr(T, "_quiet", lambda trainer, *a: (quiet(trainer, *a), trainer.add_callback(Kill())))
    with pytest.raises(Crash):
        T.train_dpo(str(tiny_model), ds, spec, out)
    work = out.with_name(".enc-work")
    assert T.last_checkpoint(work).endswith("checkpoint-2")
    # a kill in the middle of the next save leaves a checkpoint without trainer_state.json: skipped
    (work / "checkpoint-3").mkdir()
    (work / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"")
    assert T.last_checkpoint(work).endswith("checkpoint-2")

    monkeypatch.setattr(T, "_quiet", quiet)
    resumed_from = []
    last = T.last_checkpoint
    monkeypatch.setattr(T, "last_checkpoint", lambda w: resumed_from.append(last(w)) or resumed_from[-1])
    T.train_dpo(str(tiny_model), ds, spec, out)
    assert resumed_from and resumed_from[0].endswith("checkpoint-2")
    log = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in log["log_history"] if "loss" in e] == [1, 2, 3, 4, 5]
    assert not work.exists() and not (out / "training_args.bin").exists()
    # the same pairs again: the adapter is current, nothing is trained
    resumed_from.clear()
    T.train_dpo(str(tiny_model), ds, spec, out)
    assert resumed_from == []
