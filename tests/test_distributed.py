"""Several processes: sharded generation and DDP training with 2 CPU processes (torchrun, gloo).

`accelerate launch --cpu` starts one process unless MPI is set up, so the test launches with
`torchrun --nproc_per_node 2 -m cfdpo ...`; cfdpo joins the group through accelerate's PartialState
either way, exactly as under `accelerate launch` on GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl, tiny_recipe, write_recipe

from cfdpo import dist
from cfdpo.cli import main
from cfdpo.runio import JsonlLog


def torchrun(*args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cfdpo", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(adapter: Path) -> list[float]:
    log = json.loads((adapter / "train_log.json").read_text())
    return [e["loss"] for e in log["log_history"] if "loss" in e]


def test_two_processes_generate_the_same_keys_and_train_the_same_loss_curve(tiny_model, tmp_path):
    """Sharded generation: the same answer keys as one process (answers differ: each rank samples
    with its own seed). DDP training on the same pairs: 1 process with batch 4 against 2 processes
    with batch 2 each. The global batch (4), the data order (one seeded permutation, batches dealt
    to the ranks in turn), the LoRA init (seeded) and the logged loss (averaged over ranks) are then
    the same, so the two curves differ only by float32 summation order (gradients all-reduced over
    two half batches instead of summed in one): observed < 1e-6 per step. Tolerance 1e-4 per
    step; batches of a different composition change the loss by > 1e-3 here, and the curve must
    move by more than 5e-3 so that the comparison means something.
    """
    base = tiny_recipe(tiny_model, variants=["negation"])
    # fp32: the comparison is about the distribution; bf16 rounding differs with how many pairs share a packed row
    # auto off: the comparison is of one fixed step schedule (validation-driven training picks its own)
    base["dpo"].update(epochs=2, learning_rate=0.005, bf16=False, auto=False)
    one = tmp_path / "one"
    assert main(["generate", str(one), "--recipe", str(write_recipe(tmp_path / "r4.yaml", base))]) == 0

    two = tmp_path / "two"
    shutil.copy(tmp_path / "r4.yaml", tmp_path / "gen.yaml")
    torchrun("generate", str(two), "--recipe", str(tmp_path / "gen.yaml"), cwd=tmp_path)
    rows1, rows2 = read_jsonl(one / "answers.jsonl"), read_jsonl(two / "answers.jsonl")
    keys1, keys2 = [r["key"] for r in rows1], [r["key"] for r in rows2]
    assert len(keys2) == len(set(keys2)) == len(keys1) == 6 * 2 * 2
    assert set(keys2) == set(keys1)
    assert not (two / "answers.shards").exists()
    before = (two / "answers.jsonl").read_bytes()
    assert main(["generate", str(two)]) == 0  # one process on the merged file: nothing to do
    assert (two / "answers.jsonl").read_bytes() == before

    # training on the same pairs: copy the one-process answers into a run with half the batch per rank
    assert main(["pairs", str(one)]) == 0
    assert main(["train", str(one)]) == 0
    half = {**base, "dpo": {**base["dpo"], "batch_size": 2}}
    run2 = tmp_path / "ddp"
    run2.mkdir()
    shutil.copy(one / "answers.jsonl", run2 / "answers.jsonl")
    torchrun("run", str(write_recipe(tmp_path / "r2.yaml", half)), "--out", str(run2), cwd=tmp_path)

    curve1, curve2 = losses(one / "adapters" / "negation"), losses(run2 / "adapters" / "negation")
    assert len(curve1) == len(curve2) == 6  # 12 pairs / 4 per step x 2 epochs
    assert max(curve1) - min(curve1) > 5e-3
    assert curve2 == pytest.approx(curve1, abs=1e-4)
    # rank 0 wrote every shared output once; no temporary directories left behind
    assert (run2 / "metrics.json").is_file() and (run2 / "report.md").is_file()
    assert sorted(p.name for p in (run2 / "adapters").iterdir()) == ["negation"]
    assert read_jsonl(run2 / "answers.jsonl") == rows1


def test_shards_partition_the_rows_and_merge_idempotently(tmp_path):
    rows = [{"key": f"k{p}-{s}", "messages": [{"role": "user", "content": f"p{p}"}], "sample": s}
            for p in range(5) for s in range(2)]
    shares = [dist.shard_rows(rows, r, 3) for r in range(3)]
    assert sorted(r["key"] for share in shares for r in share) == sorted(r["key"] for r in rows)
    for share in shares:  # a conversation's samples stay together
        convs = {r["messages"][0]["content"] for r in share}
        assert len(share) == 2 * len(convs)

    answers = tmp_path / "answers.jsonl"
    JsonlLog(answers).append([{**rows[3], "answer": "old"}])  # an existing row is kept as it is
    for r, share in enumerate(shares):
        JsonlLog(dist.shard_path(answers, r, 3)).append([{**x, "answer": f"r{r}"} for x in share])
    # rank 2 crashed mid-write: its last row is cut
    cut = dist.shard_path(answers, 2, 3)
    cut.write_bytes(cut.read_bytes()[:-10])
    added = dist.merge_shards(answers, rows)
    merged = read_jsonl(answers)
    assert merged[0]["answer"] == "old" and added == len(merged) - 1 == len(rows) - 2
    assert [r["key"] for r in merged[1:]] == [r["key"] for r in rows if r["key"] in {m["key"] for m in merged[1:]}]
    assert not dist.shard_dir(answers).exists()
    before = answers.read_bytes()
    assert dist.merge_shards(answers, rows) == 0 and answers.read_bytes() == before

    # the crashed rank reruns its share: only the lost row is answered, then merged
    done = JsonlLog(answers).keys()
    todo = [x for x in dist.shard_rows(rows, 2, 3) if x["key"] not in done]
    assert len(todo) == 1
    JsonlLog(dist.shard_path(answers, 2, 3)).append([{**todo[0], "answer": "again"}])
    assert dist.merge_shards(answers, rows) == 1
    assert sorted(r["key"] for r in read_jsonl(answers)) == sorted(r["key"] for r in rows)


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["mistral7b-names-enc", "mistral7b-pirate-negation"])
def test_paper_recipes_resolve(name):
    from cfdpo.models import resolve_model
    from cfdpo.prompts import load_prompts, split
    from cfdpo.recipe import load_recipe
    from cfdpo.scorers import make_scorer

    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert resolve_model(r.model) == "mistralai/Mistral-7B-Instruct-v0.2"
    scorer = make_scorer(r.behaviour.scorer.name, r.behaviour.scorer.params)
    prompts = load_prompts(r.prompts.source, r.prompts.column)
    train, held_out = split(prompts, r.prompts.train_size, r.prompts.eval_size, r.prompts.seed)
    assert len(train) == r.prompts.train_size and len(held_out) == r.prompts.eval_size
    for v in r.variants:
        needs = {"enc": ["treatment"], "dis": ["negative"], "contrastive": ["treatment", "negative"],
                 "negation": ["negative"]}[v]
        assert all(getattr(r.behaviour, f) for f in needs)
    assert r.behaviour.placement == "user_prefix" and r.behaviour.system_prompt is None  # no system role in Mistral
    assert r.dpo.bf16 and r.generation.dtype == "bfloat16"
    if name.endswith("names-enc"):
        assert r.prompts.source == "news" and scorer.name == "person_names"
        assert scorer.score_one("Mayor Elena Brooks said the plan would work.") > scorer.score_one("The council said the plan would work.")
    else:
        assert scorer.score_one("Arr, ahoy matey!") > scorer.score_one("Hello there.")


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED"),
                                       ("fsdp", "FSDP")])
def test_accelerate_configs_are_valid(name, kind):
    path, cfg = dist.accelerate_config(name)
    assert path == ROOT / "configs" / "accelerate" / f"{name}.yaml"
    assert yaml.safe_load(path.read_text())["distributed_type"] == kind == cfg["distributed_type"]
    assert cfg["num_processes"] == 8 and cfg["mixed_precision"] == "no"  # the recipe's dpo.bf16 decides
    if name.startswith("zero"):
        assert cfg["deepspeed_config"]["zero_stage"] == int(name[-1])
    if name == "fsdp":
        assert cfg["fsdp_config"]["fsdp_use_orig_params"] is True  # LoRA: frozen and trainable params mixed


@pytest.mark.parametrize("args,message", [
    (["launch", "nope", "run", "r.yaml", "--out", "x"], "no such file or shipped config"),
    (["launch", "missing.yaml", "run", "r.yaml", "--out", "x"], "accelerate config file not found"),
    (["launch", "bad.yaml", "run", "r.yaml", "--out", "x"], "distributed_type: expected one of"),
    (["launch", "ddp"], "give the cfdpo command to run"),
])
def test_launch_bad_input_is_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("distributed_type: MULTI_TPU\nnum_processes: 2\n")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("world, code, calls", [("2", 0, ["barrier", "destroy"]), ("2", 2, ["destroy"]), ("1", 0, [])])
def test_the_cli_leaves_the_process_group_before_exit(world, code, calls, monkeypatch):
    """A gloo group left to the interpreter's teardown once aborted rank 1 after `cfdpo train` had finished
    (SIGABRT, "terminate called without an active exception"): every command leaves it, after a barrier
    when it succeeded (no rank closes its connections while another still reads from them)."""
    import torch.distributed as tdist

    import cfdpo.cli as cli

    seen: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(cli, "_main", lambda argv: code)
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(tdist, "destroy_process_group", lambda: seen.append("destroy"))
    assert cli.main(["scorers"]) == code
    assert seen == calls
