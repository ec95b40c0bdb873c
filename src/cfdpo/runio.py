"""Crash-safe file I/O for run directories.

- `write_atomic` / `write_json`: temporary file in the same directory, fsync, rename.
- `JsonlLog`: append-only JSONL; an incomplete or corrupt last line (a killed writer) is ignored
  when read and cut off before the next append, so every row that is there was written whole;
  rows of older runs are read in the current field names (`read_row`).
- `replace_dir`: swap a finished directory (written aside) into place; `recover_dir` undoes a
  swap that a kill cut in half.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cfdpo.errors import CfdpoError


def write_atomic(path: str | Path, data: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _mode(path))  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise CfdpoError(f"{p}: not found; run the stage that writes it first")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CfdpoError(f"{p}: not valid JSON ({e.__class__.__name__})") from None


def read_row(row: dict) -> dict:
    """An answer row in the current field names: runs written before `condition` (control /
    treatment / negative) was named so called it `variant`. The key, and so the cache, is unchanged."""
    if "variant" in row and "condition" not in row:
        return {("condition" if name == "variant" else name): value for name, value in row.items()}
    return row


class JsonlLog:
    """Append-only JSONL file of dict rows keyed by `key`.

    Opening only reads: an unterminated last line (a write that was cut short, or one still under
    way in another process) is ignored, and the file is left as it is. The first `append` cuts
    that tail off before writing, so a reader never changes the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self._repaired = False
        if self.path.exists():
            self._load()

    def _load(self) -> tuple[int, int]:
        """Read the whole rows into `self.rows`; returns where they end and the file's length."""
        raw = self.path.read_bytes()
        good_end = 0
        pos = 0
        seen: set[str] = set()
        rows = []
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            if nl < 0:
                break  # unterminated tail: a write that was cut short
            line = raw[pos:nl]
            try:
                row = json.loads(line.decode("utf-8"))
                if not isinstance(row, dict) or "key" not in row:
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                break
            if row["key"] not in seen:
                seen.add(row["key"])
                rows.append(read_row(row))
            pos = good_end = nl + 1
        if raw[good_end:].count(b"\n") > 1:
            raise CfdpoError(
                f"{self.path}: corrupt row in the middle of the file (byte {good_end}); expected one JSON object per line"
            )
        self.rows = rows
        return good_end, len(raw)

    def _repair(self) -> None:
        """Before the first write: cut off an incomplete or corrupt last line (the file is read again)."""
        if self.path.exists():
            good_end, size = self._load()
            if good_end < size:
                with open(self.path, "r+b") as f:
                    f.truncate(good_end)
                    f.flush()
                    os.fsync(f.fileno())
        self._repaired = True

    def keys(self) -> set[str]:
        return {r["key"] for r in self.rows}

    def append(self, rows: list[dict]) -> None:
        """Append whole rows; a write that fails (a full disk) is undone, leaving the rows that were there."""
        if not rows:
            return
        if not self._repaired:
            self._repair()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                unwritten = memoryview(data)
                while unwritten:
                    unwritten = unwritten[os.write(fd, unwritten):]
                os.fsync(fd)
            except OSError as e:
                os.ftruncate(fd, start)
                e.filename = e.filename or str(self.path)  # os.write's errors name no file
                raise
        finally:
            os.close(fd)
        self.rows.extend(rows)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished directory `src` to `dst`, replacing `dst` if it is there.

    The old copy is first renamed to `.<name>.old`; if a kill falls between the two renames,
    `recover_dir(dst)` puts the old copy back, so `dst` is always either the old or the new one.
    """
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    recover_dir(dst)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: str | Path) -> None:
    """Undo a `replace_dir` that was killed between its two renames."""
    dst = Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if old.is_dir():
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, dst)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_inside(root: str | Path) -> None:
    """Refuse a run directory holding links to places outside it (cfdpo would write through them)."""
    root = Path(root)
    if not root.is_dir():
        return
    real = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink() and not p.resolve().is_relative_to(real):
                raise CfdpoError(
                    f"{p}: is a link to {p.resolve()}, outside the run directory; expected plain files inside {root}"
                )
