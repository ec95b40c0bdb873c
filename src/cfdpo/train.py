"""Training: TRL's DPOTrainer (and SFTTrainer for the context-distillation baseline) with a PEFT LoRA adapter.

The DPO reference is the base model with the adapter disabled (TRL does this when given a
`peft_config` and no `ref_model`), so only one model is in memory. The adapter and the training
log are written to a temporary directory and renamed to `adapters/<name>/` when complete.

Under `accelerate launch` (DDP / DeepSpeed / FSDP) every rank trains (the Trainer handles the
distribution) and saves through the Trainer (ZeRO-3 / FSDP gather the adapter there); rank 0 makes
the temporary directory, writes the log and renames it into place, the other ranks wait.

Crash safety: the trainer checkpoints every `dpo.save_steps` steps into `adapters/.<name>-work/`;
a rerun resumes from the last complete checkpoint there (and removes it after success). An
adapter is not trained again when its `identity.json` (see `adapter_identity`: the pairs, the model,
the dpo settings, the kind, the cfdpo version and the adapter it continued from) matches; checkpoints
of another identity are dropped.

On CPU the trainer keeps TRL's loss and loop but its forward is cheaper (`cfdpo.cpu_kernels`).

Validation-driven training (`dpo.auto`, given a plan by the pipeline): at least `dpo.min_steps`
steps, a validation curve in `train_log.json` (`validation`, `best_step`, `auto`), the best validated
step's adapter published instead of the last, an early stop (`cfdpo.validation`). Its state is saved
with each checkpoint, so a resumed run continues the curve.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cfdpo import cpu_kernels, dist
from cfdpo.errors import CfdpoError
from cfdpo.runio import recover_dir, replace_dir, write_json
from cfdpo.runtime import bf16_supported, train_dtype
from cfdpo.spec import DPOSpec

if TYPE_CHECKING:
    from cfdpo.validation import ValidationPlan

PAIR_COLUMNS = ["prompt", "chosen", "rejected"]
IDENTITY = "identity.json"  # in an adapter's folder: what it was trained from (`adapter_identity`)


def lora_config(spec: DPOSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
        target_modules=list(spec.lora_targets), task_type="CAUSAL_LM",
    )


def _common_args(spec: DPOSpec, out: Path) -> dict:
    import torch

    from cfdpo import tracking

    return dict(
        output_dir=str(out), per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum, num_train_epochs=spec.epochs,
        learning_rate=spec.learning_rate, lr_scheduler_type="linear",
        logging_steps=1, save_strategy="steps", save_steps=spec.save_steps, save_total_limit=2,
        **tracking.trainer_args(out), seed=spec.seed, data_seed=spec.seed,
        bf16=bf16_supported() if spec.bf16 is None else spec.bf16, fp16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        max_length=spec.max_length, dataloader_num_workers=0, disable_tqdm=True,
        ddp_find_unused_parameters=False,  # LoRA: every trainable parameter gets a gradient
    )


def _check_targets(model, spec: DPOSpec) -> None:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in spec.lora_targets if t not in names]
    if missing:
        raise CfdpoError(f"dpo.lora_targets: module '{missing[0]}' is not in this model; expected names like q_proj, v_proj")


def _quiet(trainer, label: str = "train") -> None:
    """transformers' printed logs and tqdm bar give way to one rich bar named after the adapter."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from cfdpo.progress import training_progress

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(training_progress(f"{label} {Path(trainer.args.output_dir).name.rsplit('-', 1)[0].lstrip('.')}"))


def _finish(trainer, tmp: Path, out: Path, merge: bool, extra_log: dict) -> Path:
    trainer.save_model(str(tmp / "adapter"))  # every rank: the Trainer gathers sharded weights, rank 0 writes
    return dist.on_main(lambda: _publish(trainer, tmp, out, merge, extra_log))


def _publish(trainer, tmp: Path, out: Path, merge: bool, extra_log: dict) -> Path:
    log = {"log_history": trainer.state.log_history, **extra_log}
    write_json(tmp / "adapter" / "train_log.json", log)
    write_json(tmp / "adapter" / IDENTITY, log["identity"])
    if merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(tmp / "adapter" / "merged"), safe_serialization=True)
        trainer.processing_class.save_pretrained(str(tmp / "adapter" / "merged"))
    for junk in ("README.md", "training_args.bin"):  # the latter is a pickle; nothing reads it
        (tmp / "adapter" / junk).unlink(missing_ok=True)
    replace_dir(tmp / "adapter", out)
    shutil.rmtree(Path(trainer.args.output_dir), ignore_errors=True)  # the checkpoints are no longer needed
    return out


