"""Dtype and thread policy: which precision a stage runs in on this machine, and how many threads it uses.

Nothing here changes the process at import; the CLI calls `configure_openmp` before torch loads and the
pipeline stages call `set_threads`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cfdpo.errors import CfdpoError

if TYPE_CHECKING:
    from cfdpo.spec import DPOSpec

CPU_BF16_ENV = "CFDPO_CPU_BF16"  # 1: treat the CPU as multiplying bf16 natively, 0: as not, auto: detect
CPUINFO = Path("/proc/cpuinfo")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 weights pay.

    `CFDPO_CPU_BF16=1` / `0` overrides the detection (e.g. to run the bf16 defaults on a CPU that only
    emulates bf16); unset or `auto` reads /proc/cpuinfo."""
    choice = os.environ.get(CPU_BF16_ENV) or "auto"
    if choice not in ("0", "1", "auto"):
        raise CfdpoError(f"{CPU_BF16_ENV}={choice!r}: expected 0, 1 or auto")
    if choice != "auto":
        return choice == "1"
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def machine() -> dict:
    """What a run was made on, for its manifest: the CPU's model name, whether it is taken as multiplying
    bf16 natively (`cpu_has_bf16`, after `CFDPO_CPU_BF16`), and the CUDA device's name (None without one)."""
    import torch

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in CPUINFO.read_text().splitlines()
                    if line.startswith("model name")), None)
    except OSError:
        cpu = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_bf16": cpu_has_bf16(), "gpu": gpu}


def resolve_dtype(dtype: str, purpose: str = "generate") -> str:
    """`auto`: bf16 (fp16 without bf16) on a GPU; on a CPU bf16 for sampling answers where the CPU has
    native bf16 (decoding is bound by reading the weights, which bf16 halves) and float32 for
    evaluation, whose NLL and multiple-choice log-probs compare small differences between models."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if purpose == "generate" and cpu_has_bf16() else "float32"


def bf16_supported() -> bool:
    """Whether bf16 mixed precision pays for training: on a CUDA GPU with bf16 and on a CPU with native
    bf16 (AVX512-BF16 / AMX), where bf16 matmuls outrun fp32 ones (bench/results)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def train_dtype(spec: DPOSpec) -> str:
    """The frozen base's weights: bf16 when training in bf16 (PEFT keeps the adapter in fp32), which
    saves the per-step cast of every weight that autocast does on an fp32 base; else fp32."""
    bf16 = bf16_supported() if spec.bf16 is None else spec.bf16
    return "bfloat16" if bf16 else "float32"


def configure_openmp() -> None:
    """OpenMP threads that sleep instead of spinning while they wait (`OMP_WAIT_POLICY=PASSIVE`), unless
    the user chose a policy: on cores that are shared (laptops, CI, several jobs) spinning threads starve
    each other. OpenMP reads the variable once, when torch loads, so call this before importing torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (a container's or taskset's share) where the
    OS reports one, else every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads() -> None:
    """torch's intra-op threads: an equal share of the usable CPUs for each process on this node."""
    import torch

    n = max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
