"""The steering-vector baseline: the base model with a fixed vector added to one layer's residual stream.

The vector is the contrastive activation addition (CAA) kind: from the run's own training answers
(answers.jsonl), each given the control conversation x_c, the mean over answers of the mean output of
decoder layer L over the answer's tokens, for the desired answers minus the undesired ones:
v_L = mean(h_L | x_c, y_desired) - mean(h_L | x_c, y_undesired). Desired and undesired follow the
conditions the run generated (`contrast`): treatment vs negative; with one instruction's answers,
those vs the control answers. One forward pass over the answers gives every layer's
vector (hooks on the decoder layers, not `output_hidden_states`, whose last entry is after the final
norm), and each layer's mean residual norm over the same answer tokens.

At inference a forward hook on layer L adds strength x (mean residual norm of L) x v_L / |v_L| to the
layer's output at every position, prompt and answer tokens alike: strength is in units of the layer's
own activation size, so one grid fits any model.

Unset `evaluation.steering` fields are chosen on the validation prompts (`Run.validation_prompts`),
asked as the control conversation: each (layer, strength) of `grid_points` answers them and has its
KL(base || model) per answer token estimated on a few answers base sampled to the first of them
(`cfdpo.capability`, as `dpo.auto`'s guard does); among the points whose share of degenerate answers
(empty or repetitive, `scorecard.drift`) is at most base's plus `DEGENERATE_MARGIN` and whose KL is
within `dpo.max_kl`, the best behaviour score wins (`pick`).
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cfdpo import counterfactual, scorecard
from cfdpo.capability import kl_sample_params, kl_summary, sample_answer_ids
from cfdpo.errors import CfdpoError
from cfdpo.generate import GenParams, row_key, run_generation
from cfdpo.runio import JsonlLog, read_json, write_json
from cfdpo.spec import Behaviour, SteeringSpec

GRID_DEPTHS = (0.25, 0.5, 0.75)  # layers tried: these fractions of the model's depth
GRID_STRENGTHS = (0.125, 0.25, 0.5, 1.0)  # strengths tried, in units of the layer's mean residual norm
# a grid point may answer at most this share more of the validation prompts degenerately than base
# (with the default 8 validation prompts: not one answer more)
DEGENERATE_MARGIN = 0.1


def contrast(generated: list[str]) -> tuple[str, str]:
    """(desired, undesired): the conditions of the training answers the vector is made from, given the
    conditions generation answered (`Recipe.needed_conditions`): treatment vs negative when both were
    answered, else the one instruction's answers vs the control answers."""
    if "treatment" in generated and "negative" in generated:
        return "treatment", "negative"
    return ("treatment", "control") if "treatment" in generated else ("control", "negative")


def decoder_layers(model):
    """The decoder layers of a transformers causal LM (a PEFT model's base model's)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder().layers


def layer_count(model_path: str, trust_remote_code: bool = False) -> int:
    """The number of decoder layers, from the model's config alone (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)


def check_spec(spec: SteeringSpec, n_layers: int, n_validation: int) -> None:
    """One-line errors, before any decoding: a layer the model lacks, or nothing to choose on."""
    if spec.layer is not None and spec.layer >= n_layers:
        raise CfdpoError(f"evaluation.steering.layer: {spec.layer} is out of range; the model has {n_layers} "
                         f"decoder layers (0 to {n_layers - 1})")
    if (spec.layer is None or spec.strength is None) and n_validation == 0:
        raise CfdpoError("evaluation.steering: layer and strength are chosen on the validation prompts, but the "
                         "prompt set has none left; set prompts.validation_size, or give both layer and strength")


def grid_points(n_layers: int, spec: SteeringSpec) -> list[tuple[int, float]]:
    """The (layer, strength) pairs to try: the recipe's where given, else the default grid."""
    layers = [spec.layer] if spec.layer is not None else sorted({min(n_layers - 1, int(n_layers * f)) for f in GRID_DEPTHS})
    strengths = [spec.strength] if spec.strength is not None else list(GRID_STRENGTHS)
    return [(layer, strength) for layer in layers for strength in strengths]


