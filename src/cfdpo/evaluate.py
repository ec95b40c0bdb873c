"""Evaluation on held-out prompts: behaviour score, answer length and capability retention.

Models: `base`, `prompted` (the base model given the treatment instruction; for a negative-only
behaviour, the base model with the negative instruction removed) and every trained adapter found
under `adapters/`. Each answers the held-out prompts under the control prompt and, where the
behaviour has one, under the negative prompt. `nll_ratio` is the mean per-token NLL of the base
model's held-out control answers under a model divided by the base model's own.

With `evaluation.mcq`, every model also answers the builtin multiple-choice set (`data/mcq.jsonl`)
the way evaluation harnesses do: the option with the highest log-likelihood given
"Question: ...\nAnswer:" wins (`mcq_accuracy`; `mcq_accuracy_norm` divides by the option's
length in characters, leading space included). The `prompted` model gets the treatment
instruction before the question. Results are cached in `eval/mcq.json`.

With `evaluation.lm_eval` (extra `cfdpo[lmeval]`), every model also runs those lm-eval tasks
through lm-eval's own harness (the loaded model handed to its `HFLM`; `prompted` gets the treatment
as lm-eval's system instruction); each task's metrics go to `lm_eval` in metrics.json, cached in
`eval/lm_eval.json`. Hub tasks need a hub; tasks in `include_path` YAML files run offline.

Answers are cached in `eval/answers.jsonl` (same keys and resume rules as generation).
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path

from cfdpo import counterfactual, variants
from cfdpo.errors import CfdpoError
from cfdpo.generate import GenParams, cache_kwarg, pad_batch, plan_rows, resolve_dtype, run_generation
from cfdpo.runio import JsonlLog, read_json, write_json
from cfdpo.scorers import make_scorer
from cfdpo.scorers.base import words
from cfdpo.spec import Behaviour, Recipe


def prompted_messages(prompt: str, condition: str, b: Behaviour) -> list[dict]:
    """The 'teacher': the instruction given at inference time."""
    if b.treatment is None:  # negative-only behaviour: the ideal is the prompt without the bad instruction
        return counterfactual.messages(prompt, "control", b)
    if condition == "control":
        return counterfactual.messages(prompt, "treatment", b)
    msgs = counterfactual.messages(prompt, "negative", b)
    if b.placement == "system":
        msgs[0] = {"role": "system", "content": f"{b.treatment}\n\n{msgs[0]['content']}"}
    else:
        msgs[-1] = {"role": "user", "content": f"{b.treatment}\n\n{msgs[-1]['content']}"}
    return msgs


def find_adapters(run_dir: Path, names: list[str] | None = None) -> dict[str, Path]:
    root = run_dir / "adapters"
    found = {}
    for name in names or variants.TRAINED_ORDER:
        d = root / name
        if (d / "adapter_config.json").is_file():
            found[name] = d
    return found


def adapter_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("adapter_*")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def summarise(answers: list[str], scores: list[float]) -> dict:
    n = len(answers)
    return {
        "score": sum(scores) / n if n else None,
        "mean_words": sum(len(words(a)) for a in answers) / n if n else None,
        "n": n,
    }


def mean_nll(model, tokenizer, conversations: list[list[dict]], answers: list[str], batch_size: int = 8) -> float:
    """Token-weighted mean NLL of `answers` given `conversations` under `model`."""
    import torch

    device = next(model.parameters()).device
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
        items.append((full_ids, len(prompt_ids)))
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id or 0
    items.sort(key=lambda x: len(x[0]))
    for b in range(0, len(items), batch_size):
        batch = items[b : b + batch_size]
        width = max(len(x[0]) for x in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, (full, plen) in enumerate(batch):
            ids[r, : len(full)] = torch.tensor(full)
            mask[r, : len(full)] = 1
            labels[r, plen : len(full)] = torch.tensor(full[plen:])
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = labels[:, 1:].to(device)
        valid = tgt != -100
        picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total += float(-(picked * valid).sum())
        count += int(valid.sum())
    return total / count if count else math.nan


def load_mcq(n: int | None = None) -> list[dict]:
    """The builtin multiple-choice set: [{id, category, question, choices[4], answer}], first `n` items."""
    text = (resources.files("cfdpo") / "data" / "mcq.jsonl").read_text(encoding="utf-8")
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return items[:n] if n else items


def mcq_context(item: dict, instruction: str | None = None) -> str:
    text = f"Question: {item['question']}\nAnswer:"
    return f"{instruction}\n\n{text}" if instruction else text


def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """Sum of log-probs of each continuation's tokens given its context (lm-eval's loglikelihood).

    The continuation's tokens are those of tokenize(context + continuation) past tokenize(context).
    Rows are left-padded so only the last positions' logits are computed.
    """
    import torch

    device = next(model.parameters()).device
    items = []
    for i, (ctx, cont) in enumerate(pairs):
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        full = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"]
        n_cont = min(max(1, len(full) - len(ctx_ids)), len(full) - 1)  # the first token has no prediction
        items.append((i, full, n_cont))
    out = [0.0] * len(pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items.sort(key=lambda x: len(x[1]))
    for b in range(0, len(items), batch_size):
        batch = items[b : b + batch_size]
        width = max(len(x[1]) for x in batch)
        keep = max(x[2] for x in batch) + 1
        ids, mask = pad_batch([x[1] for x in batch], pad)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits[:, -keep:-1], dim=-1)  # predicts the last keep-1 tokens
        tgt = ids[:, width - keep + 1 :].to(device)
        picked = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        for r, (i, _, n_cont) in enumerate(batch):
            out[i] = float(picked[r, picked.shape[1] - n_cont :].sum())
    return out


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


def lm_eval_check(spec) -> None:
    """Fail early, in one line, when lm-eval is missing or a task is unknown."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CfdpoError("evaluation.lm_eval needs lm-eval: pip install 'cfdpo[lmeval]'") from None
    if spec.include_path and not Path(spec.include_path).is_dir():
        raise CfdpoError(f"evaluation.lm_eval.include_path: {spec.include_path} is not a folder")
    known = set(TaskManager(include_path=spec.include_path, verbosity="ERROR").all_tasks)
    unknown = [t for t in spec.tasks if t not in known]
    if unknown:
        raise CfdpoError(f"evaluation.lm_eval.tasks: unknown lm-eval task '{unknown[0]}'")


