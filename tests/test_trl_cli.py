"""The exported pairs train with TRL's own command line (`trl dpo`), offline, for one step.

`trl dpo --dataset_name` goes through `datasets.load_dataset`, which refuses a `save_to_disk`
folder such as the run's `pairs/<variant>/`; the hf export's `dataset/` folder (parquet splits named
in its card's `configs`) loads as it is, one split per variant (`--dataset_train_split`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

from cfdpo.cli import main

TRL = Path(sys.executable).with_name("trl")


@pytest.mark.skipif(not TRL.is_file(), reason="TRL's command line is not installed beside this Python")
def test_trl_dpo_cli_trains_on_the_exported_pairs(tiny_model, tmp_path):
    rec = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, variants=["negation"]))
    run = tmp_path / "run"
    assert main(["generate", str(run), "--recipe", str(rec)]) == 0
    assert main(["pairs", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0

    out = tmp_path / "trl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"),
           "WANDB_DISABLED": "true"}
    cmd = [str(TRL), "dpo", "--model_name_or_path", str(tiny_model), "--dataset_name", str(tmp_path / "export" / "dataset"),
           "--dataset_train_split", "negation", "--max_steps", "1", "--per_device_train_batch_size", "2",
           "--max_length", "128", "--bf16", "false", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
           "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--output_dir", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert "'train_loss'" in done.stdout + done.stderr
