"""Training: TRL's DPOTrainer (and SFTTrainer for the context-distillation baseline) with a PEFT LoRA adapter.

The DPO reference is the base model with the adapter disabled (TRL does this when given a
`peft_config` and no `ref_model`), so only one model is in memory. The adapter and the training
log are written to a temporary directory and renamed to `adapters/<name>/` when complete.

Under `accelerate launch` (DDP / DeepSpeed / FSDP) every rank trains (the Trainer handles the
distribution) and saves through the Trainer (ZeRO-3 / FSDP gather the adapter there); rank 0 makes
the temporary directory, writes the log and renames it into place, the other ranks wait.

Crash safety: the trainer checkpoints every `dpo.save_steps` steps into `adapters/.<name>-work/`;
a rerun resumes from the last complete checkpoint there (and removes it after success). An
adapter whose `train_log.json` records the same pairs (`pairs_sha256`) is not trained again.

On CPU the trainer keeps TRL's loss and loop but its forward is cheaper (`lean_lm_head`): only the
labelled positions go through the LM head and are scored in cache-sized chunks (`picked_log_probs`),
a batch runs as one padding-free row in which a pair's chosen and rejected answers share one pass
over their prompt (`shared_prompt_hidden`, `pair_attention`), and under bf16 the LoRA inputs skip
PEFT's fp32 round trip (`bf16_lora_inputs`). bench/run.py measures each against TRL's defaults,
bench/kernels.py the LM head and the attention alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from cfdpo import dist
from cfdpo.errors import CfdpoError
from cfdpo.runio import recover_dir, replace_dir, write_json
from cfdpo.spec import DPOSpec

PAIR_COLUMNS = ["prompt", "chosen", "rejected"]


def _lora(spec: DPOSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
        target_modules=list(spec.lora_targets), task_type="CAUSAL_LM",
    )


def _common_args(spec: DPOSpec, out: Path) -> dict:
    import torch

    return dict(
        output_dir=str(out), per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum, num_train_epochs=spec.epochs,
        learning_rate=spec.learning_rate, lr_scheduler_type="linear",
        logging_steps=1, save_strategy="steps", save_steps=spec.save_steps, save_total_limit=2,
        report_to=[], seed=spec.seed, data_seed=spec.seed,
        bf16=bf16_supported() if spec.bf16 is None else spec.bf16, fp16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        max_length=spec.max_length, dataloader_num_workers=0, disable_tqdm=True,
        ddp_find_unused_parameters=False,  # LoRA: every trainable parameter gets a gradient
    )


def bf16_supported() -> bool:
    """bf16 mixed precision pays on a CUDA GPU with bf16 and on a CPU with native bf16 (AVX512-BF16 /
    AMX): there bf16 matmuls ran at 2.2x the fp32 rate and bf16 DPO steps were faster (bench/results)."""
    import torch

    from cfdpo.generate import cpu_has_bf16

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def train_dtype(spec: DPOSpec) -> str:
    """The frozen base's weights: bf16 when training in bf16 (PEFT keeps the adapter in fp32), which
    saves the per-step cast of every weight that autocast does on an fp32 base; else fp32."""
    bf16 = bf16_supported() if spec.bf16 is None else spec.bf16
    return "bfloat16" if bf16 else "float32"


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
                if not state.is_world_process_zero:
                    return
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


def lean_lm_head(trainer) -> bool:
    """On CPU, score TRL's fused-LM-head calls with one projection of the labelled positions only.

    TRL's trainers patch the model so that `model(..., labels=..., fused_lm_head=True)` returns per-token
    log-probs (plus entropy / mean logit / top-1 for their metrics) without materialising the logits.
    Without Triton its kernel falls back to torch code that projects and scores *every* position
    (prompt and padding too) tile by tile in several passes, and recomputes the tiles in backward: on
    this project's 2-core CPU that was about half of a DPO step. Here the labelled positions go through
    the LM head in one matmul and are scored in chunks (`picked_log_probs`); the metrics come from the
    same logits without gradient, and only for the calls that report them (not the reference pass
    with the adapter off; `log_sum_sq_probs` only for WPO weighting). A DPO batch's chosen and rejected
    rows share their prompt, and the batch runs without padding (`shared_prompt_hidden`; models with
    sdpa attention and no sliding window, else TRL's rows). Returns whether it applied (CPU, TRL's
    patch present, a plain LM head: no logit soft-capping or scaling); otherwise TRL's own path stays."""
    import types

    import torch

    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    trl_forward = base.__dict__.get("forward")  # TRL sets the fused forward on the instance
    cfg = base.config.get_text_config()
    plain = all(getattr(cfg, k, None) in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale",
                                                               "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    if trl_forward is None or not plain or next(base.parameters()).device.type != "cpu":
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer
    from trl.trainer.utils import FusedCausalLMOutput

    adapter = next((m for m in base.modules() if isinstance(m, BaseTunerLayer)), None)
    wpo = bool(getattr(trainer, "use_weighting", False))
    packable = [base.config._attn_implementation == "sdpa" and not _windowed(cfg)]  # see pair_attention

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or args or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        mask = labels[:, 1:] != -100
        split = shared_prompt(kwargs, labels) if packable[0] else None
        hidden = None
        if split is not None:
            try:
                hidden = shared_prompt_hidden(self.base_model, kwargs["input_ids"], *split)
            except TypeError as e:  # a model whose forward takes no extra keyword arguments: TRL's rows
                if "cfdpo_pairs" not in str(e):
                    raise
                packable[0] = False
        if hidden is None:
            hidden = self.base_model(**kwargs).last_hidden_state[:, :-1][mask]
        target = labels[:, 1:][mask].to(hidden.device)
        reference = not torch.is_grad_enabled() and adapter is not None and adapter.disable_adapters
        picked, *metrics = picked_log_probs(self.get_output_embeddings()(hidden), target, not reference, wpo)
        full = lambda x: None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)  # noqa: E731
        extras = dict(zip(("entropy", "mean_logits", "is_top1", "log_sum_sq_probs"), map(full, metrics)))
        extras["is_top1"] = None if extras["is_top1"] is None else extras["is_top1"].bool()
        loss = -picked.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=full(picked), label_mask=mask, aux_loss=None, **extras)

    base.forward = types.MethodType(forward, base)
    return True


