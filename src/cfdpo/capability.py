"""What alignment cost: KL(base || model) on base's own sampled answers, and the MCQ accuracy's error.

The KL estimate: the base model samples one answer (seeded, at temperature 1 with no nucleus cut:
base's own distribution, not the recipe's sampling settings) to each of `evaluation.kl_prompts` prompts from `evaluation.kl_source`, asked as the control prompt.
When that source is the recipe's own prompt set, only prompts in neither the training nor the
evaluation split are used. Each answer is kept as the token ids base sampled: every token up to
and including the end-of-turn token when the answer ended by itself, none after a cut-off answer.
A model's estimate for one answer is the sum over those tokens of log p_base − log p_model (a
Monte Carlo estimate of KL(base || model), unbiased as the answers come from base); reported as
the mean per answer and per answer token, with bootstrap intervals over prompts.
"""

from __future__ import annotations

from cfdpo import stats
from cfdpo.generate import GenParams
from cfdpo.prompts import load_prompts, split
from cfdpo.recipe import Recipe


def kl_prompt_rows(recipe: Recipe) -> list[dict]:
    """The first `evaluation.kl_prompts` prompts of `evaluation.kl_source`, skipping the recipe's
    training and evaluation prompts when the source is the recipe's own prompt set."""
    ev, p = recipe.evaluation, recipe.prompts
    if ev.kl_prompts == 0:
        return []
    rows = load_prompts(ev.kl_source)
    if ev.kl_source == p.source:
        train, held_out = split(load_prompts(p.source, p.column), p.train_size, p.eval_size, p.seed)
        used = {r["prompt"] for r in train + held_out}
        rows = [r for r in rows if r["prompt"] not in used]
    return rows[: ev.kl_prompts]


def kl_sample_params(max_new_tokens: int) -> GenParams:
    """How base's KL answers are sampled: from its own distribution (temperature 1, top_p 1). At a lower
    temperature the answers are base's most likely ones, which a sharper model can rate higher than
    base does, and the estimate is biased (it can go below zero)."""
    return GenParams(max_new_tokens, 1.0, 1.0)


def sample_answer_ids(model, tokenizer, conversations: list[list[dict]], params: GenParams, seed: int,
                      batch_size: int) -> list[list[int]]:
    """One sampled answer per conversation as token ids: up to and including the first stop token
    (end of turn), or all `max_new_tokens` tokens of an answer that was cut off."""
    import torch

    from cfdpo.backends.transformers import decode

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    stop_ids = torch.tensor(sorted({pad_id, *(eos if isinstance(eos, list) else [eos])}))
    out = []
    for b in range(0, len(conversations), batch_size):
        encoded = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
                   for c in conversations[b : b + batch_size]]
        encoded = [e["input_ids"] if isinstance(e, dict) else list(e) for e in encoded]
        with torch.inference_mode():
            new = decode(model, encoded, pad_id, 1, params, stop_ids.to(device), seed + b).cpu()
        for seq in new:
            stop = torch.isin(seq, stop_ids)
            n = int(stop.nonzero()[0]) + 1 if stop.any() else len(seq)
            out.append(seq[:n].tolist())
    return out


def kl_summary(base_logprobs: list[list[float]], model_logprobs: list[list[float]], seed: int = 0) -> dict:
    """{"kl", "kl_ci95", "kl_per_token", "kl_per_token_ci95", "n"} from the per-token log-probs of
    the same answers under base and under the model (one answer per prompt)."""
    per_answer = [sum(base) - sum(model) for base, model in zip(base_logprobs, model_logprobs)]
    tokens = [len(base) for base in base_logprobs]
    kl = stats.summary(per_answer, seed=seed)
    per_token = stats.ratio_ci(per_answer, tokens, seed=seed) if sum(tokens) else {"ratio": None, "ci95": None}
    return {"kl": kl["score"], "kl_ci95": kl["ci95"], "kl_per_token": per_token["ratio"],
            "kl_per_token_ci95": per_token["ci95"], "n": kl["n"]}


def answer_nll(logprobs: list[list[float]]) -> float | None:
    """The mean per-token NLL of answers from their per-token log-probs (token-weighted); None without tokens."""
    tokens = sum(len(answer) for answer in logprobs)
    return -sum(sum(answer) for answer in logprobs) / tokens if tokens else None


def mcq_summary(accuracy: float | None, n: int) -> dict:
    """{"mcq_accuracy", "mcq_se", "mcq_detectable", "mcq_n"}: the accuracy, its binomial standard error
    and the smallest accuracy change n items detect (80 % power, 5 % level)."""
    if accuracy is None or n < 1:
        return {"mcq_accuracy": None, "mcq_se": None, "mcq_detectable": None, "mcq_n": n}
    return {"mcq_accuracy": accuracy, "mcq_se": stats.binomial_se(accuracy, n),
            "mcq_detectable": stats.detectable_difference(n, accuracy), "mcq_n": n}