def _use_best(trainer, callback) -> None:
    """The best validated step's adapter weights into the model that is saved (rank 0 saves it)."""
    from peft import set_peft_model_state_dict

    weights = callback.best_weights() if dist.is_main() else None
    if weights is not None:
        set_peft_model_state_dict(trainer.model, weights)


def _check_not_all_dropped(trainer, spec: DPOSpec, n: int) -> None:
    if len(trainer.train_dataset) == 0:
        raise CfdpoError(f"dpo.max_length: all {n} examples are longer than {spec.max_length} tokens and were dropped; "
                         "raise dpo.max_length")


def pairs_fingerprint(ds) -> str:
    """A hash of the training examples, recorded in train_log.json to tell whether an adapter is current."""
    h = hashlib.sha256()
    for row in ds.select_columns(PAIR_COLUMNS):
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def training_settings(spec: DPOSpec) -> dict:
    """The dpo settings one training uses: all but `rounds` (how often to train, not how)."""
    return spec.model_dump(mode="json", exclude={"rounds"})


def adapter_identity(kind: str, model_path: str, spec: DPOSpec, fingerprint: str, start: str | None = None) -> dict:
    """What an adapter is made from: an adapter is current only when all of it is unchanged.

    `start` is the hash of the adapter training continued from (`dpo.rounds`), absent for a fresh
    adapter."""
    from cfdpo import __version__
    from cfdpo.models import model_id

    identity = {"kind": kind, "pairs_sha256": fingerprint, "model": model_id(model_path),
                "dpo": training_settings(spec), "cfdpo": __version__}
    return identity if start is None else {**identity, "start": start}