def picked_log_probs(logits, target, metrics: bool = True, wpo: bool = False, chunk: int = 64):
    """log softmax(logits)[target] per row in fp32, and (without gradient) TRL's metrics when `metrics`:
    entropy, mean logit, whether the target is the top-1 token, and with `wpo` logsumexp(2 log p).

    Same numbers as `log_softmax(logits.float()).gather(...)`, but the [rows, vocab] fp32 tensors are
    never materialised: rows go through in cache-sized chunks, forward and backward (where the softmax
    is recomputed from the saved logits and row logsumexp and the gradient is written in the logits'
    dtype); `bench/kernels.py` measures it against the plain version."""
    picked, ent, mean, top, lss = _picked_function().apply(logits, target, metrics, wpo, chunk)
    return picked, *(x if on else None for x, on in ((ent, metrics), (mean, metrics), (top, metrics), (lss, metrics and wpo)))


def _chunks(n: int, size: int):
    return (slice(s, s + size) for s in range(0, n, size))


def _picked_forward(logits, target, metrics: bool, wpo: bool, chunk: int):
    import torch

    n = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    lse, picked = torch.empty(n, **f32), torch.empty(n, **f32)
    ent, mean = torch.empty(n if metrics else 0, **f32), torch.empty(n if metrics else 0, **f32)
    top = torch.empty(n if metrics else 0, dtype=torch.bool, device=logits.device)
    lss = torch.empty(n if wpo else 0, **f32)
    for s in _chunks(n, chunk):
        lf = logits[s].to(torch.float32, copy=True)
        lse[s] = row_lse = torch.logsumexp(lf, -1)
        picked[s] = lf.gather(-1, target[s, None])[:, 0] - row_lse
        if metrics:
            mean[s] = lf.mean(-1)
            top[s] = lf.argmax(-1) == target[s]
            logp = lf.sub_(row_lse[:, None])
            ent[s] = -(logp.exp() * logp).sum(-1)
            if wpo:
                lss[s] = torch.logsumexp(2 * logp, dim=-1)
    return picked, lse, ent, mean, top, lss


