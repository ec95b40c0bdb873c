"""A DPO batch as one padding-free packed row in which each pair's chosen and rejected answers share one
pass over their prompt: the layout check (`shared_prompt`), the packed forward (`shared_prompt_hidden`)
and its attention (`pair_attention`, registered with transformers as `cfdpo_pairs`)."""

from __future__ import annotations

import functools

EAGER_MAX_SCORES = 2**23  # attention scores per call above which `_attend` uses sdpa


class PairPacking:
    """Runs a DPO batch's forward as one packed pair row where the model allows it: sdpa attention and no
    sliding window (a packed row's full mask would not have one), and a forward that passes extra keyword
    arguments on to attention, which the first packed call finds out (TRL's rows from then on)."""

    def __init__(self, config, eager_max_scores: int = EAGER_MAX_SCORES):
        self.enabled = config._attn_implementation == "sdpa" and not _windowed(config.get_text_config())
        self.eager_max_scores = eager_max_scores

    def hidden_states(self, body, kwargs: dict, labels):
        """The last hidden states at the labelled positions (see `shared_prompt_hidden`), or None where the
        batch is not TRL's pair layout or the model cannot run a packed row."""
        split = shared_prompt(kwargs, labels) if self.enabled else None
        if split is None:
            return None
        try:
            return shared_prompt_hidden(body, kwargs["input_ids"], *split, eager_max_scores=self.eager_max_scores)
        except TypeError as e:  # a model whose forward takes no extra keyword arguments: TRL's rows
            if "cfdpo_pairs" not in str(e):
                raise
            self.enabled = False
            return None


def _windowed(cfg) -> bool:
    """Whether some layer of the model attends through a sliding window (a packed row's full mask would not)."""
    types = getattr(cfg, "layer_types", None) or []
    return any(t != "full_attention" for t in types) or (
        getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True) is not False)


def shared_prompt(kwargs: dict, labels):
    """(prompt lengths, completion lengths) when a batch is TRL's DPO layout: rows i and i+B hold the
    same prompt followed by two completions (the labelled tokens, one run each), right-padded; else None."""
    import torch

    ids, att = kwargs.get("input_ids"), kwargs.get("attention_mask")
    others = {k for k, v in kwargs.items() if v is not None} - {"input_ids", "attention_mask", "use_cache"}
    if ids is None or att is None or others or ids.shape[0] % 2 or ids.shape != labels.shape:
        return None
    half = ids.shape[0] // 2
    labelled = labels != -100
    length = labelled.sum(1)
    start = labelled.int().argmax(1)
    pos = torch.arange(ids.shape[1], device=ids.device)
    end = (start + length)[:, None]
    if (length == 0).any() or (start == 0).any() or not torch.equal(start[:half], start[half:]):
        return None
    if not (torch.equal(labelled, (pos >= start[:, None]) & (pos < end)) and torch.equal(att.bool(), pos < end)):
        return None
    if not ((ids[:half] == ids[half:]) | (pos >= start[:half, None])).all():
        return None
    return start[:half], length


