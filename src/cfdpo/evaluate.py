"""Evaluation on held-out prompts: behaviour score, answer length and capability retention.

Models: `base`, `prompted` (the base model given the treatment instruction; for a negative-only
behaviour, the base model with the negative instruction removed) and every trained adapter found
under `adapters/`. Each answers the held-out prompts under the control prompt and, where the
behaviour has one, under the negative prompt. `nll_ratio` is the mean per-token NLL of the base
model's held-out control answers under a model divided by the base model's own.

With `evaluation.mcq`, every model also answers the builtin multiple-choice set by option
log-likelihood (`mcq_accuracy`, `mcq_accuracy_norm`; see `likelihood.mcq_accuracy`). The `prompted`
model gets the treatment instruction before the question. Results are cached in `eval/mcq.json`.

With `evaluation.lm_eval` (extra `cfdpo[lmeval]`), every model also runs those lm-eval tasks
through lm-eval's own harness (the loaded model handed to its `HFLM`; `prompted` gets the treatment
as lm-eval's system instruction); each task's metrics go to `lm_eval` in metrics.json, cached in
`eval/lm_eval.json`. Hub tasks need a hub; tasks in `include_path` YAML files run offline.

Answers are cached in `eval/answers.jsonl` (same keys and resume rules as generation).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

from cfdpo import counterfactual, variants
from cfdpo.backends.transformers import TransformersGenerator
from cfdpo.errors import CfdpoError
from cfdpo.generate import GenParams, plan_rows, run_generation
from cfdpo.likelihood import load_mcq, mcq_accuracy, mean_nll
from cfdpo.recipe import Recipe
from cfdpo.runio import JsonlLog, read_json, write_json
from cfdpo.runtime import resolve_dtype
from cfdpo.scorers import make_scorer
from cfdpo.scorers.base import words
from cfdpo.spec import Behaviour, LmEvalSpec


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
    """The models under evaluation by label: `base`, `prompted` and each adapter. One copy of the base
    model carries every adapter; it is loaded on first use and `use(label)` switches to the label's."""

    def __init__(self, model_path: str, recipe: Recipe, adapters: dict[str, Path]):
        from cfdpo.models import model_id

        self.model_path = model_path
        self.recipe = recipe
        self.adapters = adapters
        self.base_id = model_id(model_path)
        self.labels = ["base", "prompted", *adapters]
        self.tags = {label: adapter_hash(adapters[label]) if label in adapters else "-" for label in self.labels}
        self.loaded: tuple | None = None

    def model_name(self, label: str) -> str:
        """The model's name in answer rows (and so in their cache keys)."""
        return f"{self.base_id}|{label}|{self.tags[label]}"

    def instruction(self, label: str) -> str | None:
        """The instruction the model gets before a multiple-choice question or an lm-eval task."""
        return self.recipe.behaviour.treatment if label == "prompted" else None

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
        """(model, tokenizer) with the label's adapter active (none for `base` and `prompted`)."""
        model, tok = self.load()
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


def plan_answers(models: EvalModels, conditions: list[str], eval_prompts: list[dict], params: GenParams,
                 seed: int) -> dict[tuple[str, str], list[dict]]:
    """The answer rows of every (model label, condition): one answer per held-out prompt; the
    `prompted` model's rows carry the instruction (`prompted_messages`) and their own keys."""
    b = models.recipe.behaviour
    rows_by = {}
    for label in models.labels:
        for cond in conditions:
            rows = plan_rows(eval_prompts, [cond], b, 1, models.model_name(label), params, seed,
                             extra={"model_label": label})
            if label == "prompted":
                for r in rows:
                    r["messages"] = prompted_messages(r["prompt"], cond, b)
                    r["key"] = r["key"] + "p"
            rows_by[(label, cond)] = rows
    return rows_by


def decode_answers(models: EvalModels, rows_by: dict[tuple[str, str], list[dict]], conditions: list[str],
                   log: JsonlLog, batch_size: int, seed: int) -> dict[str, dict]:
    """Generate the rows not yet in `log`, model by model; returns every row with its answer, by key."""
    for label in models.labels:
        # every condition of one model in the same batches: fewer, fuller decode steps
        run_generation([r for cond in conditions for r in rows_by[(label, cond)]], log, partial(models.generator, label),
                       batch_size=batch_size, seed=seed, label=f"eval {label}")
    return {r["key"]: r for r in log.rows}


