"""Crash safety: `cfdpo run` killed with SIGKILL at random points resumes to the same result.

The kill test runs the real CLI in a subprocess on the tiny model and kills it at least 20 times:
some kills at a random moment of the start-up, most 0-2 s after the process was seen
writing something (an answer row, a pairs dataset, a checkpoint every training
step, evaluation rows, the report), so the kills land inside the writes and every attempt
makes progress. Once a stage of a directory has had `STAGE_QUOTA` kills, an attempt waits for the
next stage's first write, so the kills reach evaluation too. It checks the run directory after
every kill, then lets a rerun finish and checks the end state: the planned answer keys all there
exactly once, every line whole JSON, pairs loadable and built from the final answers, adapters
trained on those pairs, no checkpoint directories left.
Each finished directory is then compared with the same recipe run once without a kill: the same
answer texts under the same keys, the same pairs, the same evaluation answers, and adapters within
`ADAPTER_TOLERANCE` (resumed training restores the optimizer, scheduler, RNG and data order from
the last checkpoint).

Its time is bounded by the number of attempts times a budget per attempt that grows with the time
the uninterrupted run took, so a slow or busy machine gets more time per attempt, not fewer kills.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

KILLS = 20
STAGE_QUOTA = KILLS // 4  # kills per stage of one directory; then an attempt waits for the next stage
MAX_ATTEMPTS = 3 * KILLS  # a run that finishes between kills is an attempt without a kill
ADAPTER_TOLERANCE = 1e-5  # max abs difference of a resumed adapter's weights from an uninterrupted one's


def crash_recipe(model: Path) -> dict:
    return tiny_recipe(
        model,
        prompts={"source": "general", "train_size": 3, "eval_size": 2, "seed": 1},
        generation={"samples": 2, "max_new_tokens": 6, "temperature": 0.8, "batch_size": 4},
        variants=["enc", "negation"],
        dpo={"epochs": 1, "batch_size": 2, "max_length": 128, "lora_r": 4, "lora_alpha": 8, "save_steps": 1,
             "auto": False},  # a fixed step schedule; resuming dpo.auto is tests/test_validation.py's
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


def adapter_max_diff(one: Path, other: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(one / "adapter_model.safetensors"), load_file(other / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def eval_texts(run_dir: Path) -> dict[tuple, str]:
    """Evaluation answers by (model, condition, prompt, sample): their keys hold the adapter's hash."""
    rows = map(json.loads, (run_dir / "eval" / "answers.jsonl").read_text().splitlines())
    return {(r.get("model_label"), r["condition"], r["prompt_id"], r["sample"]): r["answer"] for r in rows}


def compare_with_uninterrupted(d: Path, ref: Path, variants: list[str]) -> float:
    """The resumed run `d` against the uninterrupted `ref`; returns the adapters' largest weight difference."""
    from cfdpo.pairs import load_pairs

    answers = {r["key"]: r["answer"] for r in map(json.loads, (d / "answers.jsonl").read_text().splitlines())}
    expected = {r["key"]: r["answer"] for r in map(json.loads, (ref / "answers.jsonl").read_text().splitlines())}
    assert answers.keys() == expected.keys()
    assert [k for k in expected if answers[k] != expected[k]] == [], f"{d.name}: other answer texts than uninterrupted"
    for v in variants:
        assert load_pairs(d / "pairs" / v).to_list() == load_pairs(ref / "pairs" / v).to_list(), f"{d.name}: pairs {v}"
    assert eval_texts(d) == eval_texts(ref), f"{d.name}: other evaluation answers than uninterrupted"
    return max(adapter_max_diff(d / "adapters" / v, ref / "adapters" / v) for v in variants)


def test_sigkill_at_random_points_then_resume(tiny_model, tmp_path):
    from cfdpo.pairs import load_pairs
    from cfdpo.train import pairs_fingerprint

    recipe = write_recipe(tmp_path / "crash.yaml", crash_recipe(tiny_model))
    rng = random.Random(int(os.environ.get("CFDPO_CRASH_SEED", "5")))
    ref = tmp_path / "uninterrupted"
    start = time.monotonic()
    proc = cli(recipe, ref)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode(errors="replace")
    attempt_budget = max(120.0, 3 * (time.monotonic() - start))  # to make progress: start-up and a stage's first write
    kills: list[tuple[int, str]] = []  # (directory, stage) of each kill
    cycle, finished_cycles = 0, 0
    out = tmp_path / f"run{cycle}"
    keys = planned_keys(recipe, out)
    variants = ["enc", "negation"]

    for _ in range(MAX_ATTEMPTS):
        if len(kills) >= KILLS:
            break
        before = snapshot(out)
        proc = cli(recipe, out)
        attempt_start = time.monotonic()
        if rng.random() < 0.2:  # anywhere in the start-up
            time.sleep(rng.uniform(0.2, 4.0))
        else:  # just after it was seen writing, in a stage that has not had its share of kills
            while proc.poll() is None and (snapshot(out) == before
                                           or kills.count((cycle, stage_of(out))) >= STAGE_QUOTA):
                if time.monotonic() - attempt_start > attempt_budget:
                    os.killpg(proc.pid, signal.SIGKILL)
                    pytest.fail(f"an attempt wrote nothing in {attempt_budget:.0f}s (after {len(kills)} kills)")
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is None:
            stage = stage_of(out)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append((cycle, stage))
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
    print(f"kills by stage: {Counter(stage for _, stage in kills)}; runs finished between kills: {finished_cycles}")
    assert len(kills) >= KILLS, f"only {len(kills)} kills in {MAX_ATTEMPTS} attempts"

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
        check_answers(d / "eval" / "answers.jsonl", {r["key"] for r in map(json.loads, (ref / "eval" / "answers.jsonl")
                                                                          .read_text().splitlines())}, complete=True)
        diff = compare_with_uninterrupted(d, ref, variants)
        print(f"{d.name}: adapters differ from the uninterrupted run's by at most {diff:.3g}")
        assert diff <= ADAPTER_TOLERANCE


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
