"""One writer per run directory: a second process is refused with the holder's pid; a killed holder frees it."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

from cfdpo import lock, pipeline
from cfdpo.errors import CfdpoError
from cfdpo.pipeline import open_run
from cfdpo.recipe import dump_recipe, load_recipe

HOLDER = """
import sys, time
from cfdpo.pipeline import open_run
run = open_run(sys.argv[1])
print("ready", flush=True)
time.sleep(600)
"""


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def is_locked(run_dir: Path) -> bool:
    """Whether anyone holds the flock (a second open file description conflicts even in the same process)."""
    fd = os.open(run_dir / lock.NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.fixture
def run_dir(tiny_model, tmp_path) -> Path:
    d = tmp_path / "run"
    open_run(d, write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model)))
    return d


def test_second_writer_gets_the_holders_pid_and_exit_2(run_dir):
    held = open_run(run_dir)  # this process writes into the run
    assert held.lock.held
    proc = subprocess.run([sys.executable, "-m", "cfdpo", "pairs", str(run_dir)], capture_output=True, text=True,
                          env=env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: {run_dir}: in use by pid {os.getpid()} (")
    assert lines[0].endswith("); wait for it to finish or stop it")
    assert not (run_dir / "pairs").exists()


def test_the_same_process_shares_its_lock_and_frees_it_with_the_last_run(run_dir):
    assert not is_locked(run_dir)  # the fixture's Run is gone
    first = open_run(run_dir)
    second = open_run(run_dir)  # reopening in the process that holds it is no conflict
    assert second.lock is first.lock and is_locked(run_dir)
    record = json.loads((run_dir / lock.NAME).read_text())
    assert record["pid"] == os.getpid() and record["command"]
    del first
    assert is_locked(run_dir)
    del second
    assert not is_locked(run_dir)  # no Run holds it any more


def test_other_ranks_get_a_placeholder_that_holds_nothing(run_dir):
    run = open_run(run_dir)
    copy = pickle.loads(pickle.dumps(run))  # what dist.on_main sends to the other ranks
    assert run.lock.held and not copy.lock.held
    with copy.lock:  # releasing the placeholder does not drop rank 0's lock
        pass
    assert is_locked(run_dir)


def test_a_killed_holder_leaves_the_lock_free(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(CfdpoError, match=rf"in use by pid {proc.pid} \(.*\); wait for it to finish or stop it"):
            lock.hold(run_dir)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not is_locked(run_dir)
    with lock.hold(run_dir):
        assert is_locked(run_dir)
    assert not is_locked(run_dir)


def test_a_run_made_by_another_process_meanwhile_is_checked_again(tiny_model, tmp_path, monkeypatch):
    """Two processes create the same new run: the second one, once it has the lock, checks what the first wrote."""
    a = write_recipe(tmp_path / "a.yaml", tiny_recipe(tiny_model))
    b = write_recipe(tmp_path / "b.yaml", tiny_recipe(tiny_model, variants=["negation"]))
    d = tmp_path / "run"
    real_hold = pipeline.hold

    def other_process_first(directory):
        if not (d / "recipe.yaml").exists():  # the other process made the run while this one was checking
            (d / "recipe.yaml").write_text(dump_recipe(load_recipe(a)))
        return real_hold(directory)

    monkeypatch.setattr(pipeline, "hold", other_process_first)
    with pytest.raises(CfdpoError, match="written by another recipe"):
        open_run(d, b)


def test_lock_file_that_is_a_link_is_refused(tmp_path):
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / lock.NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CfdpoError, match="is a link"):
        lock.hold(tmp_path)
    assert (tmp_path / "elsewhere").read_text() == ""