@functools.cache
def _picked_function():
    import torch

    class PickedLogProbs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, target, metrics, wpo, chunk):
            picked, lse, *rest = _picked_forward(logits, target, metrics, wpo, chunk)
            ctx.save_for_backward(logits, target, lse)
            ctx.chunk = chunk
            ctx.mark_non_differentiable(*rest)
            return picked, *rest

        @staticmethod
        def backward(ctx, grad, *_):  # d picked / d logits = onehot(target) - softmax(logits)
            logits, target, lse = ctx.saved_tensors
            out = torch.empty_like(logits)
            for s in _chunks(logits.shape[0], ctx.chunk):
                g = grad[s, None]
                p = logits[s].to(torch.float32, copy=True).sub_(lse[s, None]).exp_().mul_(-g)
                out[s] = p.scatter_add_(-1, target[s, None], g)
            return out, None, None, None, None

    return PickedLogProbs


EAGER_MAX_SCORES = 2**23  # attention scores per call above which `_attend` uses sdpa


def _attend(q, k, v, mask, scale, dropout: float):
    """Attention of q [b, h, n, d] over k, v [b, h_kv, m, d] (grouped-query heads as in transformers'
    `repeat_kv`) where the boolean `mask` [b or 1, 1, n, m] allows. While the scores are small, with
    plain matmuls (transformers' eager arithmetic: fp32 softmax), which on this project's CPU beat
    torch's sdpa kernel on a DPO batch's parts, forward and backward (`bench/run.py --train
    cfdpo-sdpa`); larger scores (eager keeps them for backward) go through sdpa."""
    import torch

    b, h, n, d = q.shape
    kv, m = k.shape[1], k.shape[2]
    if b * h * n * m > EAGER_MAX_SCORES:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                                                enable_gqa=kv != h)
    g = h // kv
    scores = (q.reshape(b, kv, g * n, d) @ k.transpose(-1, -2)) * (d**-0.5 if scale is None else scale)
    scores = scores.view(b, kv, g, n, m).masked_fill(~mask[:, :, None], float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        p = torch.nn.functional.dropout(p, dropout)
    return (p.view(b, kv, g * n, m) @ v).view(b, h, n, d)


def _windowed(cfg) -> bool:
    """Whether some layer of the model attends through a sliding window (a packed row's full mask would not)."""
    types = getattr(cfg, "layer_types", None) or []
    return any(t != "full_attention" for t in types) or (
        getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True) is not False)


