"""The CPU LM head for TRL's fused-head calls: only the labelled positions are projected, once, and
scored in cache-sized chunks of rows (`picked_log_probs`), forward and backward."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cfdpo.cpu_kernels.packed_pairs import PairPacking

LOGIT_SCALINGS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
METRICS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")  # TRL's fused-head outputs besides log_probs


def lean_lm_head(trainer, pair_packing: PairPacking | None = None) -> bool:
    """On CPU, score TRL's fused-LM-head calls with one projection of the labelled positions only.

    TRL's trainers patch the model so that `model(..., labels=..., fused_lm_head=True)` returns per-token
    log-probs (plus entropy / mean logit / top-1 for their metrics) without materialising the logits.
    Without Triton its kernel falls back to torch code that projects and scores *every* position
    (prompt and padding too) tile by tile in several passes, and recomputes the tiles in backward.
    Here the labelled positions go through the LM head in one matmul and are scored in chunks
    (`picked_log_probs`); the metrics come from the same logits without gradient, and only for the calls
    that report them (not the reference pass with the adapter off; `log_sum_sq_probs` only for WPO
    weighting). With `pair_packing` a DPO batch's hidden states come from one padding-free row in which
    a pair's chosen and rejected answers share their prompt, where it applies (else TRL's rows).
    Returns whether it applied (CPU, TRL's patch present, a plain LM head: no logit soft-capping or
    scaling); otherwise TRL's own path stays."""
    import types

    import torch

    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    trl_forward = base.__dict__.get("forward")  # TRL sets the fused forward on the instance
    plain = all(getattr(base.config.get_text_config(), k, None) in (None, 1.0) for k in LOGIT_SCALINGS)
    if trl_forward is None or not plain or next(base.parameters()).device.type != "cpu":
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer
    from trl.trainer.utils import FusedCausalLMOutput

    adapter = next((m for m in base.modules() if isinstance(m, BaseTunerLayer)), None)
    wpo = bool(getattr(trainer, "use_weighting", False))

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or args or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        mask = labels[:, 1:] != -100
        hidden = None if pair_packing is None else pair_packing.hidden_states(self.base_model, kwargs, labels)
        if hidden is None:
            hidden = self.base_model(**kwargs).last_hidden_state[:, :-1][mask]
        target = labels[:, 1:][mask].to(hidden.device)
        reference = not torch.is_grad_enabled() and adapter is not None and adapter.disable_adapters
        picked, *metrics = picked_log_probs(self.get_output_embeddings()(hidden), target, not reference, wpo)

        def per_token(values):  # labelled positions -> [rows, length - 1], zeros elsewhere
            return None if values is None else values.new_zeros(mask.shape).masked_scatter(mask, values)

        extras = dict(zip(METRICS, map(per_token, metrics)))
        extras["is_top1"] = None if extras["is_top1"] is None else extras["is_top1"].bool()
        loss = -picked.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=per_token(picked), label_mask=mask, aux_loss=None, **extras)

    base.forward = types.MethodType(forward, base)
    return True


def picked_log_probs(logits, target, metrics: bool = True, wpo: bool = False, chunk: int = 64):
    """log softmax(logits)[target] per row in fp32, and (without gradient) TRL's metrics when `metrics`:
    entropy, mean logit, whether the target is the top-1 token, and with `wpo` logsumexp(2 log p).

    Same numbers as `log_softmax(logits.float()).gather(...)`, but the [rows, vocab] fp32 tensors are
    never materialised: rows go through in cache-sized chunks, forward and backward (where the softmax
    is recomputed from the saved logits and row logsumexp and the gradient is written in the logits'
    dtype); `bench/kernels.py` measures it against the plain version."""
    picked, entropy, mean, top1, log_sum_sq = _picked_function().apply(logits, target, metrics, wpo, chunk)
    wanted = ((entropy, metrics), (mean, metrics), (top1, metrics), (log_sum_sq, metrics and wpo))
    return picked, *(values if on else None for values, on in wanted)


def _chunks(n: int, size: int):
    return (slice(start, start + size) for start in range(0, n, size))


def _picked_forward(logits, target, metrics: bool, wpo: bool, chunk: int):
    import torch

    n = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    lse, picked = torch.empty(n, **f32), torch.empty(n, **f32)
    entropy, mean = torch.empty(n if metrics else 0, **f32), torch.empty(n if metrics else 0, **f32)
    top1 = torch.empty(n if metrics else 0, dtype=torch.bool, device=logits.device)
    log_sum_sq = torch.empty(n if wpo else 0, **f32)
    for rows in _chunks(n, chunk):
        row_logits = logits[rows].to(torch.float32, copy=True)
        lse[rows] = row_lse = torch.logsumexp(row_logits, -1)
        picked[rows] = row_logits.gather(-1, target[rows, None])[:, 0] - row_lse
        if metrics:
            mean[rows] = row_logits.mean(-1)
            top1[rows] = row_logits.argmax(-1) == target[rows]
            logp = row_logits.sub_(row_lse[:, None])
            entropy[rows] = -(logp.exp() * logp).sum(-1)
            if wpo:
                log_sum_sq[rows] = torch.logsumexp(2 * logp, dim=-1)
    return picked, lse, entropy, mean, top1, log_sum_sq


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
            for rows in _chunks(logits.shape[0], ctx.chunk):
                row_grad = grad[rows, None]
                scaled = logits[rows].to(torch.float32, copy=True).sub_(lse[rows, None]).exp_().mul_(-row_grad)
                out[rows] = scaled.scatter_add_(-1, target[rows, None], row_grad)
            return out, None, None, None, None

    return PickedLogProbs