def layer_outputs(output):
    """The hidden states of a decoder layer's output (a tensor, or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple) else output


def add_to_layer(model, layer: int, delta):
    """Register a forward hook that adds `delta` (a hidden-size vector) to the output of decoder layer
    `layer` at every position; returns its handle (`.remove()` undoes it)."""

    def hook(module, args, output):
        hidden = layer_outputs(output)
        moved = hidden + delta.to(device=hidden.device, dtype=hidden.dtype)
        return (moved, *output[1:]) if isinstance(output, tuple) else moved

    return decoder_layers(model)[layer].register_forward_hook(hook)


@contextmanager
def steered(model, layer: int, delta):
    """`add_to_layer` for the duration of a `with` block."""
    handle = add_to_layer(model, layer, delta)
    try:
        yield model
    finally:
        handle.remove()


def answer_activations(model, tokenizer, conversations: list[list[dict]], answers: list[str],
                       batch_size: int = 8) -> tuple:
    """(means, residual_norms): per answer and decoder layer, the mean layer output over the answer's
    tokens (a tensor [answers, layers, hidden]); per layer, the mean residual-stream norm over all
    answers' tokens (a tensor [layers]). Each answer follows its conversation's chat template with the
    generation prompt; its tokens are the answer text's own."""
    import torch

    layers = decoder_layers(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = []
    for conv, answer in zip(conversations, answers):
        prompt_ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        prompt_ids = list(prompt_ids["input_ids"] if isinstance(prompt_ids, dict) else prompt_ids)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        items.append((prompt_ids + answer_ids, len(prompt_ids)))
    batch_means: list = [None] * len(layers)  # per layer: this batch's [rows, hidden] answer means
    norm_sums = torch.zeros(len(layers))
    weights = None  # this batch's answer-token mask, [rows, width, 1]

    def reduce(index):  # each layer's output reduced as it is made: no [layers, tokens, hidden] copy is kept
        def hook(module, args, output):
            hidden = layer_outputs(output).float()
            batch_means[index] = ((hidden * weights).sum(1) / weights.sum(1)).cpu()
            norm_sums[index] += float((hidden.norm(dim=-1) * weights[..., 0]).sum())
        return hook

    handles = [layer.register_forward_hook(reduce(i)) for i, layer in enumerate(layers)]
    means, n_tokens = [], 0
    try:
        for b in range(0, len(items), batch_size):
            batch = items[b : b + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            answer_mask = torch.zeros((len(batch), width, 1))
            for row, (seq, start) in enumerate(batch):  # right-padded: every real token keeps its position
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                answer_mask[row, start : len(seq)] = 1
            weights = answer_mask.to(device)
            with torch.inference_mode():
                model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
            means.append(torch.stack(batch_means, 1))
            n_tokens += int(answer_mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(means), norm_sums / n_tokens


@dataclass(frozen=True)
class SteeringVectors:
    """Every layer's raw mean difference (desired - undesired) and mean residual norm, and what they
    were made from: `key` hashes the model id and the (conversation, answer) pairs."""

    key: str
    conditions: tuple[str, str]
    n_answers: tuple[int, int]
    vectors: list[list[float]]
    residual_norms: list[float]

    def delta(self, layer: int, strength: float):
        """The vector added to `layer`'s output: strength x mean residual norm x the unit direction."""
        import torch

        direction = torch.tensor(self.vectors[layer])
        return direction * (strength * self.residual_norms[layer] / direction.norm())


def contrast_answers(rows: list[dict], behaviour: Behaviour,
                     conditions: tuple[str, str]) -> tuple[list[tuple[list[dict], str]], list[tuple[list[dict], str]]]:
    """The (control conversation, answer) pairs of the desired and of the undesired training answers
    (`conditions`; non-empty answers, in the order of `rows`; rows of older runs name their condition `variant`)."""
    desired, undesired = conditions
    split: dict[str, list] = {desired: [], undesired: []}
    for row in rows:
        condition = row.get("condition", row.get("variant"))
        if condition in split and row.get("answer", "").strip():
            conv = counterfactual.messages(row["prompt"], "control", behaviour)
            split[condition].append((conv, row["answer"]))
    return split[desired], split[undesired]


def steering_vectors(model, tokenizer, model_id: str, behaviour: Behaviour, conditions: tuple[str, str],
                     train_rows: list[dict], cache: Path, batch_size: int) -> SteeringVectors:
    """Every layer's steering vector from the training answers of `conditions` (desired, undesired);
    cached in `cache` under their key."""
    desired, undesired = contrast_answers(train_rows, behaviour, conditions)
    if not desired or not undesired:
        raise CfdpoError(f"evaluation.baselines: steering needs {conditions[0]} and {conditions[1]} answers in "
                         "answers.jsonl; run `cfdpo generate` first")
    key = hashlib.sha256(json.dumps([model_id, desired, undesired], ensure_ascii=False).encode()).hexdigest()[:24]
    saved = read_json(cache) if cache.is_file() else {}
    if saved.get("key") != key:
        pairs = desired + undesired
        means, norms = answer_activations(model, tokenizer, [c for c, _ in pairs], [a for _, a in pairs], batch_size)
        diff = means[: len(desired)].mean(0) - means[len(desired) :].mean(0)
        saved = {"key": key, "model": model_id, "conditions": list(conditions),
                 "n_answers": [len(desired), len(undesired)], "vectors": diff.tolist(),
                 "residual_norms": norms.tolist()}
        write_json(cache, saved)
    return SteeringVectors(key, conditions, tuple(saved["n_answers"]), saved["vectors"], saved["residual_norms"])


def degenerate_share(answers: list[str]) -> float:
    """The share of empty or repetitive answers (`scorecard.drift`)."""
    d = scorecard.drift(answers)
    return d["empty_share"] + d["repeated_share"] if d["n"] else 0.0


def qualifies(point: dict, base_degenerate: float, max_kl: float, margin: float = DEGENERATE_MARGIN) -> bool:
    """Whether a grid point may be picked: `degenerate_share` <= base's + `margin`, `kl_per_token` <= `max_kl`."""
    return point["degenerate_share"] <= base_degenerate + margin + 1e-9 and point["kl_per_token"] <= max_kl


def pick(grid: list[dict], base_degenerate: float, desired: str, max_kl: float,
         margin: float = DEGENERATE_MARGIN) -> dict:
    """The grid point to use: among those with `degenerate_share` <= base's + `margin` and
    `kl_per_token` <= `max_kl`, the best `score` (highest or lowest as `desired` says; on a tie the
    smaller strength, then the earlier point); when none qualifies, the one with the smallest KL (then
    the least degenerate, then the best score)."""
    sign = -1.0 if desired == "higher" else 1.0
    allowed = [p for p in grid if qualifies(p, base_degenerate, max_kl, margin)]
    if allowed:
        return min(allowed, key=lambda p: (sign * p["score"], p["strength"]))
    return min(grid, key=lambda p: (p["kl_per_token"], p["degenerate_share"], sign * p["score"], p["strength"]))


@dataclass(frozen=True)
class SteeringChoice:
    """The steering model: its vectors, the layer and strength used, and how they were chosen."""

    vectors: SteeringVectors
    layer: int
    strength: float
    grid: list[dict] = field(default_factory=list)  # every point tried on the validation prompts, base first
    n_validation: int = 0
    max_kl: float | None = None  # the KL bound the grid was held to (None: not chosen on a grid)
    qualified: bool | None = None  # whether the pick met it and the degenerate-answer margin (`qualifies`)

    @property
    def tag(self) -> str:
        """The model's identity in answer and cache keys: the vectors, the layer and the strength."""
        return hashlib.sha256(json.dumps([self.vectors.key, self.layer, self.strength]).encode()).hexdigest()[:16]

    def delta(self):
        return self.vectors.delta(self.layer, self.strength)

    def record(self) -> dict:
        """What metrics.json keeps of the choice."""
        return {"layer": self.layer, "strength": self.strength,
                "strength_unit": "mean residual norm of the layer",
                "residual_norm": self.vectors.residual_norms[self.layer],
                "contrast": list(self.vectors.conditions), "n_answers": list(self.vectors.n_answers),
                "chosen_on": f"{self.n_validation} validation prompts" if self.grid else "the recipe",
                "degenerate_margin": DEGENERATE_MARGIN, "max_kl": self.max_kl,
                "qualified": self.qualified, "grid": self.grid}


def validation_rows(model_name: str, prompts: list[dict], behaviour: Behaviour, params: GenParams, seed: int) -> list[dict]:
    """The answer rows of one grid point (or base) on the validation prompts' control conversation."""
    rows = []
    for p in prompts:
        msgs = counterfactual.messages(p["prompt"], "control", behaviour)
        rows.append({"key": row_key(model_name, msgs, params, 0, seed), "prompt_id": p["id"], "prompt": p["prompt"],
                     "condition": "control", "sample": 0, "sampled": False, "messages": msgs, "model": model_name,
                     "gen": params.as_dict(), "seed": seed})
    return rows


def grid_kl(model, tokenizer, model_id: str, conversations: list[list[dict]], params: GenParams, seed: int,
            choices: list[SteeringChoice], cache: Path, batch_size: int) -> list[float]:
    """Per choice: KL(base || model with its hook on) per answer token (`kl_summary`) on one answer per
    conversation that base samples (`sample_answer_ids`, hook off). Base's answers and log-probs and
    each choice's KL (by its tag) are cached in `cache` under a key of what base's answers depend on."""
    from cfdpo.likelihood import answer_token_logprobs

    key = hashlib.sha256(json.dumps([model_id, conversations, params.as_dict(), seed], ensure_ascii=False)
                         .encode()).hexdigest()[:24]
    saved = read_json(cache) if cache.is_file() else {}
    if saved.get("key") != key:
        answer_ids = sample_answer_ids(model, tokenizer, conversations, params, seed, batch_size)
        saved = {"key": key, "answer_ids": answer_ids,
                 "base_logprobs": answer_token_logprobs(model, tokenizer, conversations, answer_ids, batch_size),
                 "kl_per_token": {}}
        write_json(cache, saved)
    for choice in choices:
        if choice.tag not in saved["kl_per_token"]:
            with steered(model, choice.layer, choice.delta()):
                logprobs = answer_token_logprobs(model, tokenizer, conversations, saved["answer_ids"], batch_size)
            saved["kl_per_token"][choice.tag] = kl_summary(saved["base_logprobs"], logprobs)["kl_per_token"]
            write_json(cache, saved)
    return [saved["kl_per_token"][choice.tag] for choice in choices]


def choose(model, tokenizer, model_id: str, recipe, train_rows: list[dict], validation_prompts: list[dict], scorer,
           params: GenParams, seed: int, eval_dir: Path, batch_size: int) -> SteeringChoice:
    """The steering model for `recipe.evaluation.steering`: the vectors (cached in eval/steering.json)
    and, for what the recipe leaves unset, the grid on the validation prompts (answers cached in
    eval/steering_answers.jsonl, KL in eval/steering_kl.json), held to `dpo.max_kl`."""
    from cfdpo.backends.transformers import TransformersGenerator
    from cfdpo.validation import KL_ANSWERS

    b, spec = recipe.behaviour, recipe.evaluation.steering
    vectors = steering_vectors(model, tokenizer, model_id, b, contrast(recipe.needed_conditions()), train_rows,
                               eval_dir / "steering.json", batch_size)
    points = grid_points(len(decoder_layers(model)), spec)
    if len(points) == 1:
        return SteeringChoice(vectors, *points[0])
    log = JsonlLog(eval_dir / "steering_answers.jsonl")

    def answer(name: str, label: str) -> list[str]:
        rows = validation_rows(name, validation_prompts, b, params, seed)
        run_generation(rows, log, lambda: (TransformersGenerator(model), tokenizer), batch_size=batch_size, seed=seed,
                       label=label)
        done = {r["key"]: r["answer"] for r in log.rows}
        return [done[r["key"]] for r in rows]

    def scored(answers: list[str]) -> dict:
        scores = scorer.score_many(answers)
        return {"score": sum(scores) / len(scores) if scores else math.nan, "degenerate_share": degenerate_share(answers)}

    max_kl = recipe.dpo.max_kl
    base = {"layer": None, "strength": 0.0, **scored(answer(f"{model_id}|base|-", "steering grid: base")),
            "kl_per_token": 0.0, "within_bound": True}
    choices = [SteeringChoice(vectors, layer, strength) for layer, strength in points]
    kl_conversations = [counterfactual.messages(p["prompt"], "control", b) for p in validation_prompts[:KL_ANSWERS]]
    kls = grid_kl(model, tokenizer, model_id, kl_conversations, kl_sample_params(params.max_new_tokens),
                  recipe.generation.seed, choices, eval_dir / "steering_kl.json", batch_size)
    grid = []
    for choice, kl in zip(choices, kls):
        with steered(model, choice.layer, choice.delta()):
            answers = answer(f"{model_id}|steering|{choice.tag}",
                             f"steering grid: layer {choice.layer} x{choice.strength}")
        grid.append({"layer": choice.layer, "strength": choice.strength, **scored(answers), "kl_per_token": kl,
                     "within_bound": kl <= max_kl})
    best = pick(grid, base["degenerate_share"], b.scorer.desired, max_kl)
    return SteeringChoice(vectors, best["layer"], best["strength"], [base, *grid], len(validation_prompts),
                          max_kl, qualifies(best, base["degenerate_share"], max_kl))
