"""`generation.backend: transformers`: answers sampled by cfdpo's own KV-cache decode loop over a
transformers model, on the CPU or a GPU.

Also the two pieces of tensor plumbing the likelihood scorers share with the decode loop:
`pad_batch` and `cache_kwarg`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from cfdpo.generate import GenParams

CANDIDATES = 256  # top-p is resolved among the most likely tokens when they hold top_p of the mass


def nucleus(probs, top_p: float):
    """The tokens nucleus (top-p) sampling may draw, as (probabilities, token ids) per row, most likely
    first, with the dropped ones at probability 0.

    The same set as transformers' TopPLogitsWarper (keep a token while the mass of the more likely
    tokens is below top_p) without sorting the whole vocabulary: when the `CANDIDATES` most likely
    tokens already hold top_p of the mass no other token can be kept; otherwise a full sort."""
    top, idx = probs.topk(min(CANDIDATES, probs.shape[-1]), dim=-1)
    if bool((top.sum(-1) < top_p).any()):
        top, idx = probs.sort(dim=-1, descending=True)
    return top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0), idx


def sample_next(logits, params: GenParams, generator):
    """One token per row: greedy at temperature 0, else temperature + nucleus sampling."""
    import torch

    if params.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        top, idx = nucleus(probs, params.top_p)
        return idx.gather(-1, torch.multinomial(top, 1, generator=generator))[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def pad_batch(seqs, pad: int, left: bool = True):
    """Token lists as (ids, attention mask) tensors of the longest one's width, padded on the left
    (prompts to continue) or on the right."""
    import torch

    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, x in enumerate(seqs):
        cols = slice(width - len(x), width) if left else slice(0, len(x))
        ids[r, cols] = torch.tensor(x, dtype=torch.long)
        mask[r, cols] = 1
    return ids, mask


def cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: `cache` in newer transformers, else `past_key_values`."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


SHARED_PREFIX_MIN = 8  # prompt tokens rows must share before their prefill is shared


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two token lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(seqs: Sequence[Sequence[int]], names: Sequence[str] | None = None,
                  min_shared: int = SHARED_PREFIX_MIN) -> list[tuple[list[int], int]]:
    """Rows of a batch that share a prompt prefix, as (row indices, shared length): in token order a row
    joins the previous group when it shares at least `min_shared` tokens with that group's first row
    (and runs under the same adapter). A group's length is what all its rows share, at most its shortest
    row's length - 1 (each row reads one token of its own for its first logits); 0 for a row alone or
    when under `min_shared`."""
    order = sorted(range(len(seqs)), key=lambda i: (names[i] if names else "", list(seqs[i])))
    groups: list[list[int]] = []
    for i in order:
        head = groups[-1][0] if groups else None
        if head is not None and (names is None or names[head] == names[i]) \
                and shared_length(seqs[head], seqs[i]) >= min_shared:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for rows in groups:
        length = min(len(seqs[i]) for i in rows) - 1 if len(rows) > 1 else 0
        for i in rows[1:]:
            length = min(length, shared_length(seqs[rows[0]], seqs[i]))
        out.append((rows, length if length >= min_shared else 0))
    return out


def prefill(model, seqs: Sequence[Sequence[int]], pad_id: int, names: list[str] | None, kv: str,
            min_shared: int = SHARED_PREFIX_MIN):
    """Read the prompts `seqs` into a new KV cache: returns (cache, logits at each row's last token,
    attention mask, position of each row's last token). The prefix a group of rows shares
    (`prefix_groups`, e.g. the chat template's default system prompt and an instruction) is read once for
    the group and its cache copied to the group's rows, which then read only their own tokens: the rows
    lie as [padding][shared prefix][padding][own tokens], the mask hiding both paddings and the positions
    counting only real tokens, so each row sees what it would see read whole. Models whose cache is not
    plain `DynamicLayer`s (sliding windows, quantised caches) read every row whole."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    device = next(model.parameters()).device
    adapter = (lambda rows: {}) if names is None else (lambda rows: {"adapter_names": [names[i] for i in rows]})
    groups = prefix_groups(seqs, names, min_shared)
    shared = {}
    for g, (rows, length) in enumerate(groups):
        if length:
            shared[g] = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([list(seqs[rows[0]][:length])], device=device), use_cache=True,
                  **{kv: shared[g]}, **adapter(rows[:1]))
    if any(type(layer) is not DynamicLayer for c in shared.values() for layer in c.layers):
        shared = {}
    lengths = [0] * len(seqs)
    for g, (rows, length) in enumerate(groups):
        for i in rows:
            lengths[i] = length if g in shared else 0
    width = max(lengths)
    ids, own = pad_batch([list(s[n:]) for s, n in zip(seqs, lengths)], pad_id)
    ids, own = ids.to(device), own.to(device)
    cache = DynamicCache(config=model.config)
    if width:
        first = next(iter(shared.values()))
        for layer in range(len(first.layers)):
            k0, v0 = first.layers[layer].keys, first.layers[layer].values
            keys = k0.new_zeros((len(seqs), k0.shape[1], width, k0.shape[3]))
            values = v0.new_zeros((len(seqs), v0.shape[1], width, v0.shape[3]))
            for g, c in shared.items():
                rows, length = groups[g]
                index = torch.tensor(rows, device=device)
                keys[index, :, width - length:] = c.layers[layer].keys[0]
                values[index, :, width - length:] = c.layers[layer].values[0]
            cache.update(keys, values, layer)
    read = torch.tensor(lengths, device=device)
    before = (torch.arange(width, device=device)[None, :] >= width - read[:, None]).long()
    mask = torch.cat([before, own], dim=1)
    pos = (read[:, None] + own.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{kv: cache}, **adapter(range(len(seqs))))
    return cache, out.logits[:, -1], mask, pos[:, -1]


def decode(model, seqs: Sequence[Sequence[int]], pad_id: int, k: int, params: GenParams, stop_ids, seed: int,
           adapter_names: Sequence[str] | None = None, min_shared: int = SHARED_PREFIX_MIN):
    """Sample `k` continuations of each prompt (token lists `seqs`); returns [rows*k, max_new_tokens]
    token ids (the k samples of a row next to each other), padded with the first stop id after a stop.
    With `adapter_names` (one per row; PEFT models only) each row runs under its own LoRA adapter,
    "__base__" for none: PEFT's mixed-adapter batches.

    A plain KV-cache loop instead of `model.generate`: one prefill per prompt (`prefill`: a prefix rows
    share is read once; the cache is repeated for the k samples), logits only for the last position,
    nucleus sampling without a full sort, and rows that have stopped leave the batch (their cache rows
    are dropped) instead of decoding padding."""
    import torch

    device = stop_ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    kv = cache_kwarg(model)
    names = None if adapter_names is None else list(adapter_names)
    cache, logits, mask, last = prefill(model, seqs, pad_id, names, kv, min_shared)
    if k > 1:
        cache.batch_repeat_interleave(k)
        logits, mask, last = (t.repeat_interleave(k, dim=0) for t in (logits, mask, last))
        names = None if names is None else [name for name in names for _ in range(k)]
    n = len(seqs) * k
    result = torch.full((n, params.max_new_tokens), int(stop_ids[0]), dtype=torch.long, device=device)
    alive = torch.arange(n, device=device)  # result row of each row still decoding
    for step in range(params.max_new_tokens):
        nxt = sample_next(logits, params, generator)
        result[alive, step] = nxt
        if step == params.max_new_tokens - 1:
            break
        keep = (~torch.isin(nxt, stop_ids)).nonzero()[:, 0]
        if len(keep) == 0:
            break
        if len(keep) < len(alive):
            cache.batch_select_indices(keep)
            alive, nxt, mask, last = alive[keep], nxt[keep], mask[keep], last[keep]
            names = None if names is None else [names[i] for i in keep.tolist()]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                    **{kv: cache}, **({} if names is None else {"adapter_names": names}))
        logits = out.logits[:, -1]
    return result


