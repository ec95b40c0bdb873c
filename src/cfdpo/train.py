"""Training: TRL's DPOTrainer (and SFTTrainer for the context-distillation baseline) with a PEFT LoRA adapter.

The DPO reference is the base model with the adapter disabled (TRL does this when given a
`peft_config` and no `ref_model`), so only one model is in memory. The adapter and the training
log are written to a temporary directory and renamed to `adapters/<name>/` when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from cfdpo.errors import CfdpoError
from cfdpo.runio import write_json
from cfdpo.spec import DPOSpec

PAIR_COLUMNS = ["prompt", "chosen", "rejected"]


def _lora(spec: DPOSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
        target_modules=list(spec.lora_targets), task_type="CAUSAL_LM",
    )


def _common_args(spec: DPOSpec, out: Path, n_examples: int) -> dict:
    import torch

    return dict(
        output_dir=str(out), per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum, num_train_epochs=spec.epochs,
        learning_rate=spec.learning_rate, lr_scheduler_type="linear",
        logging_steps=1, save_strategy="no", report_to=[], seed=spec.seed, data_seed=spec.seed,
        bf16=bf16_supported() if spec.bf16 is None else spec.bf16, fp16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        max_length=spec.max_length, dataloader_num_workers=0, disable_tqdm=True,
    )


def bf16_supported() -> bool:
    """bf16 compute is native here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _check_targets(model, spec: DPOSpec) -> None:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in spec.lora_targets if t not in names]
    if missing:
        raise CfdpoError(f"dpo.lora_targets: module '{missing[0]}' is not in this model; expected names like q_proj, v_proj")


class _RichProgress:
    """A one-line rich progress bar for training steps, showing the last loss."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None

    def __call__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                outer.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
                outer.bar.start()
                outer.task = outer.bar.add_task(outer.label, total=state.max_steps, loss="-")

            def on_log(self, args, state, control, logs=None, **kw):
                if outer.bar is not None and logs and "loss" in logs:
                    outer.bar.update(outer.task, loss=f"{float(logs['loss']):.4f}")

            def on_step_end(self, args, state, control, **kw):
                if outer.bar is not None:
                    outer.bar.update(outer.task, completed=state.global_step)

            def on_train_end(self, args, state, control, **kw):
                if outer.bar is not None:
                    outer.bar.stop()

        return CB()


def _quiet(trainer, label: str = "train") -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_RichProgress(f"{label} {Path(trainer.args.output_dir).parent.name.split('-')[0].lstrip('.')}")())


def _finish(trainer, tmp: Path, out: Path, merge: bool, extra_log: dict) -> Path:
    trainer.save_model(str(tmp / "adapter"))
    log = {"log_history": trainer.state.log_history, **extra_log}
    write_json(tmp / "adapter" / "train_log.json", log)
    if merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(tmp / "adapter" / "merged"), safe_serialization=True)
        trainer.processing_class.save_pretrained(str(tmp / "adapter" / "merged"))
    for junk in ("README.md",):
        (tmp / "adapter" / junk).unlink(missing_ok=True)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    (tmp / "adapter").rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def train_dpo(
    model_path: str, pairs_dataset, spec: DPOSpec, out_dir: str | Path, merge: bool = False,
    trust_remote_code: bool = False, dtype: str = "float32",
) -> Path:
    """Train a LoRA adapter with DPO on a conversational preference dataset; returns the adapter dir."""
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    from cfdpo.models import load_model, load_tokenizer

    if len(pairs_dataset) == 0:
        raise CfdpoError(f"{out_dir}: no pairs to train on; check answers.jsonl and the pairs stats")
    hf_logging.set_verbosity_error()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tok = load_tokenizer(model_path, trust_remote_code)
        model = load_model(model_path, dtype, trust_remote_code)
        _check_targets(model, spec)
        loss = [spec.loss_type] if isinstance(spec.loss_type, str) else list(spec.loss_type)
        args = DPOConfig(
            **_common_args(spec, tmp / "work", len(pairs_dataset)), beta=spec.beta, loss_type=loss,
            precompute_ref_log_probs=spec.precompute_ref_log_probs,
        )
        ds = pairs_dataset.select_columns(PAIR_COLUMNS)
        try:
            trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_lora(spec))
        except ValueError as e:
            raise CfdpoError(f"dpo: {str(e).splitlines()[0]}") from None
        _quiet(trainer)
        result = trainer.train()
        return _finish(trainer, tmp, out, merge, {"kind": "dpo", "train_runtime": result.metrics.get("train_runtime"),
                                                  "pairs": len(ds), "spec": spec.model_dump(mode="json")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_sft(
    model_path: str, pairs_dataset, spec: DPOSpec, out_dir: str | Path, merge: bool = False,
    trust_remote_code: bool = False, dtype: str = "float32",
) -> Path:
    """Context-distillation baseline: SFT on (control prompt -> chosen answer), same LoRA budget."""
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from cfdpo.models import load_model, load_tokenizer

    if len(pairs_dataset) == 0:
        raise CfdpoError(f"{out_dir}: no examples to train on")
    hf_logging.set_verbosity_error()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tok = load_tokenizer(model_path, trust_remote_code)
        model = load_model(model_path, dtype, trust_remote_code)
        _check_targets(model, spec)
        ds = pairs_dataset.map(
            lambda ex: {"prompt": ex["prompt"], "completion": ex["chosen"]},
            remove_columns=pairs_dataset.column_names,
        )
        args = SFTConfig(**_common_args(spec, tmp / "work", len(ds)), completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_lora(spec))
        _quiet(trainer)
        result = trainer.train()
        return _finish(trainer, tmp, out, merge, {"kind": "sft", "train_runtime": result.metrics.get("train_runtime"),
                                                  "examples": len(ds), "spec": spec.model_dump(mode="json")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def set_threads() -> None:
    import torch

    n = os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
