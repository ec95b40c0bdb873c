"""Failures of the machine, not of the input: one line naming the problem, exit 1, the traceback in
RUN_DIR/logs/, and every file that was there before left byte for byte as it was."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

import pytest
from conftest import read_jsonl, tiny_recipe, write_recipe

import cfdpo.generate
from cfdpo import runio
from cfdpo.cli import main


def small_recipe(model: Path) -> dict:
    return tiny_recipe(model, prompts={"source": "general", "train_size": 2, "eval_size": 1, "seed": 1},
                       generation={"samples": 2, "max_new_tokens": 4, "temperature": 0.8, "batch_size": 8},
                       variants=["negation"])


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "logs" not in p.parts}


def one_line(capsys) -> str:
    """The one line on stderr (stdout may show the stage's progress bar)."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def saved_traceback(line: str, kind: str) -> Path:
    log = Path(re.search(r"\(traceback: (\S+)\)$", line).group(1))
    assert log.is_file() and "Traceback (most recent call last)" in log.read_text() and kind in log.read_text()
    return log


@pytest.fixture
def half_done(tiny_model, tmp_path) -> Path:
    """A run directory whose generation stopped half way (answers.jsonl has the first half of the rows)."""
    run = tmp_path / "run"
    assert main(["generate", str(run), "--recipe", str(write_recipe(tmp_path / "r.yaml", small_recipe(tiny_model)))]) == 0
    lines = (run / "answers.jsonl").read_bytes().splitlines(keepends=True)
    (run / "answers.jsonl").write_bytes(b"".join(lines[: len(lines) // 2]))
    return run


def test_disk_full_is_an_environment_error_and_damages_nothing(half_done, monkeypatch, capsys):
    before = files(half_done)
    real_write = os.write

    def full_disk(fd, data):  # the disk fills up half way through the next rows
        if os.readlink(f"/proc/self/fd/{fd}").endswith("answers.jsonl"):
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(runio.os, "write", full_disk)
    capsys.readouterr()
    assert main(["generate", str(half_done)]) == 1
    line = one_line(capsys)
    assert line.startswith(f"error: disk full while writing {half_done / 'answers.jsonl'}: free space and rerun")
    log = saved_traceback(line, "No space left on device")
    assert log.parent == half_done / "logs" and log.name.endswith("-generate.log")
    assert files(half_done) == before  # the half-written rows were taken back

    monkeypatch.undo()  # space is free again: the same command resumes
    assert main(["generate", str(half_done)]) == 0
    assert len(read_jsonl(half_done / "answers.jsonl")) == 2 * 2 * 2


@pytest.mark.parametrize("error,fragment,kind", [
    (MemoryError(), "error: out of memory: free memory or lower the batch sizes", "MemoryError"),
    (PermissionError(errno.EACCES, "Permission denied", "adapters/x"), "error: permission denied on adapters/x", "PermissionError"),
    (OSError(errno.EIO, "Input/output error"), "error: Input/output error: a problem of this machine", "OSError"),
    (RuntimeError("boom"), "error: unexpected RuntimeError: boom; this is a bug in cfdpo or a problem of this machine",
     "RuntimeError: boom"),
])
def test_other_environment_errors_exit_1_with_a_saved_traceback(half_done, monkeypatch, capsys, error, fragment, kind):
    before = files(half_done)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(cfdpo.generate, "run_generation", fail)
    capsys.readouterr()
    assert main(["generate", str(half_done)]) == 1
    line = one_line(capsys)
    assert line.startswith(fragment), line
    assert saved_traceback(line, kind).parent == half_done / "logs"
    assert files(half_done) == before


def test_without_a_run_directory_the_traceback_goes_to_a_temporary_file(tmp_path, monkeypatch, capsys):
    import tempfile

    import cfdpo.pipeline

    def fail(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(cfdpo.pipeline, "open_run", fail)
    assert main(["generate", str(tmp_path / "run")]) == 1
    log = saved_traceback(one_line(capsys), "MemoryError")
    assert log.parent == tmp_path and log.name.startswith("cfdpo-") and not (tmp_path / "run").exists()


def test_a_missing_file_the_user_named_stays_a_user_error(half_done, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "prompts.jsonl")

    monkeypatch.setattr(cfdpo.generate, "run_generation", fail)
    capsys.readouterr()
    assert main(["generate", str(half_done)]) == 2
    assert one_line(capsys) == "error: prompts.jsonl: No such file or directory"
    assert not (half_done / "logs").exists()
