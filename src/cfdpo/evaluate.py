"""Evaluation on held-out prompts: the scorecard (behaviour under every condition, in-scope retention,
capability, drift) plus today's per-model summaries.

Models: `base`, `prompted` (the base model given the treatment instruction; for a negative-only
behaviour, the base model with the negative instruction removed) and every trained adapter found
under `adapters/`, and with `evaluation.baselines: [steering]` the `steering` model (the base model
with a steering vector added to one layer, see `cfdpo.steering`; its choice of layer and strength goes
to metrics.json under the model's `steering`). Each answers every condition of
`scorecard.plan_conditions(recipe)` on that condition's prompts (`scorecard.condition_prompts`): one
answer per prompt at `evaluation.temperature` (greedy by default) and `evaluation.samples_per_prompt`
more at `generation.temperature` / `top_p`, seeded with `generation.seed`. A prompt's score is the
mean over its answers; per condition the model gets `stats.summary` over prompts and `stats.paired` against base, in-scope conditions also a
retention (`scorecard.retention`), and the paraphrase and placement conditions of the headline
instruction are pooled per prompt (`scorecard.group_entries`). `drift` covers the main control answers.
`capability` holds KL(base || model) on base's sampled answers (see `cfdpo.capability`) and the MCQ
accuracy with its standard error. `nll_ratio` (secondary) is the mean per-token NLL of those same
sampled answers under a model divided by the base model's own (from the KL pass's log-probs: no pass
of its own; None without KL prompts).

With `evaluation.mcq`, every model also answers the builtin multiple-choice set by option
log-likelihood (`mcq_accuracy`, `mcq_accuracy_norm`; see `likelihood.mcq_accuracy`). The `prompted`
model gets the treatment instruction before the question. Results are cached in `eval/mcq.json`.

With `evaluation.lm_eval` (extra `cfdpo[lmeval]`), every model also runs those lm-eval tasks
through lm-eval's own harness (the loaded model handed to its `HFLM`; `prompted` gets the treatment
as lm-eval's system instruction); each task's metrics go to `lm_eval` in metrics.json, cached in
`eval/lm_eval.json`. Hub tasks need a hub; tasks in `include_path` YAML files run offline.

Answers are cached in `eval/answers.jsonl` (same keys and resume rules as generation; sampled rows
carry `"sampled": true`), the KL answers and log-probs in `eval/kl.json` and `eval/kl_logprobs.json`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cfdpo import counterfactual, scorecard, stats, steering, variants
from cfdpo.backends.transformers import TransformersGenerator
from cfdpo.capability import answer_nll, kl_prompt_rows, kl_sample_params, kl_summary, mcq_summary, sample_answer_ids
from cfdpo.errors import CfdpoError
from cfdpo.generate import GenParams, answers_path, row_key, run_generation
from cfdpo.likelihood import answer_token_logprobs, load_mcq, mcq_accuracy
from cfdpo.recipe import Recipe
from cfdpo.runio import JsonlLog, read_json, write_json
from cfdpo.runtime import resolve_dtype
from cfdpo.scorecard import Condition
from cfdpo.scorers import make_scorer
from cfdpo.scorers.base import words
from cfdpo.spec import Behaviour, LmEvalSpec

LEGACY_CONDITIONS = ("control", "negative")  # summarised under their own key per model, as before the scorecard


def prompted_messages(prompt: str, condition: Condition, b: Behaviour, prompt_id: str | None = None,
                      seed: int = 0) -> list[dict]:
    """The 'teacher': the condition's conversation with the treatment instruction added (the one
    `Behaviour.instruction_for` draws for the prompt when there are several); for a negative-only
    behaviour, the conversation without the condition's instruction."""
    if b.treatment is None:  # negative-only behaviour: the ideal is the prompt without the bad instruction
        return counterfactual.conversation(prompt, None, condition.placement, condition.system_prompt)
    treatment = b.instruction_for("treatment", prompt_id, seed)
    if not condition.instructions:
        return counterfactual.conversation(prompt, treatment, b.placement, condition.system_prompt)
    msgs = condition.messages(prompt, prompt_id, seed)
    if condition.placement == "system":
        msgs[0] = {"role": "system", "content": f"{treatment}\n\n{msgs[0]['content']}"}
    else:
        msgs[-1] = {"role": "user", "content": f"{treatment}\n\n{msgs[-1]['content']}"}
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
    """The adapter's identity in answer keys: its config written canonically (PEFT writes
    `target_modules` from a set, in an order that differs between processes) and its weights."""
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8"))
    for f in sorted(path.glob("adapter_model*")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def summarise(answers: list[str], scores: list[float]) -> dict:
    n = len(answers)
    return {
        "score": sum(scores) / n if n else None,
        "mean_words": sum(len(words(a)) for a in answers) / n if n else None,
        "n": n,
    }


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


class EvalModels:
    """The models under evaluation by label: `base`, `prompted`, `steering` when added and each adapter.
    One copy of the base model carries every adapter; it is loaded on first use and `use(label)` switches
    to the label's (for `steering`: the base model with the steering hook on, for every other label off)."""

    def __init__(self, model_path: str, recipe: Recipe, adapters: dict[str, Path]):
        from cfdpo.models import model_id

        self.model_path = model_path
        self.recipe = recipe
        self.adapters = adapters
        self.base_id = model_id(model_path)
        self.labels = ["base", "prompted", *adapters]
        self.tags = {label: adapter_hash(adapters[label]) if label in adapters else "-" for label in self.labels}
        self.loaded: tuple | None = None
        self.steering = None  # the steering.SteeringChoice of the `steering` label, once added
        self.hook = None  # the steering hook's handle while `steering` is in use

    def add_steering(self, choice) -> None:
        """Add the `steering` label (after `prompted`): the base model with `choice`'s vector added."""
        self.steering = choice
        self.labels.insert(2, "steering")
        self.tags["steering"] = choice.tag

    def model_name(self, label: str) -> str:
        """The model's name in answer rows (and so in their cache keys)."""
        return f"{self.base_id}|{label}|{self.tags[label]}"

    def instruction(self, label: str) -> str | None:
        """The instruction the model gets before a multiple-choice question or an lm-eval task."""
        treatments = self.recipe.behaviour.treatments()
        return treatments[0] if label == "prompted" and treatments else None

    def load(self) -> tuple:
        """(model, tokenizer): the base model in the evaluation dtype with every adapter on it, loaded once."""
        if self.loaded is None:
            from cfdpo.models import load_model, load_tokenizer

            trust = self.recipe.trust_remote_code
            tok = load_tokenizer(self.model_path, trust)
            tok.padding_side = "left"
            model = load_model(self.model_path, resolve_dtype(self.recipe.generation.dtype, purpose="evaluate"), trust)
            if self.adapters:
                from peft import PeftModel

                names = list(self.adapters)
                model = PeftModel.from_pretrained(model, str(self.adapters[names[0]]), adapter_name=names[0])
                for name in names[1:]:
                    model.load_adapter(str(self.adapters[name]), adapter_name=name)
                model.eval()
            self.loaded = (model, tok)
        return self.loaded

    def use(self, label: str) -> tuple:
        """(model, tokenizer) with the label's adapter active (none for `base`, `prompted` and `steering`)
        and the steering hook on for `steering` only."""
        model, tok = self.load()
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if label == "steering":
            self.hook = steering.add_to_layer(model, self.steering.layer, self.steering.delta())
        if self.adapters:
            if label in self.adapters:
                model.base_model.enable_adapter_layers()
                model.set_adapter(label)
            else:
                model.base_model.disable_adapter_layers()
        return model, tok

    def generator(self, label: str) -> tuple:
        """(generator, tokenizer) of the transformers backend over the label's model."""
        model, tok = self.use(label)
        return TransformersGenerator(model), tok


@dataclass(frozen=True)
class AnswerPlan:
    """How evaluation answers are drawn: one answer per prompt with `params` (greedy unless
    `evaluation.temperature` is set) and `samples` more at `sample_params`, seeded with `sample_seed`."""

    params: GenParams
    seed: int
    samples: int
    sample_params: GenParams
    sample_seed: int
    draw_seed: int  # the seed paraphrase lists are drawn with (the recipe's generation seed, as in training)


def condition_rows(models: EvalModels, label: str, cond: Condition, prompts: list[dict], plan: AnswerPlan) -> list[dict]:
    """The answer rows of one model under one condition: the main answer of each prompt, then its samples."""
    b = models.recipe.behaviour
    rows = []
    for p in prompts:
        if label == "prompted":
            msgs = prompted_messages(p["prompt"], cond, b, p["id"], plan.draw_seed)
        else:
            msgs = cond.messages(p["prompt"], p["id"], plan.draw_seed)
        draws = [(plan.params, 0, plan.seed, False)]
        draws += [(plan.sample_params, s, plan.sample_seed, True) for s in range(plan.samples)]
        for params, sample, seed, sampled in draws:
            key = row_key(models.model_name(label), msgs, params, sample, seed) + ("p" if label == "prompted" else "")
            rows.append({"key": key, "prompt_id": p["id"], "prompt": p["prompt"], "condition": cond.name,
                         "sample": sample, "sampled": sampled, "messages": msgs, "model": models.model_name(label),
                         "gen": params.as_dict(), "seed": seed, "model_label": label})
    return rows


def plan_answers(models: EvalModels, conditions: list[Condition], prompts_by: dict[str, list[dict]],
                 plan: AnswerPlan) -> dict[tuple[str, str], list[dict]]:
    """The answer rows of every (model label, condition name) on that condition's prompts; the
    `prompted` model's rows carry the treatment instruction (`prompted_messages`) and their own keys."""
    return {(label, cond.name): condition_rows(models, label, cond, prompts_by[cond.name], plan)
            for label in models.labels for cond in conditions}


def decode_answers(models: EvalModels, rows_by: dict[tuple[str, str], list[dict]], log: JsonlLog, batch_size: int,
                   plan: AnswerPlan) -> dict[str, dict]:
    """Generate the rows not yet in `log`, model by model; returns every row with its answer, by key.
    The `prompted` model is the base model: its greedy rows with a conversation base already answered
    (under control it gets the treatment instruction, base's treatment condition) take base's answer."""
    for label in models.labels:
        rows = [r for (row_label, _), planned in rows_by.items() if row_label == label for r in planned]
        if label == "prompted":
            log.append(answers_of_base(rows, log))
        # every condition of one model in the same batches: fewer, fuller decode steps
        for sampled, seed in ((False, plan.seed), (True, plan.sample_seed)):
            run_generation([r for r in rows if r["sampled"] == sampled], log, partial(models.generator, label),
                           batch_size=batch_size, seed=seed, label=f"eval {label}")
    return {r["key"]: r for r in log.rows}


def answers_of_base(rows: list[dict], log: JsonlLog) -> list[dict]:
    """The greedy `rows` of the prompted model not in `log` whose conversation, generation settings and
    seed a base row in `log` shares, each with that base row's answer: the same weights, so the same answer."""
    def same(r: dict) -> str:
        return json.dumps([r["messages"], r["gen"], r["seed"]], sort_keys=True)

    done = log.keys()
    base = {same(r): r for r in log.rows if r.get("model_label") == "base" and not r.get("sampled")}
    return [{**r, "answer": base[same(r)]["answer"], "n_tokens": base[same(r)]["n_tokens"]} for r in rows
            if not r["sampled"] and r["key"] not in done and same(r) in base]


def score_answers(models: EvalModels, rows_by: dict[tuple[str, str], list[dict]], conditions: list[Condition],
                  done: dict[str, dict], scorer, seed: int = 0) -> dict[str, dict]:
    """Per model label: today's summary of its main answers under control and negative, every
    condition's statistics (`scorecard.condition_entry`, vs base) and the drift of its control answers."""
    scored = {}
    for key, rows in rows_by.items():
        answers = [done[r["key"]]["answer"] for r in rows]
        scored[key] = [{**r, "answer": a, "score": s} for r, a, s in zip(rows, answers, scorer.score_many(answers))]
    per_prompt = {key: stats.per_prompt_means(rows, "score") for key, rows in scored.items()}
    entries = {}
    for label in models.labels:
        entry = {}
        for cond in conditions:
            main = [r for r in scored[(label, cond.name)] if not r["sampled"]]
            if cond.name in LEGACY_CONDITIONS:
                entry[cond.name] = summarise([r["answer"] for r in main], [r["score"] for r in main])
        entry["conditions"] = {cond.name: scorecard.condition_entry(cond, per_prompt[(label, cond.name)],
                                                          per_prompt[("base", cond.name)], seed)
                               for cond in conditions}
        entry["groups"] = scorecard.group_entries(conditions, {c.name: per_prompt[(label, c.name)] for c in conditions},
                                        {c.name: per_prompt[("base", c.name)] for c in conditions}, seed)
        entry["drift"] = scorecard.drift([r["answer"] for r in scored[(label, "control")] if not r["sampled"]])
        entries[label] = entry
    return entries


def kl_results(models: EvalModels, path: Path, plan: AnswerPlan, batch_size: int) -> tuple[dict[str, dict], dict]:
    """Per model label: KL(base || model) on base's sampled answers (`kl_sample_params`) to the KL prompts,
    and the mean per-token NLL of those answers under the model (`capability.answer_nll`; None without
    KL prompts); base's answers and every model's log-probs of them are cached in `path`."""
    b = models.recipe.behaviour
    rows = kl_prompt_rows(models.recipe)
    if not rows:
        return {label: kl_summary([], []) for label in models.labels}, {label: None for label in models.labels}
    convs = [counterfactual.conversation(r["prompt"], None, b.placement, b.system_prompt) for r in rows]
    params = kl_sample_params(plan.sample_params.max_new_tokens)
    answers_key = hashlib.sha256(json.dumps([models.base_id, convs, params.as_dict(), plan.sample_seed])
                                 .encode()).hexdigest()[:24]
    cache = read_json(path) if path.is_file() else {}
    if cache.get("answers_key") != answers_key:
        model, tok = models.use("base")
        cache = {"answers_key": answers_key,
                 "answer_ids": sample_answer_ids(model, tok, convs, params, plan.sample_seed, batch_size)}
        write_json(path, cache)
    answer_ids = cache["answer_ids"]

    def logprobs(model, tok, instruction):
        given = [counterfactual.conversation(r["prompt"], instruction, b.placement, b.system_prompt) for r in rows]
        return {"logprobs": answer_token_logprobs(model, tok, given, answer_ids, batch_size)}

    lps = cached_per_model(path.with_name(path.stem + "_logprobs.json"), models, answers_key, logprobs)
    return ({label: kl_summary(lps["base"]["logprobs"], lps[label]["logprobs"]) for label in models.labels},
            {label: answer_nll(lps[label]["logprobs"]) for label in models.labels})


def cached_per_model(path: Path, models: EvalModels, inputs, compute: Callable[..., dict]) -> dict[str, dict]:
    """Per model label: `compute(model, tokenizer, instruction)`, cached in the JSON file `path` under
    a hash of (base model, label, adapter hash, instruction, `inputs`)."""
    cache = read_json(path) if path.is_file() else {}
    results = {}
    for label in models.labels:
        instruction = models.instruction(label)
        key = hashlib.sha256(json.dumps([models.base_id, label, models.tags[label], instruction, inputs])
                             .encode()).hexdigest()[:24]
        if key not in cache:
            model, tok = models.use(label)
            cache[key] = compute(model, tok, instruction)
            write_json(path, cache)
        results[label] = cache[key]
    return results


def mcq_results(models: EvalModels, path: Path, n_items: int, batch_size: int) -> dict[str, dict]:
    items = load_mcq(n_items)
    return cached_per_model(path, models, [it["id"] for it in items],
                            lambda model, tok, instruction: mcq_accuracy(model, tok, items, instruction, batch_size))


def lm_eval_results(models: EvalModels, path: Path, spec: LmEvalSpec, batch_size: int) -> dict[str, dict]:
    return cached_per_model(path, models, spec.model_dump(mode="json"),
                            lambda model, tok, instruction: lm_eval_scores(model, tok, spec, instruction, batch_size))


def assemble_metrics(recipe: Recipe, scorer, conditions: list[Condition], prompts_by: dict[str, list[dict]],
                     entries: dict[str, dict], nlls: dict[str, float | None], kl: dict[str, dict], mcq: dict[str, dict] | None,
                     lm_eval: dict[str, dict] | None) -> dict:
    """metrics.json: per model label its scores per condition (today's `control` / `negative` summaries
    and the scorecard's `conditions`), drift, NLL and NLL ratio to the base model, `capability` (KL,
    MCQ) and the lm-eval results where asked for; `scorecard` lists the conditions."""
    b = recipe.behaviour
    legacy = [cond.name for cond in conditions if cond.name in LEGACY_CONDITIONS]
    eval_prompts = prompts_by["control"]
    models = {}
    for label, entry in entries.items():
        ratio = nlls[label] / nlls["base"] if nlls[label] is not None and nlls["base"] else None
        entry = {**entry, "nll": nlls[label], "nll_ratio": ratio}
        mcq_stats = mcq_summary(mcq[label]["accuracy"], mcq[label]["n"]) if mcq is not None else mcq_summary(None, 0)
        if mcq is not None:
            entry.update(mcq_accuracy=mcq[label]["accuracy"], mcq_accuracy_norm=mcq[label]["accuracy_norm"],
                         mcq_n=mcq[label]["n"])
        entry["capability"] = {**kl[label], **mcq_stats}
        if lm_eval is not None:
            entry["lm_eval"] = lm_eval[label]
        models[label] = entry
    return {
        "behaviour": {"name": b.name, "scorer": b.scorer.name, "desired": b.scorer.desired, "unit": scorer.unit},
        "conditions": legacy,
        "n_eval_prompts": len(eval_prompts),
        "eval_prompt_ids": [p["id"] for p in eval_prompts],
        "scorecard": {
            "conditions": [{"name": c.name, "kind": c.kind, "instruction": " / ".join(c.instructions) or None,
                            "placement": c.placement, "n_prompts": len(prompts_by[c.name])} for c in conditions],
            "instruction_of": scorecard.primary_instruction(conditions),
            "samples_per_prompt": recipe.evaluation.samples_per_prompt,
            "kl_prompts": len(kl_prompt_rows(recipe)),
        },
        "models": models,
    }


def evaluate_run(run_dir: str | Path, recipe: Recipe, model_path: str, eval_prompts: list[dict],
                 validation_prompts: list[dict] | None = None) -> dict:
    """Answer, score and measure every model under every scorecard condition; writes and returns metrics.json.
    `validation_prompts`: where the steering baseline's unset layer and strength are chosen."""
    run = Path(run_dir)
    b = recipe.behaviour
    ev, gen = recipe.evaluation, recipe.generation
    scorer = make_scorer(b.scorer.name, b.scorer.params)
    if ev.lm_eval:
        lm_eval_check(ev.lm_eval)
    if "steering" in ev.baselines:
        steering.check_spec(ev.steering, steering.layer_count(model_path, recipe.trust_remote_code),
                            len(validation_prompts or []))
    conditions = scorecard.plan_conditions(recipe)
    prompts_by = {cond.name: scorecard.condition_prompts(cond, eval_prompts, ev.subset_size) for cond in conditions}
    plan = AnswerPlan(params=GenParams(ev.max_new_tokens, ev.temperature, ev.top_p),
                      seed=gen.seed if ev.temperature > 0 else 0,  # greedy answers do not depend on the seed
                      samples=ev.samples_per_prompt,
                      sample_params=GenParams(ev.max_new_tokens, gen.temperature, gen.top_p),
                      sample_seed=gen.seed, draw_seed=gen.seed)
    models = EvalModels(model_path, recipe, find_adapters(run))
    if "steering" in ev.baselines:
        model, tok = models.use("base")
        models.add_steering(steering.choose(model, tok, models.base_id, recipe, JsonlLog(answers_path(run)).rows,
                                            validation_prompts or [], scorer, plan.params, plan.seed, run / "eval",
                                            ev.batch_size))

    rows_by = plan_answers(models, conditions, prompts_by, plan)
    done = decode_answers(models, rows_by, JsonlLog(run / "eval" / "answers.jsonl"), ev.batch_size, plan)
    entries = score_answers(models, rows_by, conditions, done, scorer)
    kl, nlls = kl_results(models, run / "eval" / "kl.json", plan, ev.batch_size)
    mcq = mcq_results(models, run / "eval" / "mcq.json", ev.mcq_items, ev.batch_size) if ev.mcq else None
    lm_eval = lm_eval_results(models, run / "eval" / "lm_eval.json", ev.lm_eval, ev.batch_size) if ev.lm_eval else None
    metrics = assemble_metrics(recipe, scorer, conditions, prompts_by, entries, nlls, kl, mcq, lm_eval)
    if models.steering is not None:
        metrics["models"]["steering"]["steering"] = models.steering.record()
    write_json(run / "metrics.json", metrics)
    return metrics