def adapter_is_current(out: Path, identity: dict, merge: bool) -> bool:
    dist.on_main(lambda: recover_dir(out))
    try:
        saved = json.loads((out / IDENTITY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (out / "adapter_model.safetensors").is_file() or (merge and not (out / "merged").is_dir()):
        return False
    return saved == identity


def work_dir(out: Path, identity: dict) -> Path:
    """The checkpoint directory of `out`, emptied if its checkpoints were made for another identity."""
    work = out.with_name(f".{out.name}-work")
    stamp = work / "identity.sha256"
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()

    def make():
        if work.exists() and not (stamp.is_file() and stamp.read_text().strip() == fingerprint):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            stamp.write_text(fingerprint + "\n")

    dist.on_main(make)
    return work


def last_checkpoint(work: Path) -> str | None:
    """The newest checkpoint that was written completely (a kill can cut the newest one short)."""
    found = []
    for c in work.glob("checkpoint-*"):
        try:
            step = int(c.name.split("-", 1)[1])
            json.loads((c / "trainer_state.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        if (c / "adapter_model.safetensors").is_file():
            found.append((step, c))
    return str(max(found)[1]) if found else None


def _validate_with(trainer, plan: ValidationPlan, tokenizer, work: Path, resume_from: str | None):
    """dpo.auto: the step budget, and the validation callback (not under ZeRO-3 / FSDP, where no process
    holds the whole model to answer with)."""
    from cfdpo.validation import ValidationCallback, step_budget

    args = trainer.args
    args.max_steps = step_budget(args.num_train_epochs, len(trainer.train_dataset), args.per_device_train_batch_size,
                                 args.gradient_accumulation_steps, args.world_size, plan.min_steps)
    if dist.sharded_weights():
        return None
    callback = ValidationCallback(plan, tokenizer, work, trainer.accelerator.autocast, resume_from)
    trainer.add_callback(callback)
    return callback


def _train(kind: str, model_path: str, pairs_dataset, spec: DPOSpec, out_dir: str | Path, merge: bool,
           trust_remote_code: bool, dtype: str, make_trainer, kernels: cpu_kernels.CpuKernels | None,
           validation: ValidationPlan | None = None, start: Path | None = None) -> Path:
    """Shared by DPO and SFT: skip a current adapter, resume from checkpoints, publish atomically.

    `make_trainer(model, tokenizer, common_args)` returns (trainer, number of examples). With a
    `validation` plan (`cfdpo.validation`), the step budget is raised to its min_steps and the
    adapter published is the best validated step's. With `start` (an adapter folder of the same
    LoRA settings) training continues from its weights instead of a fresh adapter.
    """
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from cfdpo.models import load_model, load_tokenizer

    if len(pairs_dataset) == 0:
        raise CfdpoError(f"{out_dir}: no pairs to train on; check answers.jsonl and the pairs stats")
    hf_logging.set_verbosity_error()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = pairs_fingerprint(pairs_dataset)
    identity = adapter_identity(kind, model_path, spec, fingerprint, _start_hash(start))
    dist.on_main(lambda: remove_stale_temp_dirs(out))
    if adapter_is_current(out, identity, merge):
        dist.on_main(lambda: shutil.rmtree(out.with_name(f".{out.name}-work"), ignore_errors=True))
        return out
    work = work_dir(out, identity)
    tmp = Path(dist.on_main(lambda: tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent)))  # one for all ranks
    try:
        tok = load_tokenizer(model_path, trust_remote_code)
        model = load_model(model_path, dtype or train_dtype(spec), trust_remote_code)
        _check_targets(model, spec)
        set_seed(spec.seed)  # the LoRA init (made before the Trainer seeds) is the same on every run and rank
        trainer, n = make_trainer(model, tok, _common_args(spec, work))
        if start is not None:
            _load_start(trainer, start)
        cpu_kernels.apply(trainer, kernels)
        _quiet(trainer)
        _check_not_all_dropped(trainer, spec, n)
        resume_from = last_checkpoint(work)
        callback = _validate_with(trainer, validation, tok, work, resume_from) if validation else None
        result = trainer.train(resume_from_checkpoint=resume_from)
        count_key = "pairs" if kind == "dpo" else "examples"
        extra_log = {"kind": kind, "train_runtime": result.metrics.get("train_runtime"), count_key: n,
                     "pairs_sha256": fingerprint, "spec": training_settings(spec), "identity": identity}
        if callback is not None:
            _use_best(trainer, callback)
            extra_log.update(callback.log(trainer.args.max_steps))
        return _finish(trainer, tmp, out, merge, extra_log)
    finally:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temp_dirs(out: Path) -> None:
    """Remove the temporary folders (`.<name>-XXXXXXXX`, from `tempfile.mkdtemp`) that a training
    killed before publishing left beside `out`; the run's lock means no other process is using them.
    The resume folder `.<name>-work` and `replace_dir`'s `.<name>.old` are kept."""
    stale = re.compile(rf"\.{re.escape(out.name)}-[a-z0-9_]{{8}}")
    for path in out.parent.iterdir():
        if path.is_dir() and stale.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)


def _start_hash(start: Path | None) -> str | None:
    from cfdpo.evaluate import adapter_hash

    return None if start is None else adapter_hash(Path(start))


def _load_start(trainer, start: Path) -> None:
    """The weights of the adapter at `start` into the trainer's fresh adapter (a checkpoint resumed from
    replaces them later)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(start) / "adapter_model.safetensors"
    if not weights.is_file():
        raise CfdpoError(f"{start}: no adapter_model.safetensors to continue training from")
    set_peft_model_state_dict(trainer.model, load_file(str(weights)))


def train_dpo(
    model_path: str, pairs_dataset, spec: DPOSpec, out_dir: str | Path, merge: bool = False,
    trust_remote_code: bool = False, dtype: str | None = None, kernels: cpu_kernels.CpuKernels | None = None,
    validation: ValidationPlan | None = None, start: Path | None = None,
) -> Path:
    """Train a LoRA adapter with DPO on a conversational preference dataset; returns the adapter dir.
    `kernels` chooses cfdpo's CPU training kernels (default: all that apply); `validation` (a
    `cfdpo.validation.ValidationPlan`) turns on validation-driven training (`dpo.auto`); `start` (an
    adapter folder) continues training that adapter, the reference staying the base model."""

    def make(model, tok, common):
        from trl import DPOConfig, DPOTrainer

        loss = [spec.loss_type] if isinstance(spec.loss_type, str) else list(spec.loss_type)
        args = DPOConfig(**common, beta=spec.beta, loss_type=loss, precompute_ref_log_probs=spec.precompute_ref_log_probs)
        ds = pairs_dataset.select_columns(PAIR_COLUMNS)
        try:
            trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora_config(spec))
        except ValueError as e:
            raise CfdpoError(f"dpo: {str(e).splitlines()[0]}") from None
        return trainer, len(ds)

    return _train("dpo", model_path, pairs_dataset, spec, out_dir, merge, trust_remote_code, dtype, make, kernels,
                  validation, start)


def train_sft(
    model_path: str, pairs_dataset, spec: DPOSpec, out_dir: str | Path, merge: bool = False,
    trust_remote_code: bool = False, dtype: str | None = None, kernels: cpu_kernels.CpuKernels | None = None,
    validation: ValidationPlan | None = None,
) -> Path:
    """Context-distillation baseline: SFT on (control prompt -> chosen answer), same LoRA budget."""

    def make(model, tok, common):
        from trl import SFTConfig, SFTTrainer

        ds = pairs_dataset.map(
            lambda ex: {"prompt": ex["prompt"], "completion": ex["chosen"]},
            remove_columns=pairs_dataset.column_names,
        )
        args = SFTConfig(**common, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora_config(spec))
        return trainer, len(ds)

    return _train("sft", model_path, pairs_dataset, spec, out_dir, merge, trust_remote_code, dtype, make, kernels,
                  validation)
