"""Prompt sets: builtin sets shipped in the package, or a user's JSONL / CSV / parquet file.

Every prompt gets a stable id; `split()` makes a deterministic train / eval split with no overlap,
`validation_split()` the validation prompts after the training ones, and `extra_held_out()` further
evaluation prompts after those (one seeded order: eval | train | validation | extra).
"""

from __future__ import annotations

import csv
import io
import json
import random
from importlib import resources
from pathlib import Path

from cfdpo.errors import CfdpoError

BUILTIN_SETS = ("general", "news", "french", "everyday")
MAX_PROMPT_CHARS = 20_000


def _builtin_path(name: str):
    return resources.files("cfdpo") / "data" / "prompts" / f"{name}.jsonl"


def _rows_from_jsonl(text: str, where: str) -> list[dict]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CfdpoError(f"{where}: line {i}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CfdpoError(f"{where}: line {i}: expected a JSON object with a prompt field")
        rows.append(row)
    return rows


def _rows_from_csv(text: str, where: str) -> list[dict]:
    try:
        return list(csv.DictReader(io.StringIO(text)))
    except csv.Error as e:
        raise CfdpoError(f"{where}: invalid CSV ({e})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CfdpoError(f"{path}: not valid UTF-8 (byte {e.start}); save the prompt file as UTF-8") from None


def load_prompts(source: str, column: str = "prompt") -> list[dict]:
    """Return [{'id', 'prompt', ...}] for a builtin set name or a file path."""
    if source in BUILTIN_SETS:
        where = f"builtin prompt set '{source}'"
        rows = _rows_from_jsonl(_builtin_path(source).read_text(encoding="utf-8"), where)
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise CfdpoError(
                f"prompts.source '{source}': not a builtin set ({', '.join(BUILTIN_SETS)}) and no such file"
            )
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = _rows_from_jsonl(_read_text(path), where)
        elif suffix == ".csv":
            rows = _rows_from_csv(_read_text(path), where)
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq

                rows = pq.read_table(path).to_pylist()
            except Exception as e:  # noqa: BLE001
                raise CfdpoError(f"{where}: cannot read parquet ({type(e).__name__})") from None
        else:
            raise CfdpoError(f"{where}: unsupported prompt file type '{suffix}'; expected .jsonl, .csv or .parquet")
    if not rows:
        raise CfdpoError(f"{where}: no prompts found; expected one prompt per row in a '{column}' field")
    out: list[dict] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, 1):
        if column not in row:
            raise CfdpoError(f"{where}: row {i} has no '{column}' field; expected a '{column}' column")
        prompt = row[column]
        if not isinstance(prompt, str):
            raise CfdpoError(f"{where}: row {i}: '{column}' is {type(prompt).__name__}; expected text")
        if not prompt.strip():
            raise CfdpoError(f"{where}: row {i}: '{column}' is empty; expected non-empty text")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise CfdpoError(f"{where}: row {i}: prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        key = prompt.strip()
        if key in seen:
            raise CfdpoError(f"{where}: row {i} repeats the prompt of row {seen[key]}; expected unique prompts")
        seen[key] = i
        pid = str(row.get("id") or f"p{i:05d}")
        out.append({**{k: v for k, v in row.items() if k != column}, "id": pid, "prompt": prompt.strip()})
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        raise CfdpoError(f"{where}: ids are not unique; expected one id per prompt")
    return out


def _shuffled(prompts: list[dict], seed: int) -> list[dict]:
    """The prompts in the seeded order every split cuts from (independent of the input order)."""
    order = sorted(prompts, key=lambda r: r["id"])
    random.Random(seed).shuffle(order)
    return order


def split(prompts: list[dict], train_size: int, eval_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic shuffle, then eval = first `eval_size`, train = next `train_size`; never overlapping."""
    if train_size + eval_size > len(prompts):
        raise CfdpoError(
            f"prompts: train_size + eval_size = {train_size + eval_size} but the set has only {len(prompts)} prompts"
        )
    order = _shuffled(prompts, seed)
    return order[eval_size : eval_size + train_size], order[:eval_size]


def validation_split(prompts: list[dict], train_size: int, eval_size: int, validation_size: int | None,
                     seed: int = 0) -> list[dict]:
    """The validation prompts: the `validation_size` after the training ones in `split`'s shuffle, so the
    train and eval splits are the same with or without them. None: up to `DEFAULT_VALIDATION_SIZE`, as
    many as the set has left (maybe none); a number the set cannot hold is an error."""
    from cfdpo.spec import DEFAULT_VALIDATION_SIZE

    start = eval_size + train_size
    if validation_size is None:
        validation_size = max(0, min(DEFAULT_VALIDATION_SIZE, len(prompts) - start))
    elif start + validation_size > len(prompts):
        raise CfdpoError(
            f"prompts.validation_size: train_size + eval_size + validation_size = {start + validation_size} but the "
            f"set has only {len(prompts)} prompts; expected at most {max(0, len(prompts) - start)}"
        )
    return _shuffled(prompts, seed)[start : start + validation_size]


def extra_held_out(prompts: list[dict], train_size: int, eval_size: int, validation_count: int, extra: int,
                   seed: int = 0) -> list[dict]:
    """`evaluation.extra_prompts`: the `extra` prompts after the eval, training and `validation_count`
    validation prompts in `split`'s shuffle, so a run's held-out set grows without its training split
    changing; more than the set has left is an error."""
    start = eval_size + train_size + validation_count
    if start + extra > len(prompts):
        raise CfdpoError(
            f"evaluation.extra_prompts: eval_size + train_size + {validation_count} validation prompts + extra_prompts "
            f"= {start + extra} but the set has only {len(prompts)} prompts; expected at most {max(0, len(prompts) - start)}"
        )
    return _shuffled(prompts, seed)[start : start + extra]


def scope_prompts(prompts: list[dict], held_out: set[str], size: int, where: str) -> list[dict]:
    """pairs.retain_prompts' prompts: the first `size` of `prompts` whose text is not in `held_out` (the
    prompts an evaluation in-scope context asks), their ids tagged `scope:` so they never meet a training
    prompt's id in answers.jsonl; fewer than `size` left is an error."""
    kept = [{**p, "id": f"scope:{p['id']}"} for p in prompts if p["prompt"].strip() not in held_out]
    if len(kept) < size:
        raise CfdpoError(f"pairs.retain_prompts: {where} has {len(kept)} prompts that no evaluation.in_scope context "
                         f"asks, fewer than size {size}; expected size at most {len(kept)}")
    return kept[:size]
