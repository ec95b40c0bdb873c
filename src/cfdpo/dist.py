"""Several processes: rank, barriers, rank-0-only work, sharded generation files, accelerate configs.

Under `accelerate launch` or `torchrun` (env `WORLD_SIZE` > 1) accelerate's `PartialState` sets up
the process group (NCCL on GPUs, gloo on CPU). On one process every helper here is a no-op and
`on_main` just calls its function.

Shared outputs (recipe.yaml, pairs, adapters, metrics, report) are written by rank 0 only, inside
`on_main`; the other ranks wait and receive rank 0's result, or its error.
Generation is sharded: rank r of w answers every w-th conversation of the planned rows into
`answers.shards/rank{r}-of-{w}.jsonl`; rank 0 then merges all shards into `answers.jsonl`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cfdpo.errors import CfdpoError

T = TypeVar("T")
_main_only = False  # True while rank 0 runs an on_main function: nested on_main calls run directly

# distributed_type values `accelerate launch` accepts in a config file
DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU",
                     "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU", "XLA", "MEGATRON_LM")


class MainProcessError(CfdpoError):
    """Rank 0's error, re-raised on the other ranks (the CLI prints it once, on rank 0)."""


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group (once); a no-op on one process."""
    if world() == 1:
        return
    import torch
    import torch.distributed as tdist
    from accelerate import PartialState

    if not tdist.is_initialized():
        PartialState(cpu=not torch.cuda.is_available())


def finish(clean: bool) -> None:
    """Leave the process group before the process exits (a no-op where none was joined): a gloo group
    left to the interpreter's teardown can abort a rank after its work is done ("terminate called
    without an active exception", SIGABRT). `clean`: every rank got this far, so they first wait for
    each other, and no rank closes its connections while another still reads from them."""
    if world() == 1:
        return
    import torch.distributed as tdist

    if tdist.is_initialized():
        if clean:
            tdist.barrier()
        tdist.destroy_process_group()


def barrier() -> None:
    if world() > 1 and not _main_only:
        import torch.distributed as tdist

        init()
        tdist.barrier()


def device():
    """This process's device: `cuda:LOCAL_RANK` where there is a GPU, else the CPU."""
    import torch

    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only; every rank returns rank 0's result (picklable) or raises its error."""
    global _main_only
    if world() == 1 or _main_only:
        return fn()
    import torch.distributed as tdist

    init()
    tdist.barrier()  # every rank has finished what came before (e.g. its shard of answers)
    box: list[Any] = [None]
    if is_main():
        _main_only = True
        try:
            box[0] = ("ok", fn())
        except CfdpoError as e:
            box[0] = ("error", str(e))
        except BaseException as e:
            box[0] = ("error", f"rank 0 failed: {type(e).__name__}: {str(e)[:200]}")
            tdist.broadcast_object_list(box, src=0)
            raise
        finally:
            _main_only = False
    tdist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise (CfdpoError if is_main() else MainProcessError)(value)
    return value


def sharded_weights() -> bool:
    """True under DeepSpeed ZeRO-3 or FSDP (set by `accelerate launch`): no process holds the full weights."""
    env = os.environ
    zero3 = env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return zero3 or env.get("ACCELERATE_USE_FSDP", "").lower() == "true"


# --- sharded generation -------------------------------------------------------------------------

def shard_rows(rows: list[dict], r: int, w: int) -> list[dict]:
    """Rank r's share of the planned rows: every w-th conversation (all its samples), in planned order."""
    units: dict[str, int] = {}
    for row in rows:
        units.setdefault(json.dumps(row["messages"], sort_keys=True), len(units))
    return [row for row in rows if units[json.dumps(row["messages"], sort_keys=True)] % w == r]


def shard_dir(answers: Path) -> Path:
    return answers.with_name(answers.stem + ".shards")


def shard_path(answers: Path, r: int, w: int) -> Path:
    return shard_dir(answers) / f"rank{r}-of-{w}.jsonl"


def merge_shards(answers: Path, planned: list[dict]) -> int:
    """Append the planned rows found in any shard file and missing from `answers`, in planned order.

    Rows already in `answers` are kept as they are; shard files (of any world size, including a
    crashed run's, whose cut tail `JsonlLog` drops) are removed once merged. Running it again
    changes nothing. Returns how many rows were added.
    """
    from cfdpo.runio import JsonlLog

    log = JsonlLog(answers)  # a cut tail is ignored here and cut off by the append below
    d = shard_dir(answers)
    files = sorted(d.glob("rank*-of-*.jsonl")) if d.is_dir() else []
    found: dict[str, dict] = {}
    for f in files:
        for row in JsonlLog(f).rows:
            found.setdefault(row["key"], row)
    have = log.keys()
    new = [found[r["key"]] for r in planned if r["key"] in found and r["key"] not in have]
    log.append(new)
    for f in files:
        f.unlink()
    if d.is_dir() and not any(d.iterdir()):
        d.rmdir()
    return len(new)


# --- accelerate config files --------------------------------------------------------------------

def config_roots() -> list[Path]:
    from importlib import resources

    return [Path(__file__).resolve().parents[2] / "configs" / "accelerate",
            Path(str(resources.files("cfdpo") / "data" / "accelerate"))]


def builtin_configs() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for root in config_roots():
        if root.is_dir():
            for p in sorted(root.glob("*.yaml")):
                found.setdefault(p.stem, p)
    return found


def accelerate_config(value: str) -> tuple[Path, dict]:
    """Resolve a shipped config name (ddp, zero2, zero3, fsdp) or a file, and check it: (path, fields)."""
    import yaml

    p = Path(value)
    if not p.is_file() and not value.endswith((".yaml", ".yml")) and os.sep not in value:
        known = builtin_configs()
        if value not in known:
            raise CfdpoError(f"accelerate config '{value}': no such file or shipped config; shipped: {', '.join(known) or 'none'}")
        p = known[value]
    if not p.is_file():
        raise CfdpoError(f"{p}: accelerate config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CfdpoError(f"{p}: invalid YAML ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CfdpoError(f"{p}: expected a mapping of accelerate settings")
    kind = data.get("distributed_type")
    if kind not in DISTRIBUTED_TYPES:
        raise CfdpoError(f"{p}: distributed_type: expected one of {', '.join(DISTRIBUTED_TYPES)}, got {kind!r}")
    n = data.get("num_processes", 1)
    if not isinstance(n, int) or n < 1:
        raise CfdpoError(f"{p}: num_processes: expected a positive integer, got {n!r}")
    if kind == "DEEPSPEED" and (data.get("deepspeed_config") or {}).get("zero_stage") not in (0, 1, 2, 3):
        raise CfdpoError(f"{p}: deepspeed_config.zero_stage: expected 0, 1, 2 or 3")
    if kind == "FSDP" and not isinstance(data.get("fsdp_config"), dict):
        raise CfdpoError(f"{p}: fsdp_config: expected a mapping of FSDP settings")
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        load_config_from_file(str(p))  # what `accelerate launch` itself reads: catches unknown keys
    except (ValueError, TypeError) as e:
        raise CfdpoError(f"{p}: not an accelerate config ({str(e).splitlines()[0][:200]})") from None
    return p, data