def score_answers(models: EvalModels, rows_by: dict[tuple[str, str], list[dict]], conditions: list[str],
                  done: dict[str, dict], scorer) -> dict[str, dict]:
    """Per model label and condition: the behaviour score and length of its answers."""
    entries = {}
    for label in models.labels:
        entries[label] = {}
        for cond in conditions:
            answers = [done[r["key"]]["answer"] for r in rows_by[(label, cond)]]
            entries[label][cond] = summarise(answers, scorer.score_many(answers))
    return entries


def answer_nlls(models: EvalModels, rows_by: dict[tuple[str, str], list[dict]], done: dict[str, dict],
                batch_size: int) -> dict[str, float]:
    """Per model label: the mean NLL of the base model's control answers, each given the conversation
    that model answered under the control condition."""
    base_answers = [done[r["key"]]["answer"] for r in rows_by[("base", "control")]]
    nlls = {}
    for label in models.labels:
        model, tok = models.use(label)
        convs = [r["messages"] for r in rows_by[(label, "control")]]
        nlls[label] = mean_nll(model, tok, convs, base_answers, batch_size=batch_size)
    return nlls


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


def assemble_metrics(recipe: Recipe, scorer, conditions: list[str], eval_prompts: list[dict], entries: dict[str, dict],
                     nlls: dict[str, float], mcq: dict[str, dict] | None, lm_eval: dict[str, dict] | None) -> dict:
    """metrics.json: per model label its scores per condition, NLL and NLL ratio to the base model,
    and the multiple-choice and lm-eval results where asked for."""
    b = recipe.behaviour
    models = {}
    for label, entry in entries.items():
        entry = {**entry, "nll": nlls[label], "nll_ratio": nlls[label] / nlls["base"] if nlls["base"] else None}
        if mcq is not None:
            entry.update(mcq_accuracy=mcq[label]["accuracy"], mcq_accuracy_norm=mcq[label]["accuracy_norm"],
                         mcq_n=mcq[label]["n"])
        if lm_eval is not None:
            entry["lm_eval"] = lm_eval[label]
        models[label] = entry
    return {
        "behaviour": {"name": b.name, "scorer": b.scorer.name, "desired": b.scorer.desired, "unit": scorer.unit},
        "conditions": conditions,
        "n_eval_prompts": len(eval_prompts),
        "eval_prompt_ids": [p["id"] for p in eval_prompts],
        "models": models,
    }


def evaluate_run(run_dir: str | Path, recipe: Recipe, model_path: str, eval_prompts: list[dict]) -> dict:
    """Answer, score and measure every model on the held-out prompts; writes and returns metrics.json."""
    run = Path(run_dir)
    b = recipe.behaviour
    ev = recipe.evaluation
    scorer = make_scorer(b.scorer.name, b.scorer.params)
    if ev.lm_eval:
        lm_eval_check(ev.lm_eval)
    conditions = ["control"] + (["negative"] if b.negative else [])
    params = GenParams(ev.max_new_tokens, ev.temperature, ev.top_p)
    seed = recipe.generation.seed if ev.temperature > 0 else 0  # greedy answers do not depend on the seed
    models = EvalModels(model_path, recipe, find_adapters(run))

    rows_by = plan_answers(models, conditions, eval_prompts, params, seed)
    done = decode_answers(models, rows_by, conditions, JsonlLog(run / "eval" / "answers.jsonl"), ev.batch_size, seed)
    entries = score_answers(models, rows_by, conditions, done, scorer)
    nlls = answer_nlls(models, rows_by, done, ev.batch_size)
    mcq = mcq_results(models, run / "eval" / "mcq.json", ev.mcq_items, ev.batch_size) if ev.mcq else None
    lm_eval = lm_eval_results(models, run / "eval" / "lm_eval.json", ev.lm_eval, ev.batch_size) if ev.lm_eval else None
    metrics = assemble_metrics(recipe, scorer, conditions, eval_prompts, entries, nlls, mcq, lm_eval)
    write_json(run / "metrics.json", metrics)
    return metrics
