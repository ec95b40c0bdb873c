"""The Python API: one function per stage, each reading and writing files in a run directory.

    run_dir/
      recipe.yaml            the recipe the run was made with
      answers.jsonl          generation: one row per answer
      pairs/<variant>/       datasets dataset (prompt/chosen/rejected) + stats.json
      adapters/<variant>/    PEFT LoRA adapter + train_log.json (+ merged/ with --merge)
      eval/answers.jsonl     evaluation answers of every model
      metrics.json           evaluation results
      report.md, plots/      the report
"""

from __future__ import annotations

import os
from pathlib import Path

from cfdpo.errors import CfdpoError
from cfdpo.runio import write_atomic
from cfdpo.spec import Recipe, dump_recipe, load_recipe


class Run:
    """A run directory bound to its recipe and resolved model."""

    def __init__(self, run_dir: str | Path, recipe: Recipe):
        self.dir = Path(run_dir)
        self.recipe = recipe
        self._model_path: str | None = None

    @property
    def model_path(self) -> str:
        if self._model_path is None:
            from cfdpo.models import resolve_model

            self._model_path = resolve_model(self.recipe.model)
        return self._model_path

    def split(self) -> tuple[list[dict], list[dict]]:
        from cfdpo.prompts import load_prompts, split

        p = self.recipe.prompts
        return split(load_prompts(p.source, p.column), p.train_size, p.eval_size, p.seed)


def open_run(run_dir: str | Path, recipe_path: str | Path | None = None) -> Run:
    """Bind a run directory to a recipe: a new one gets `recipe.yaml`; an existing one must match."""
    d = Path(run_dir)
    saved = d / "recipe.yaml"
    if recipe_path is None:
        if not saved.is_file():
            raise CfdpoError(f"{d}: no recipe.yaml in the run directory; pass --recipe RECIPE.yaml")
        return Run(d, load_recipe(saved))
    recipe = load_recipe(recipe_path)
    if d.exists() and not d.is_dir():
        raise CfdpoError(f"{d}: exists and is not a directory; expected a run directory")
    if saved.is_file():
        old = load_recipe(saved)
        if old.digest() != recipe.digest():
            changed = [k for k in type(recipe).model_fields if getattr(old, k) != getattr(recipe, k)]
            raise CfdpoError(
                f"{d}: run directory was written by another recipe (differs in: {', '.join(changed)}); "
                "use a new --out directory"
            )
        return Run(d, recipe)
    try:
        d.mkdir(parents=True, exist_ok=True)
        if not os.access(d, os.W_OK):
            raise PermissionError
        write_atomic(saved, dump_recipe(recipe))
    except PermissionError:
        raise CfdpoError(f"{d}: output directory is not writable") from None
    return Run(d, recipe)


def generate(run: Run) -> int:
    """Answer the control / treatment / negative versions of the training prompts."""
    from cfdpo.generate import GenParams, answers_path, plan_rows, resolve_dtype, run_generation
    from cfdpo.models import load_model, load_tokenizer, model_id
    from cfdpo.runio import JsonlLog
    from cfdpo.train import set_threads

    r = run.recipe
    g = r.generation
    train, _ = run.split()
    path = run.model_path
    rows = plan_rows(train, r.needed_conditions(), r.behaviour, g.samples, model_id(path),
                     GenParams(g.max_new_tokens, g.temperature, g.top_p), g.seed)
    log = JsonlLog(answers_path(run.dir))
    set_threads()

    def loader():
        tok = load_tokenizer(path, r.trust_remote_code)
        if g.backend == "vllm":
            from cfdpo.vllm_backend import VllmGenerator

            return VllmGenerator(path, resolve_dtype(g.dtype), r.trust_remote_code, g.seed), tok
        tok.padding_side = "left"
        return load_model(path, resolve_dtype(g.dtype), r.trust_remote_code), tok

    return run_generation(rows, log, loader, batch_size=g.batch_size, seed=g.seed, label="generate")


def build_pairs(run: Run) -> dict[str, dict]:
    """Build every variant's pairs from answers.jsonl; returns the stats per variant."""
    from cfdpo.generate import answers_path
    from cfdpo.pairs import build_pairs as build, pair_stats, write_pairs
    from cfdpo.runio import JsonlLog
    from cfdpo.scorers import make_scorer

    r = run.recipe
    ap = answers_path(run.dir)
    if not ap.is_file():
        raise CfdpoError(f"{ap}: not found; run `cfdpo generate` first")
    train, _ = run.split()
    wanted = {p["id"] for p in train}
    rows = [row for row in JsonlLog(ap).rows if row["prompt_id"] in wanted]
    scorer = make_scorer(r.behaviour.scorer.name, r.behaviour.scorer.params)
    out = {}
    for v in r.variants:
        plain = build(rows, v)
        pairs = build(rows, v, scorer, r.behaviour.scorer.desired, r.pairs.filter, r.pairs.best_of_k)
        stats = pair_stats(pairs, scorer, candidates=len(plain))
        stats.update(filter=r.pairs.filter, best_of_k=r.pairs.best_of_k, variant=v)
        write_pairs(pairs, run.dir / "pairs" / v, stats)
        out[v] = stats
    return out


def train(run: Run, variants: list[str] | None = None, merge: bool = False, sft: bool = False) -> list[Path]:
    """Train one LoRA adapter per variant (and the SFT baseline with `sft=True`)."""
    from cfdpo.pairs import load_pairs
    from cfdpo.train import set_threads, train_dpo, train_sft

    r = run.recipe
    todo = variants or list(r.variants)
    unknown = [v for v in todo if v not in r.variants]
    if unknown:
        raise CfdpoError(f"variant '{unknown[0]}' is not in this recipe's variants ({', '.join(r.variants)})")
    set_threads()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    dtype = "float32"
    out = []
    for v in todo:
        ds = load_pairs(run.dir / "pairs" / v)
        out.append(train_dpo(run.model_path, ds, r.dpo, run.dir / "adapters" / v, merge, r.trust_remote_code, dtype))
    if sft:
        # SFT targets: control prompt -> treatment answer (enc/contrastive pairs); with no treatment answers,
        # the negation pairs' negative prompt -> control answer is the context-distillation analogue
        src = next((v for v in ("enc", "contrastive", "negation") if v in r.variants), None)
        if src is None:
            raise CfdpoError("the SFT baseline needs an enc, contrastive or negation variant (their chosen answers are its targets)")
        ds = load_pairs(run.dir / "pairs" / src)
        out.append(train_sft(run.model_path, ds, r.dpo, run.dir / "adapters" / "sft", merge, r.trust_remote_code, dtype))
    return out


def evaluate(run: Run) -> dict:
    from cfdpo.evaluate import evaluate_run
    from cfdpo.train import set_threads

    set_threads()
    _, held_out = run.split()
    return evaluate_run(run.dir, run.recipe, run.model_path, held_out)


def report(run: Run) -> Path:
    from cfdpo.report import write_report

    return write_report(run.dir)


def run_all(run: Run, merge: bool = False, sft: bool = False) -> Path:
    generate(run)
    build_pairs(run)
    train(run, merge=merge, sft=sft)
    evaluate(run)
    return report(run)