def bf16_lora_inputs(trainer) -> bool:
    """On CPU under bf16 autocast, hand the LoRA layers their bf16 inputs as they are. PEFT casts a LoRA
    layer's input to its fp32 weights' dtype, and autocast casts it straight back to bf16 for the
    matmul: two copies of the activations per adapted projection, forward and backward, for the same
    numbers (the losses of a run are identical with and without them). Returns whether it applied."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    args = getattr(trainer, "args", None)
    if not getattr(args, "bf16", False) or next(trainer.model.parameters()).device.type != "cpu":
        return False
    layers = [m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return bool(layers)


def shared_prompt(kwargs: dict, labels):
    """(prompt lengths, completion lengths) when a batch is TRL's DPO layout: rows i and i+B hold the
    same prompt followed by two completions (the labelled tokens, one run each), right-padded; else None."""
    import torch

    ids, att = kwargs.get("input_ids"), kwargs.get("attention_mask")
    others = {k for k, v in kwargs.items() if v is not None} - {"input_ids", "attention_mask", "use_cache"}
    if ids is None or att is None or others or ids.shape[0] % 2 or ids.shape != labels.shape:
        return None
    half = ids.shape[0] // 2
    lab = labels != -100
    length = lab.sum(1)
    start = lab.int().argmax(1)
    pos = torch.arange(ids.shape[1], device=ids.device)
    end = (start + length)[:, None]
    if (length == 0).any() or (start == 0).any() or not torch.equal(start[:half], start[half:]):
        return None
    if not (torch.equal(lab, (pos >= start[:, None]) & (pos < end)) and torch.equal(att.bool(), pos < end)):
        return None
    if not ((ids[:half] == ids[half:]) | (pos >= start[:half, None])).all():
        return None
    return start[:half], length


def shared_prompt_hidden(body, ids, prompt_len, comp_len):
    """The last hidden states that predict the completion tokens of a DPO batch (see `shared_prompt`), in
    row-major order of the labelled positions, computing each prompt once and no padding: the batch runs
    as one row `prompt | chosen | rejected | prompt | chosen | rejected ...` whose tokens keep their own
    positions. Attention (`pair_attention`) runs in two batched parts, prompt+chosen causally and the
    rejected tokens against their prompt and themselves, so none of the masked-out blocks of a packed
    square is computed. The row also carries its full 4D mask, so a model whose attention does not go
    through transformers' attention interface computes the same, only slower."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    half, dev = len(prompt_len), ids.device
    ar = lambda a, b: torch.arange(a, b, device=dev)  # noqa: E731
    plen, clen = prompt_len.tolist(), comp_len.tolist()
    toks, pos, kind, first, second, keys, at_c, at_r, o = [], [], [], [], [], [], [], [], 0
    for i in range(half):
        p, c, r = plen[i], clen[i], clen[half + i]
        toks += [ids[i, : p + c], ids[half + i, p : p + r]]
        pos += [ar(0, p + c), ar(p, p + r)]
        kind.append(torch.tensor([i * 3] * p + [i * 3 + 1] * c + [i * 3 + 2] * r, device=dev))
        first.append(ar(o, o + p + c))  # prompt+chosen: causal
        second.append(ar(o + p + c, o + p + c + r))  # rejected queries
        keys.append(torch.cat([ar(o, o + p), ar(o + p + c, o + p + c + r)]))  # ... see the prompt and themselves
        at_c.append(ar(o + p - 1, o + p + c - 1))  # the position predicting each completion token
        at_r.append(torch.cat([ar(o + p - 1, o + p), ar(o + p + c, o + p + c + r - 1)]))
        o += p + c + r
    a = pad_sequence(first, batch_first=True, padding_value=0)  # padding at the end of a causal row: never seen
    q2 = pad_sequence(second, batch_first=True, padding_value=0)  # padded queries: computed, not used
    k2 = pad_sequence(keys, batch_first=True, padding_value=0)
    prompt = prompt_len[:, None, None]
    qi, kj = ar(0, q2.shape[1])[None, :, None], ar(0, k2.shape[1])[None, None, :]
    mask2 = (kj < prompt) | ((kj - prompt <= qi) & (kj - prompt < comp_len[half:, None, None]))
    slot_a = (ar(0, half)[:, None] * a.shape[1] + ar(0, a.shape[1]))[ar(0, a.shape[1]) < comp_len[:half, None] + prompt_len[:, None]]
    slot_b = (a.numel() + ar(0, half)[:, None] * q2.shape[1] + ar(0, q2.shape[1]))[ar(0, q2.shape[1]) < comp_len[half:, None]]
    src = torch.empty(o, dtype=torch.long, device=dev)
    src[torch.cat(first)], src[torch.cat(second)] = slot_a, slot_b
    causal = torch.ones(a.shape[1], a.shape[1], dtype=torch.bool, device=dev).tril()[None, None]
    parts = dict(a=a, q2=q2, k2=k2, causal=causal, mask2=mask2[:, None], src=src)
    seg = torch.cat(kind)
    full = (ar(0, o)[:, None] >= ar(0, o)[None, :]) & (seg[:, None] // 3 == seg[None, :] // 3)
    full &= ~((seg[:, None] % 3 == 2) & (seg[None, :] % 3 == 1))  # rejected tokens do not see the chosen ones
    row = torch.cat(toks)[None]
    cfg, before = body.config, body.config._attn_implementation
    _register_pair_attention()
    cfg._attn_implementation = "cfdpo_pairs"
    try:
        hidden = body(input_ids=row, attention_mask=full[None, None], position_ids=torch.cat(pos)[None], use_cache=False,
                      cfdpo_pairs=parts).last_hidden_state
    finally:
        cfg._attn_implementation = before
    return hidden[0, torch.cat(at_c + at_r)]


@functools.cache
def _register_pair_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("cfdpo_pairs", lambda *args, **kwargs: pair_attention(*args, **kwargs))


def pair_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cfdpo_pairs=None, **kwargs):
    """transformers attention function for a packed pair row (`shared_prompt_hidden`): one causal
    attention over every pair's prompt+chosen tokens (batched, padded at the end) and one of every pair's
    rejected tokens over its prompt and rejected tokens. Without `cfdpo_pairs`, or with attention
    features it does not do (sliding window, soft-capping, sinks), it is transformers' sdpa attention
    with the given mask."""
    import torch
    from transformers.integrations import sdpa_attention

    if cfdpo_pairs is None or any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux")):
        return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                                     dropout=dropout, **kwargs)
    parts, drop = cfdpo_pairs, dropout if module.training else 0.0
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, dim], token-major in memory

    def take(x, idx):  # [pairs, heads, n, dim]; index_select: its backward is a cheap index_add
        return x.index_select(0, idx.flatten()).view(*idx.shape, *x.shape[1:]).transpose(1, 2)

    def flat(out):  # [pairs, heads, n, dim] -> [pairs * n, heads, dim]
        return out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[-1])

    first = _attend(take(q, parts["a"]), take(k, parts["a"]), take(v, parts["a"]), parts["causal"], scaling, drop)
    second = _attend(take(q, parts["q2"]), take(k, parts["k2"]), take(v, parts["k2"]), parts["mask2"], scaling, drop)
    return torch.cat([flat(first), flat(second)]).index_select(0, parts["src"])[None], None