def lm_eval_scores(model, tokenizer, spec, instruction: str | None, batch_size: int) -> dict:
    """lm-eval's results for one loaded model: {task: {metric: value}} (stderr entries dropped)."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = simple_evaluate(model=lm, tasks=list(spec.tasks), limit=spec.limit, num_fewshot=spec.num_fewshot,
                          system_instruction=instruction, log_samples=False, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=spec.include_path, verbosity="ERROR"))
    return {task: {k.split(",")[0]: v for k, v in m.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for task, m in res["results"].items()}


def evaluate_run(run_dir: str | Path, recipe: Recipe, model_path: str, eval_prompts: list[dict]) -> dict:
    from cfdpo.models import load_model, load_tokenizer, model_id

    run = Path(run_dir)
    b = recipe.behaviour
    ev = recipe.evaluation
    scorer = make_scorer(b.scorer.name, b.scorer.params)
    conditions = ["control"] + (["negative"] if b.negative else [])
    params = GenParams(ev.max_new_tokens, ev.temperature, ev.top_p)
    seed = recipe.generation.seed if ev.temperature > 0 else 0  # greedy answers do not depend on the seed
    if ev.lm_eval:
        lm_eval_check(ev.lm_eval)
    adapters = find_adapters(run)
    base_id = model_id(model_path)
    dtype = resolve_dtype(recipe.generation.dtype, purpose="evaluate")

    state: dict = {}

    def loaded():
        if "model" not in state:
            tok = load_tokenizer(model_path, recipe.trust_remote_code)
            tok.padding_side = "left"
            model = load_model(model_path, dtype, recipe.trust_remote_code)
            if adapters:
                from peft import PeftModel

                names = list(adapters)
                model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
                for n in names[1:]:
                    model.load_adapter(str(adapters[n]), adapter_name=n)
                model.eval()
            state.update(model=model, tok=tok)
        return state["model"], state["tok"]

    def use(label: str):
        model, tok = loaded()
        if adapters:
            if label in adapters:
                model.base_model.enable_adapter_layers()
                model.set_adapter(label)
            else:
                model.base_model.disable_adapter_layers()
        return model, tok

    log = JsonlLog(run / "eval" / "answers.jsonl")
    labels = ["base", "prompted", *adapters]
    tags = {label: adapter_hash(adapters[label]) if label in adapters else "-" for label in labels}
    rows_by: dict[tuple[str, str], list[dict]] = {}
    for label in labels:
        for cond in conditions:
            mid = f"{base_id}|{label}|{tags[label]}"
            rows = plan_rows(eval_prompts, [cond], b, 1, mid, params, seed, extra={"model_label": label})
            if label == "prompted":
                for r in rows:
                    r["messages"] = prompted_messages(r["prompt"], cond, b)
                    r["key"] = r["key"] + "p"
            rows_by[(label, cond)] = rows
        # every condition of one model in the same batches: fewer, fuller decode steps
        run_generation([r for cond in conditions for r in rows_by[(label, cond)]], log,
                       lambda label=label: use(label), batch_size=ev.batch_size, seed=seed, label=f"eval {label}")
    done = {r["key"]: r for r in log.rows}

    base_ctrl = [done[r["key"]] for r in rows_by[("base", "control")]]
    base_answers = [r["answer"] for r in base_ctrl]
    models: dict[str, dict] = {}
    nll_base = None
    for label in labels:
        entry: dict = {}
        for cond in conditions:
            answers = [done[r["key"]]["answer"] for r in rows_by[(label, cond)]]
            entry[cond] = summarise(answers, scorer.score_many(answers))
        convs = [r["messages"] for r in rows_by[(label, "control")]]
        model, tok = use(label)
        nll = mean_nll(model, tok, convs, base_answers, batch_size=ev.batch_size)
        if label == "base":
            nll_base = nll
        entry["nll"] = nll
        models[label] = entry
    for entry in models.values():
        entry["nll_ratio"] = entry["nll"] / nll_base if nll_base else None
    if ev.mcq:
        items = load_mcq(ev.mcq_items)
        cache_path = run / "eval" / "mcq.json"
        cache = read_json(cache_path) if cache_path.is_file() else {}
        for label in labels:
            instruction = b.treatment if label == "prompted" else None
            key = hashlib.sha256(json.dumps([base_id, label, tags[label], instruction, [it["id"] for it in items]])
                                 .encode()).hexdigest()[:24]
            if key not in cache:
                model, tok = use(label)
                cache[key] = mcq_accuracy(model, tok, items, instruction, ev.batch_size)
                write_json(cache_path, cache)
            models[label]["mcq_accuracy"] = cache[key]["accuracy"]
            models[label]["mcq_accuracy_norm"] = cache[key]["accuracy_norm"]
            models[label]["mcq_n"] = cache[key]["n"]
    if ev.lm_eval:
        cache_path = run / "eval" / "lm_eval.json"
        cache = read_json(cache_path) if cache_path.is_file() else {}
        for label in labels:
            instruction = b.treatment if label == "prompted" else None
            key = hashlib.sha256(json.dumps([base_id, label, tags[label], instruction, ev.lm_eval.model_dump(mode="json")])
                                 .encode()).hexdigest()[:24]
            if key not in cache:
                model, tok = use(label)
                cache[key] = lm_eval_scores(model, tok, ev.lm_eval, instruction, ev.batch_size)
                write_json(cache_path, cache)
            models[label]["lm_eval"] = cache[key]
    metrics = {
        "behaviour": {"name": b.name, "scorer": b.scorer.name, "desired": b.scorer.desired, "unit": scorer.unit},
        "conditions": conditions,
        "n_eval_prompts": len(eval_prompts),
        "eval_prompt_ids": [p["id"] for p in eval_prompts],
        "models": models,
    }
    write_json(run / "metrics.json", metrics)
    return metrics