def generate_answers(
    model, tokenizer, conversations: Sequence[list[dict]], params: GenParams, num_samples: Sequence[int],
    batch_size: int, seed: int, on_batch: Callable[[list[int], list[list[str]], list[list[int]]], None],
    todo: Collection[int] | None = None, adapter_names: Sequence[str] | None = None,
    on_ids: Callable[[list[int], list[list[list[int]]]], None] | None = None,
) -> None:
    """Generate `num_samples[i]` answers for each conversation, batched by prompt length.

    The batches are planned over all `conversations` (grouped by sample count, longest prompt first)
    and each is seeded from its place in that plan, so a batch's answers do not depend on which
    others run. Only the batches holding a conversation in `todo` (default: all) are decoded, whole.
    Calls `on_batch(indices, answers, token_counts)` after each batch so the caller can persist
    results as they come. The k samples of one conversation share one prefill (see `decode`).
    `adapter_names` (one per conversation) runs each under its own PEFT adapter (see `decode`).
    `on_ids(indices, token_ids)`, where given, gets each answer's generated token ids (without the stop
    token): the answer text is their decoding with surrounding whitespace stripped, which does not
    always encode back to them.
    """
    import torch

    device = next(model.parameters()).device
    encoded = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
        for c in conversations
    ]
    encoded = [e["input_ids"] if isinstance(e, dict) else e for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    stop_ids = torch.tensor(sorted({pad_id, *(eos if isinstance(eos, list) else [eos])}))
    # group by equal sample counts so k is uniform inside a batch
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(num_samples[i], []).append(i)
    for k, idxs in sorted(groups.items()):
        per_batch = max(1, batch_size // k)
        for b in range(0, len(idxs), per_batch):
            batch = idxs[b : b + per_batch]
            if todo is not None and not any(i in todo for i in batch):
                continue
            with torch.inference_mode():
                new = decode(model, [encoded[i] for i in batch], pad_id, k, params, stop_ids.to(device),
                             seed * 1_000_003 + b,
                             None if adapter_names is None else [adapter_names[i] for i in batch]).cpu()
            answers, counts, ids = [], [], []
            for r in range(len(batch)):
                texts, toks, seqs = [], [], []
                for j in range(k):
                    seq = new[r * k + j]
                    stop = torch.isin(seq, stop_ids)
                    n = int(stop.nonzero()[0]) + 1 if stop.any() else len(seq)
                    toks.append(n)
                    texts.append(tokenizer.decode(seq[:n], skip_special_tokens=True).strip())
                    seqs.append(seq[: n - 1 if stop.any() else n].tolist())
                answers.append(texts)
                counts.append(toks)
                ids.append(seqs)
            on_batch(batch, answers, counts)
            if on_ids is not None:
                on_ids(batch, ids)


class TransformersGenerator:
    """A loaded transformers model (a PEFT model too) as a generation backend."""

    def __init__(self, model):
        self.model = model

    def generate_answers(self, tokenizer, conversations: Sequence[list[dict]], params: GenParams,
                         num_samples: Sequence[int], batch_size: int, seed: int,
                         on_batch: Callable[[list[int], list[list[str]], list[list[int]]], None],
                         todo: Collection[int] | None = None, adapter_names: Sequence[str] | None = None) -> None:
        generate_answers(self.model, tokenizer, conversations, params, num_samples, batch_size, seed, on_batch, todo,
                         adapter_names)


def load(model_path: str, dtype: str, trust_remote_code: bool = False, seed: int = 0) -> TransformersGenerator:
    """The model on this process's device; the seed goes to each `generate_answers` call instead."""
    from cfdpo import dist
    from cfdpo.models import load_model

    return TransformersGenerator(load_model(model_path, dtype, trust_remote_code).to(dist.device()))