def _quiet(trainer, label: str = "train") -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_RichProgress(f"{label} {Path(trainer.args.output_dir).name.rsplit('-', 1)[0].lstrip('.')}")())


def _finish(trainer, tmp: Path, out: Path, merge: bool, extra_log: dict) -> Path:
    trainer.save_model(str(tmp / "adapter"))  # every rank: the Trainer gathers sharded weights, rank 0 writes
    return dist.on_main(lambda: _publish(trainer, tmp, out, merge, extra_log))


def _publish(trainer, tmp: Path, out: Path, merge: bool, extra_log: dict) -> Path:
    log = {"log_history": trainer.state.log_history, **extra_log}
    write_json(tmp / "adapter" / "train_log.json", log)
    if merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(tmp / "adapter" / "merged"), safe_serialization=True)
        trainer.processing_class.save_pretrained(str(tmp / "adapter" / "merged"))
    for junk in ("README.md", "training_args.bin"):  # the latter is a pickle; nothing reads it
        (tmp / "adapter" / junk).unlink(missing_ok=True)
    replace_dir(tmp / "adapter", out)
    shutil.rmtree(Path(trainer.args.output_dir), ignore_errors=True)  # the checkpoints are no longer needed
    return out


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


def adapter_is_current(out: Path, fingerprint: str, merge: bool) -> bool:
    dist.on_main(lambda: recover_dir(out))
    try:
        log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (out / "adapter_model.safetensors").is_file() or (merge and not (out / "merged").is_dir()):
        return False
    return isinstance(log, dict) and log.get("pairs_sha256") == fingerprint


