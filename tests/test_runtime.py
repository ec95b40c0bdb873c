"""Dtype and thread policy: the CFDPO_CPU_BF16 override, the CPU dtype defaults, no side effects at import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfdpo import runtime
from cfdpo.errors import CfdpoError
from cfdpo.spec import DPOSpec

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """A CPU-only machine whose /proc/cpuinfo lists `flags` (no native bf16 unless a test writes it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    monkeypatch.delenv("CFDPO_CPU_BF16", raising=False)
    return cpuinfo


def dtypes() -> tuple[bool, str, str, str]:
    return (runtime.cpu_has_bf16(), runtime.resolve_dtype("auto"), runtime.resolve_dtype("auto", purpose="evaluate"),
            runtime.train_dtype(DPOSpec()))


@pytest.mark.parametrize("native", [False, True])
def test_auto_detects_native_bf16_from_cpuinfo(cpu, monkeypatch, native):
    if native:
        cpu.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    want = (True, "bfloat16", "float32", "bfloat16") if native else (False, "float32", "float32", "float32")
    assert dtypes() == want  # unset
    monkeypatch.setenv("CFDPO_CPU_BF16", "auto")
    assert dtypes() == want


def test_cpu_bf16_override(cpu, monkeypatch):
    monkeypatch.setenv("CFDPO_CPU_BF16", "1")  # a CPU that only emulates bf16 gets the bf16 defaults
    assert dtypes() == (True, "bfloat16", "float32", "bfloat16")
    cpu.write_text("flags\t\t: avx512_bf16 amx_bf16\n")
    monkeypatch.setenv("CFDPO_CPU_BF16", "0")  # a CPU with native bf16 gets the fp32 defaults
    assert dtypes() == (False, "float32", "float32", "float32")
    assert runtime.resolve_dtype("bfloat16") == "bfloat16"  # an explicit dtype stays
    assert runtime.train_dtype(DPOSpec(bf16=True)) == "bfloat16"


@pytest.mark.parametrize("value", ["yes", "true", "2"])
def test_bad_cpu_bf16_value_is_a_one_line_error(cpu, monkeypatch, value):
    monkeypatch.setenv("CFDPO_CPU_BF16", value)
    for call in (runtime.cpu_has_bf16, lambda: runtime.resolve_dtype("auto"), lambda: runtime.train_dtype(DPOSpec())):
        with pytest.raises(CfdpoError, match="CFDPO_CPU_BF16") as e:
            call()
        assert "\n" not in str(e.value) and "0, 1 or auto" in str(e.value)


def test_threads_are_a_share_of_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5, 7, 9, 11}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert runtime.usable_cpus() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    runtime.set_threads()
    assert set_to == [3]


def _omp_wait_policy(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         env={**clean, "PYTHONPATH": SRC, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_importing_cfdpo_leaves_the_openmp_wait_policy_alone():
    assert _omp_wait_policy("import cfdpo, cfdpo.pipeline, cfdpo.train, cfdpo.generate, cfdpo.cli") == "None"


def test_the_cli_makes_openmp_threads_sleep_unless_the_user_chose():
    run_cli = "from cfdpo.cli import main\nmain(['--help'])"
    assert _omp_wait_policy(run_cli) == "PASSIVE"
    assert _omp_wait_policy(run_cli, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
