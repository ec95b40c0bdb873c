"""Log-likelihood scoring of text under a loaded transformers model (a PEFT model too).

`mean_nll`: the token-weighted NLL of answers given their conversations. `continuation_logprobs`
and `shared_context_logprobs`: lm-eval's loglikelihood, the summed log-probs of a continuation's
tokens given its context. The builtin multiple-choice set (`data/mcq.jsonl`) is scored the way
evaluation harnesses do: the option with the highest log-likelihood given "Question: ...\nAnswer:"
wins (`mcq_accuracy`; `accuracy_norm` divides by the option's length in characters, leading
space included).
"""

from __future__ import annotations

import json
import math
from importlib import resources

from cfdpo.backends.transformers import cache_kwarg, pad_batch


def mean_nll(model, tokenizer, conversations: list[list[dict]], answers: list[str], batch_size: int = 8) -> float:
    """Token-weighted mean NLL of `answers` given `conversations` under `model`: the answer's tokens are
    those of the conversation with the answer past those of the conversation with the generation
    prompt (an answer whose tokens do not extend them is skipped). Only the answers' positions go
    through the LM head (`tail_logprobs`)."""
    items = []
    for conv, ans in zip(conversations, answers):
        prompt_ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        full_ids = tokenizer.apply_chat_template(
            conv + [{"role": "assistant", "content": ans}], tokenize=True, return_dict=False
        )
        prompt_ids = prompt_ids["input_ids"] if isinstance(prompt_ids, dict) else list(prompt_ids)
        full_ids = full_ids["input_ids"] if isinstance(full_ids, dict) else list(full_ids)
        if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) <= len(prompt_ids):
            continue
        items.append((full_ids, len(full_ids) - len(prompt_ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    picked = tail_logprobs(model, items, pad, batch_size)
    count = sum(len(t) for t in picked)
    return -sum(float(t.sum()) for t in picked) / count if count else math.nan


def load_mcq(n: int | None = None) -> list[dict]:
    """The builtin multiple-choice set: [{id, category, question, choices[4], answer}], first `n` items."""
    text = (resources.files("cfdpo") / "data" / "mcq.jsonl").read_text(encoding="utf-8")
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return items[:n] if n else items


def mcq_context(item: dict, instruction: str | None = None) -> str:
    text = f"Question: {item['question']}\nAnswer:"
    return f"{instruction}\n\n{text}" if instruction else text


def tail_logprobs(model, items: list[tuple[list[int], int]], pad: int, batch_size: int = 16) -> list:
    """For each (token ids, n): a tensor of the log-probs of its last n tokens, each given the ones
    before it (an empty tensor for n = 0).

    Sequences of similar length share a left-padded batch, so only the last positions' logits are
    computed."""
    import torch

    device = next(model.parameters()).device
    out = [torch.zeros(0) for _ in items]
    order = sorted((i for i, (_, n) in enumerate(items) if n), key=lambda i: len(items[i][0]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        keep = max(items[i][1] for i in batch) + 1
        ids, mask = pad_batch([items[i][0] for i in batch], pad)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits[:, -keep:-1], dim=-1)  # predicts the last keep-1 tokens
        picked = logp.gather(-1, ids[:, ids.shape[1] - keep + 1 :].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for r, i in enumerate(batch):
            out[i] = picked[r, picked.shape[1] - items[i][1] :]
    return out


def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """Sum of log-probs of each continuation's tokens given its context (lm-eval's loglikelihood).

    The continuation's tokens are those of tokenize(context + continuation) past tokenize(context).
    """
    items = []
    for ctx, cont in pairs:
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        full = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"]
        items.append((full, min(max(1, len(full) - len(ctx_ids)), len(full) - 1)))  # the first token has no prediction
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [float(t.sum()) for t in tail_logprobs(model, items, pad, batch_size)]


def shared_context_logprobs(model, tokenizer, groups: list[tuple[str, list[str]]], batch_size: int = 16) -> list[list[float]]:
    """`continuation_logprobs` for groups of continuations that share one context: the context runs
    once and its KV cache is repeated for each continuation, so only the continuations' own tokens
    run per option (a multiple-choice question's options are a few tokens after a longer question).

    A group whose context tokens are not a prefix of context+continuation's tokens goes through
    `continuation_logprobs`, so the tokenization is the same either way."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list[float]] = [[] for _ in groups]
    fast = []
    for g, (ctx, conts) in enumerate(groups):
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        fulls = [tokenizer(ctx + c, add_special_tokens=False)["input_ids"] for c in conts]
        if ctx_ids and all(len(f) > len(ctx_ids) and f[: len(ctx_ids)] == ctx_ids for f in fulls):
            fast.append((g, ctx_ids, [f[len(ctx_ids):] for f in fulls]))
        else:
            out[g] = continuation_logprobs(model, tokenizer, [(ctx, c) for c in conts], batch_size)
    fast.sort(key=lambda x: len(x[1]))
    per = max(1, batch_size // max((len(x[2]) for x in fast), default=1))
    for b in range(0, len(fast), per):
        batch = fast[b : b + per]
        ids, mask = pad_batch([x[1] for x in batch], pad)  # contexts left-padded
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [(r, cont) for r, x in enumerate(batch) for cont in x[2]]
        cids, cmask = pad_batch([cont for _, cont in rows], pad, left=False)  # continuations after their context
        cwidth = cids.shape[1]
        src = torch.tensor([r for r, _ in rows])
        cache = DynamicCache(config=model.config)
        kv = {cache_kwarg(model): cache}
        with torch.inference_mode():
            last = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                         use_cache=True, logits_to_keep=1, **kv).logits[:, -1].float()
            cache.batch_select_indices(src.to(device))  # each context's cache once per continuation
            cpos = pos[src, -1:] + 1 + torch.arange(cwidth)
            logits = model(input_ids=cids.to(device), attention_mask=torch.cat([mask[src], cmask], 1).to(device),
                           position_ids=cpos.to(device), use_cache=True, **kv).logits.float()
        logits = torch.cat([last[src.to(device)].unsqueeze(1), logits[:, :-1]], 1)  # row j predicts token j
        picked = torch.log_softmax(logits, -1).gather(-1, cids.to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for j, (r, cont) in enumerate(rows):
            out[batch[r][0]].append(float(picked[j, : len(cont)].sum()))
    return out


def mcq_accuracy(model, tokenizer, items: list[dict], instruction: str | None = None, batch_size: int = 16) -> dict:
    """Accuracy on multiple-choice items by option log-likelihood (and per-character normalised)."""
    groups = [(mcq_context(it, instruction), [f" {c}" for c in it["choices"]]) for it in items]
    lps = [v for lp in shared_context_logprobs(model, tokenizer, groups, batch_size) for v in lp]
    hits = hits_norm = 0
    k = 0
    for it in items:
        n = len(it["choices"])
        lp = lps[k : k + n]
        norm = [v / len(f" {c}") for v, c in zip(lp, it["choices"])]
        k += n
        hits += int(max(range(n), key=lambda j: lp[j]) == it["answer"])
        hits_norm += int(max(range(n), key=lambda j: norm[j]) == it["answer"])
    n = len(items)
    return {"accuracy": hits / n if n else None, "accuracy_norm": hits_norm / n if n else None, "n": n}


def answer_token_logprobs(model, tokenizer, conversations: list[list[dict]], answers: list[list[int]],
                          batch_size: int = 16) -> list[list[float]]:
    """The log-prob of each given answer token id, after its conversation's chat template with the
    generation prompt: one list per answer (empty for an empty answer).

    The answers are token ids as a model produced them (not re-tokenised text), so two models can be
    compared on exactly the same tokens. Rows are left-padded so only the answers' logits are computed.
    """
    items = []
    for conv, answer in zip(conversations, answers):
        prompt_ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        prompt_ids = prompt_ids["input_ids"] if isinstance(prompt_ids, dict) else list(prompt_ids)
        items.append((list(prompt_ids) + list(answer), len(answer)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [t.tolist() for t in tail_logprobs(model, items, pad, batch_size)]