def work_dir(out: Path, fingerprint: str) -> Path:
    """The checkpoint directory of `out`, emptied if its checkpoints were made from other pairs."""
    work = out.with_name(f".{out.name}-work")
    stamp = work / "pairs.sha256"

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


def _train(kind: str, model_path: str, pairs_dataset, spec: DPOSpec, out_dir: str | Path, merge: bool,
           trust_remote_code: bool, dtype: str, make_trainer) -> Path:
    """Shared by DPO and SFT: skip a current adapter, resume from checkpoints, publish atomically.

    `make_trainer(model, tokenizer, common_args)` returns (trainer, number of examples).
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
    if adapter_is_current(out, fingerprint, merge):
        dist.on_main(lambda: shutil.rmtree(out.with_name(f".{out.name}-work"), ignore_errors=True))
        return out
    work = work_dir(out, fingerprint)
    tmp = Path(dist.on_main(lambda: tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent)))  # one for all ranks
    try:
        tok = load_tokenizer(model_path, trust_remote_code)
        model = load_model(model_path, dtype or train_dtype(spec), trust_remote_code)
        _check_targets(model, spec)
        set_seed(spec.seed)  # the LoRA init (made before the Trainer seeds) is the same on every run and rank
        trainer, n = make_trainer(model, tok, _common_args(spec, work))
        lean_lm_head(trainer)
        bf16_lora_inputs(trainer)
        _quiet(trainer)
        _check_not_all_dropped(trainer, spec, n)
        result = trainer.train(resume_from_checkpoint=last_checkpoint(work))
        count_key = "pairs" if kind == "dpo" else "examples"
        return _finish(trainer, tmp, out, merge, {"kind": kind, "train_runtime": result.metrics.get("train_runtime"),
                                                  count_key: n, "pairs_sha256": fingerprint,
                                                  "spec": spec.model_dump(mode="json")})
    finally:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)


def train_dpo(
    model_path: str, pairs_dataset, spec: DPOSpec, out_dir: str | Path, merge: bool = False,
    trust_remote_code: bool = False, dtype: str | None = None,
) -> Path:
    """Train a LoRA adapter with DPO on a conversational preference dataset; returns the adapter dir."""

    def make(model, tok, common):
        from trl import DPOConfig, DPOTrainer

        loss = [spec.loss_type] if isinstance(spec.loss_type, str) else list(spec.loss_type)
        args = DPOConfig(**common, beta=spec.beta, loss_type=loss, precompute_ref_log_probs=spec.precompute_ref_log_probs)
        ds = pairs_dataset.select_columns(PAIR_COLUMNS)
        try:
            trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_lora(spec))
        except ValueError as e:
            raise CfdpoError(f"dpo: {str(e).splitlines()[0]}") from None
        return trainer, len(ds)

    return _train("dpo", model_path, pairs_dataset, spec, out_dir, merge, trust_remote_code, dtype, make)


def train_sft(
    model_path: str, pairs_dataset, spec: DPOSpec, out_dir: str | Path, merge: bool = False,
    trust_remote_code: bool = False, dtype: str | None = None,
) -> Path:
    """Context-distillation baseline: SFT on (control prompt -> chosen answer), same LoRA budget."""

    def make(model, tok, common):
        from trl import SFTConfig, SFTTrainer

        ds = pairs_dataset.map(
            lambda ex: {"prompt": ex["prompt"], "completion": ex["chosen"]},
            remove_columns=pairs_dataset.column_names,
        )
        args = SFTConfig(**common, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_lora(spec))
        return trainer, len(ds)

    return _train("sft", model_path, pairs_dataset, spec, out_dir, merge, trust_remote_code, dtype, make)


def set_threads() -> None:
    import torch

    n = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # a share per process
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
