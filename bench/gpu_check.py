"""One process on the GPU: generate -> pairs -> DPO train (bf16 base) on a tiny random model.

Run by bench/gpu_check.sh; prints one JSON line and writes it to $OUT/gpu_dpo.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "src"), str(root / "tests")]
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402
from conftest import build_tiny_model, tiny_recipe, write_recipe  # noqa: E402

from cfdpo import pipeline  # noqa: E402

work = Path(os.environ.get("WORK", "/tmp/cfdpo-gpu-check"))
os.environ.setdefault("CFDPO_CACHE", str(work / "cache"))
model = build_tiny_model(work / "model")
rec = tiny_recipe(model, variants=["negation"])
rec["dpo"].update(bf16=True, epochs=2, learning_rate=0.005)
rec["generation"]["dtype"] = "bfloat16"
path = write_recipe(work / "r.yaml", rec)
t0 = time.perf_counter()
run = pipeline.open_run(work / "run", path)
added = pipeline.generate(run)
pipeline.build_pairs(run)
torch.cuda.reset_peak_memory_stats()
t1 = time.perf_counter()
(adapter,) = pipeline.train(run)
t2 = time.perf_counter()
log = json.loads((adapter / "train_log.json").read_text())
result = {
    "ok": True, "device": torch.cuda.get_device_name(0), "answers": added,
    "loss": [round(e["loss"], 6) for e in log["log_history"] if "loss" in e],
    "train_s": round(t2 - t1, 1), "total_s": round(t2 - t0, 1),
    "peak_cuda_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
}
assert result["peak_cuda_mem_mb"] > 0, "training did not use the GPU"
print(json.dumps(result))
out = os.environ.get("OUT")
if out:
    Path(out, "gpu_dpo.json").write_text(json.dumps(result, indent=2) + "\n")
