#!/usr/bin/env bash
# Check the multi-process and GPU paths on a fresh machine with one GPU (made for the `device`
# H200, 16 cores, no network). Run from the repo root:  bash bench/gpu_check.sh
# Uses whatever python3 / .venv is there and installs nothing. Results go to $OUT (default ./gpu-check-out):
#   env.txt           what is installed (python, torch, CUDA, GPU, accelerate, trl, peft, vllm, deepspeed)
#   distributed.txt   tests/test_distributed.py on 2 CPU processes (torchrun, gloo); GPU hidden
#   gpu_dpo.json/.txt 1 process on the GPU: generate -> pairs -> DPO (bf16 base) on a tiny model
#   summary.txt       one line per step: PASS / FAIL / SKIP
# Expected runtime: about 2 minutes (most of it imports); each step is capped by `timeout`.
set -u
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export OUT HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
export WORK=$(mktemp -d /tmp/cfdpo-gpu-check.XXXX) CFDPO_CACHE=${CFDPO_CACHE:-$WORK/cache}
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
summary() { echo "$1" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)"
  echo "python: $(command -v $PY) $($PY --version 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
  $PY - <<'PY'
import importlib
for name in ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "pydantic", "typer", "rich",
             "yaml", "tokenizers", "pytest", "spacy", "vllm", "deepspeed"]:
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'installed')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: MISSING ({type(e).__name__})")
try:
    import torch
    print("cuda available:", torch.cuda.is_available(), "| torch cuda:", torch.version.cuda,
          "| devices:", torch.cuda.device_count(), "| bf16:", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    import torch.distributed as d
    print("gloo:", d.is_gloo_available(), "| nccl:", d.is_nccl_available())
except Exception as e:  # noqa: BLE001
    print("torch check failed:", e)
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! $PY -c "import torch, transformers, trl, peft, accelerate, datasets, pydantic, typer, rich, yaml, tokenizers" 2>/dev/null; then
  summary "SKIP all: cfdpo's dependencies are not installed for $PY (see env.txt); nothing can be installed offline"
  exit 0
fi

# 1) two CPU processes (gloo): sharded generation + DDP training, same loss curve as one process
if $PY -c "import pytest" 2>/dev/null; then
  if CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4 timeout 400 $PY -m pytest -q -p no:cacheprovider tests/test_distributed.py \
       > "$OUT/distributed.txt" 2>&1; then
    summary "PASS distributed (2 CPU processes, gloo): $(tail -1 "$OUT/distributed.txt")"
  else
    summary "FAIL distributed (2 CPU processes, gloo): $(tail -1 "$OUT/distributed.txt")"
  fi
else
  summary "SKIP distributed: pytest is not installed"
fi

# 2) one process on the GPU: DPO with a bf16 base on a tiny model
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if timeout 300 $PY bench/gpu_check.py > "$OUT/gpu_dpo.txt" 2>&1; then
    summary "PASS gpu dpo (1 process): $(tail -1 "$OUT/gpu_dpo.txt")"
  else
    summary "FAIL gpu dpo (1 process): $(tail -3 "$OUT/gpu_dpo.txt" | tr '\n' ' ')"
  fi
else
  summary "SKIP gpu dpo: torch has no CUDA device here"
fi
rm -rf "$WORK"