def shared_prompt_hidden(body, ids, prompt_len, comp_len, eager_max_scores: int = EAGER_MAX_SCORES):
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

    def span(lo, hi):
        return torch.arange(lo, hi, device=dev)

    prompt_lens, comp_lens = prompt_len.tolist(), comp_len.tolist()
    tokens, positions, segments = [], [], []  # segment of a token: 3 * pair + (0 prompt, 1 chosen, 2 rejected)
    chosen_part, rejected_part, rejected_keys = [], [], []  # row positions per pair, for the two attention parts
    predict_chosen, predict_rejected = [], []  # row positions whose hidden state predicts a completion token
    start = 0
    for i in range(half):
        n_prompt, n_chosen, n_rejected = prompt_lens[i], comp_lens[i], comp_lens[half + i]
        chosen_end = start + n_prompt + n_chosen
        rejected_end = chosen_end + n_rejected
        tokens += [ids[i, : n_prompt + n_chosen], ids[half + i, n_prompt : n_prompt + n_rejected]]
        positions += [span(0, n_prompt + n_chosen), span(n_prompt, n_prompt + n_rejected)]
        segments.append(torch.tensor([i * 3] * n_prompt + [i * 3 + 1] * n_chosen + [i * 3 + 2] * n_rejected, device=dev))
        chosen_part.append(span(start, chosen_end))  # prompt+chosen: causal
        rejected_part.append(span(chosen_end, rejected_end))  # rejected queries
        rejected_keys.append(torch.cat([span(start, start + n_prompt), span(chosen_end, rejected_end)]))  # ... see the prompt and themselves
        predict_chosen.append(span(start + n_prompt - 1, chosen_end - 1))
        predict_rejected.append(torch.cat([span(start + n_prompt - 1, start + n_prompt), span(chosen_end, rejected_end - 1)]))
        start = rejected_end
    chosen_rows = pad_sequence(chosen_part, batch_first=True, padding_value=0)  # padding at the end of a causal row: never seen
    rejected_rows = pad_sequence(rejected_part, batch_first=True, padding_value=0)  # padded queries: computed, not used
    rejected_key_rows = pad_sequence(rejected_keys, batch_first=True, padding_value=0)
    prompt = prompt_len[:, None, None]
    qi, kj = span(0, rejected_rows.shape[1])[None, :, None], span(0, rejected_key_rows.shape[1])[None, None, :]
    rejected_mask = (kj < prompt) | ((kj - prompt <= qi) & (kj - prompt < comp_len[half:, None, None]))
    width, rejected_width = chosen_rows.shape[1], rejected_rows.shape[1]
    chosen_slots = (span(0, half)[:, None] * width + span(0, width))[span(0, width) < comp_len[:half, None] + prompt_len[:, None]]
    rejected_slots = (chosen_rows.numel() + span(0, half)[:, None] * rejected_width + span(0, rejected_width))[
        span(0, rejected_width) < comp_len[half:, None]]
    order = torch.empty(start, dtype=torch.long, device=dev)  # row position -> its slot in the two parts' outputs
    order[torch.cat(chosen_part)], order[torch.cat(rejected_part)] = chosen_slots, rejected_slots
    causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()[None, None]
    parts = dict(chosen_rows=chosen_rows, rejected_rows=rejected_rows, rejected_keys=rejected_key_rows,
                 causal_mask=causal, rejected_mask=rejected_mask[:, None], order=order, eager_max_scores=eager_max_scores)
    segment = torch.cat(segments)
    row_mask = (span(0, start)[:, None] >= span(0, start)[None, :]) & (segment[:, None] // 3 == segment[None, :] // 3)
    row_mask &= ~((segment[:, None] % 3 == 2) & (segment[None, :] % 3 == 1))  # rejected tokens do not see the chosen ones
    row = torch.cat(tokens)[None]
    cfg, before = body.config, body.config._attn_implementation
    _register_pair_attention()
    cfg._attn_implementation = "cfdpo_pairs"
    try:
        hidden = body(input_ids=row, attention_mask=row_mask[None, None], position_ids=torch.cat(positions)[None],
                      use_cache=False, cfdpo_pairs=parts).last_hidden_state
    finally:
        cfg._attn_implementation = before
    return hidden[0, torch.cat(predict_chosen + predict_rejected)]


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
    queries, keys, values = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, dim], token-major in memory

    def take(x, idx):  # [pairs, heads, n, dim]; index_select: its backward is a cheap index_add
        return x.index_select(0, idx.flatten()).view(*idx.shape, *x.shape[1:]).transpose(1, 2)

    def flat(out):  # [pairs, heads, n, dim] -> [pairs * n, heads, dim]
        return out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[-1])

    def attend(rows, key_rows, mask):
        return _attend(take(queries, rows), take(keys, key_rows), take(values, key_rows), mask, scaling, drop,
                       parts["eager_max_scores"])

    chosen = attend(parts["chosen_rows"], parts["chosen_rows"], parts["causal_mask"])
    rejected = attend(parts["rejected_rows"], parts["rejected_keys"], parts["rejected_mask"])
    return torch.cat([flat(chosen), flat(rejected)]).index_select(0, parts["order"])[None], None


def _attend(query, key, value, mask, scale, dropout: float, eager_max_scores: int):
    """Attention of `query` [b, h, n, d] over `key`, `value` [b, h_kv, m, d] (grouped-query heads as in
    transformers' `repeat_kv`) where the boolean `mask` [b or 1, 1, n, m] allows. Up to
    `eager_max_scores` scores, with plain matmuls (transformers' eager arithmetic: fp32 softmax), which
    on this project's CPU beat torch's sdpa kernel on a DPO batch's parts, forward and backward
    (`bench/run.py --train cfdpo-sdpa`); larger scores (eager keeps them for backward) go through sdpa."""
    import torch

    batch, heads, n_queries, head_dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    if batch * heads * n_queries * n_keys > eager_max_scores:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                                scale=scale, enable_gqa=kv_heads != heads)
    group = heads // kv_heads
    scores = (query.reshape(batch, kv_heads, group * n_queries, head_dim) @ key.transpose(-1, -2)) * (
        head_dim**-0.5 if scale is None else scale)
    scores = scores.view(batch, kv_heads, group, n_queries, n_keys).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, dropout)
    return (probs.view(batch, kv_heads, group * n_queries, n_keys) @ value).view(batch, heads, n_queries, head_dim)
