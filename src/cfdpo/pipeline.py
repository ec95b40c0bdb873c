"""The Python API: one function per stage, each reading and writing files in a run directory.

    run_dir/
      recipe.yaml            the recipe the run was made with
      answers.jsonl          generation: one row per answer
      pairs/<variant>/       datasets dataset (prompt/chosen/rejected; + kind with pairs.retain, + margin with
                             pairs.score self) + stats.json
      pairs/self_scores.jsonl  pairs.score self: the base model's mean log-prob of each answer under its
                             prompt's contrast conversations, keyed by (model, conversation, answer)
      adapters/<variant>/    PEFT LoRA adapter + train_log.json (+ merged/ with --merge); with dpo.rounds > 1
                             a copy of the kept round's adapter
      rounds/                only with dpo.rounds > 1 (see `cfdpo.rounds`):
        summary.json           per variant: each round's score and its source, the round kept, why the rounds stopped
        <r>/score.json         per variant: the score of round r's adapter
        <r>/answers.jsonl      r >= 2: answers of round r-1's adapters (model `<base>|<variant>|<adapter hash>`)
        <r>/pairs/<variant>/   r >= 2: the variant's pairs from them (round 1's are pairs/<variant>/)
        <r>/adapters/<variant>/  round r's adapter, trained on from round r-1's
      eval/answers.jsonl     evaluation answers of every model
      metrics.json           evaluation results
      report.md, plots/      the report
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from cfdpo import dist, tracking
from cfdpo.errors import CfdpoError
from cfdpo.lock import RunLock, hold
from cfdpo.recipe import UPSTREAM_EVAL_FIELDS, Recipe, dump_recipe, load_recipe
from cfdpo.runio import check_inside, write_atomic, write_json


class Run:
    """A run directory bound to its recipe and resolved model."""

    def __init__(self, run_dir: str | Path, recipe: Recipe):
        self.dir = Path(run_dir)
        self.recipe = recipe
        self._model_path: str | None = None
        self.lock: RunLock | None = None  # set by open_run: the directory is ours while this Run lives

    @property
    def model_path(self) -> str:
        if self._model_path is None:
            from cfdpo.models import resolve_model

            # rank 0 first: a GGUF model is converted into the cache once
            self._model_path = dist.on_main(lambda: resolve_model(self.recipe.model))
        return self._model_path

    def split(self) -> tuple[list[dict], list[dict]]:
        from cfdpo.prompts import load_prompts, split

        p = self.recipe.prompts
        return split(load_prompts(p.source, p.column), p.train_size, p.eval_size, p.seed)

    def held_out(self) -> list[dict]:
        """The prompts evaluation scores: the eval split, then `evaluation.extra_prompts` more after the
        training and validation prompts (see `prompts.extra_held_out`)."""
        from cfdpo.prompts import extra_held_out, load_prompts

        p, extra = self.recipe.prompts, self.recipe.evaluation.extra_prompts
        _, held_out = self.split()
        if not extra:
            return held_out
        rows = load_prompts(p.source, p.column)
        return held_out + extra_held_out(rows, p.train_size, p.eval_size, len(self.validation_prompts()), extra, p.seed)

    def validation_prompts(self) -> list[dict]:
        """The prompts dpo.auto validates on (disjoint from both splits; see `prompts.validation_split`)."""
        from cfdpo.prompts import load_prompts, validation_split

        p = self.recipe.prompts
        return validation_split(load_prompts(p.source, p.column), p.train_size, p.eval_size, p.validation_size, p.seed)

    def retain_prompts(self) -> list[dict]:
        """pairs.retain_prompts' prompts (none without it), never those an evaluation in-scope context asks."""
        from cfdpo.prompts import load_prompts, scope_prompts

        spec, ev = self.recipe.pairs.retain_prompts, self.recipe.evaluation
        if spec is None:
            return []
        held_out = {p["prompt"].strip() for c in ev.in_scope if c.prompts
                    for p in load_prompts(c.prompts, c.column)[:ev.subset_size]}
        return scope_prompts(load_prompts(spec.source, spec.column), held_out, spec.size, spec.source)


OUTPUTS = ("answers.jsonl", "pairs", "adapters", "rounds", "eval", "metrics.json", "report.md", "report.html")


def open_run(
    run_dir: str | Path, recipe_path: str | Path | None = None, trust_remote_code: bool | None = False,
    resume: bool = True,
) -> Run:
    """Bind a run directory to a recipe: a new one gets `recipe.yaml` and `manifest.json`; an existing one must match.

    Everything is checked before anything is written: the recipe, the prompt file and split, the
    model, the manifest's inputs, links leading out of the directory, and that it is writable.
    `trust_remote_code` is the user's consent to run a model's own code; a recipe that asks for it
    is refused without that consent (None: a stage that loads no model). `resume=False` refuses a directory that already has outputs.
    The returned Run holds the directory's lock (`cfdpo.lock`) while it lives: a second writer is refused.
    On several processes rank 0 checks, locks and writes; the others get its Run (or its error).
    """
    return dist.on_main(lambda: _open_run(run_dir, recipe_path, trust_remote_code, resume))


def _open_run(run_dir: str | Path, recipe_path: str | Path | None, trust_remote_code: bool | None, resume: bool) -> Run:
    from cfdpo import manifest

    d = Path(run_dir)
    saved = d / "recipe.yaml"
    reevaluate = False  # only evaluation settings changed: the run's evaluate and report stages are due again
    held = hold(d) if saved.is_file() else None  # an existing run is checked and written under its lock
    if d.exists() and not d.is_dir():
        raise CfdpoError(f"{d}: exists and is not a directory; expected a run directory")
    if recipe_path is None:
        if not saved.is_file():
            raise CfdpoError(f"{d}: no recipe.yaml in the run directory; pass --recipe RECIPE.yaml")
        recipe = load_recipe(saved)
    else:
        recipe = load_recipe(recipe_path)
        if saved.is_file():
            old = load_recipe(saved)
            if old.digest() != recipe.digest():
                if not recipe.only_evaluation_changed_from(old):
                    raise CfdpoError(
                        f"{d}: run directory was written by another recipe (differs in: "
                        f"{', '.join(recipe.changed_from(old))}); use a new --out directory (a recipe that changes "
                        f"only evaluation settings other than {' and '.join(UPSTREAM_EVAL_FIELDS)} re-evaluates a run)"
                    )
                reevaluate = True
    if not resume:
        found = [name for name in OUTPUTS if (d / name).exists()]
        if found:
            raise CfdpoError(f"{d}: already has results ({', '.join(found)}) and --no-resume was given; use a new --out directory")
    if recipe.trust_remote_code and trust_remote_code is False:
        raise CfdpoError(
            "recipe asks for trust_remote_code: true, which runs Python code shipped with the model; "
            "pass --trust-remote-code to allow it"
        )
    if recipe.evaluation.lm_eval and recipe.evaluation.lm_eval.include_path and trust_remote_code is False:
        raise CfdpoError(
            "recipe sets evaluation.lm_eval.include_path, whose task files can run Python code (!function); "
            "pass --trust-remote-code to allow it"
        )
    check_inside(d)
    run = Run(d, recipe.model_copy(update={"trust_remote_code": bool(trust_remote_code)}))
    run.split()  # the prompt file and the split sizes are valid
    run.validation_prompts()
    run.held_out()
    run.retain_prompts()
    from cfdpo.models import check_available

    check_available(run.model_path)
    if recipe.evaluation.lm_eval:  # before hours of generation and training, not after
        from cfdpo.evaluate import lm_eval_check

        lm_eval_check(recipe.evaluation.lm_eval)
    saved_manifest = manifest.check(d, recipe, run.model_path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CfdpoError(f"{d}: output directory is not writable ({e.strerror}); expected a directory you can write to") from None
    if held is None:  # a new run: lock it, and check again if another process made it meanwhile
        held = hold(d)
        if saved.is_file():
            return _open_run(run_dir, recipe_path, trust_remote_code, resume)
    run.lock = held
    if reevaluate:  # the manifest first: a crash in between leaves the evaluate stage due, never stale
        manifest.evaluation_changed(d, recipe)
        write_atomic(saved, dump_recipe(recipe))
    if not saved.is_file():
        write_atomic(saved, dump_recipe(recipe))
    if saved_manifest is None:
        write_json(d / manifest.NAME, manifest.build(recipe, run.model_path))
    return run


def generate(run: Run) -> int:
    """Answer the control / treatment / negative versions of the training prompts (see `generate_rows`).
    Returns how many answers were added."""
    from cfdpo.backends import get_backend
    from cfdpo.generate import GenParams, answers_path, plan_rows, plan_scope_rows
    from cfdpo.models import load_tokenizer, model_id
    from cfdpo.runtime import resolve_dtype

    r = run.recipe
    g = r.generation
    train, _ = run.split()
    path = run.model_path
    params = GenParams(g.max_new_tokens, g.temperature, g.top_p)
    rows = plan_rows(train, r.needed_conditions(), r.behaviour, g.samples, model_id(path), params, g.seed)
    if r.pairs.retain_prompts is not None:
        rows += plan_scope_rows(run.retain_prompts(), r.pairs.retain_prompts.rejected_instruction, r.behaviour,
                                g.samples, model_id(path), params, g.seed)

    def loader():
        tok = load_tokenizer(path, r.trust_remote_code)
        tok.padding_side = "left"
        seed = g.seed + 7919 * dist.rank()
        return get_backend(g.backend).load(path, resolve_dtype(g.dtype), r.trust_remote_code, seed), tok

    n = generate_rows(run, rows, answers_path(run.dir), loader, "generate")
    _done(run, "generate")
    return n


def generate_rows(run: Run, rows: list[dict], path: Path, loader, label: str) -> int:
    """Answer the planned `rows` (`generate.plan_rows`) into the answers file `path`, cached and resumable,
    with the generator `loader()` returns (see `generate.run_generation`); returns how many were added.

    On several processes each rank answers its share into a shard file and rank 0 merges the
    shards into `path` (see `cfdpo.dist`).
    """
    from cfdpo.generate import run_generation
    from cfdpo.runio import JsonlLog
    from cfdpo.runtime import set_threads

    g = run.recipe.generation
    added = dist.on_main(lambda: dist.merge_shards(path, rows))  # a crashed multi-process run's shards
    w, rank = dist.world(), dist.rank()
    mine = rows
    have: set[str] = set()  # rows merged into the answers file, on several processes
    if w == 1:
        log = JsonlLog(path)
    else:
        have = JsonlLog(path).keys()
        mine = dist.shard_rows(rows, rank, w)  # the whole shard: its batch plan must not depend on what is done
        log = JsonlLog(dist.shard_path(path, rank, w))
    set_threads()
    n = run_generation(mine, log, loader, batch_size=g.batch_size, seed=g.seed + 7919 * rank, label=label, have=have)
    if w > 1:
        n += dist.on_main(lambda: dist.merge_shards(path, rows))
    return added + n


def _done(run: Run, stage: str) -> None:
    """Record the finished stage in manifest.json (rank 0)."""
    from cfdpo.manifest import record_stage

    dist.on_main(lambda: record_stage(run.dir, stage))


def build_pairs(run: Run) -> dict[str, dict]:
    """Build every variant's pairs from answers.jsonl; returns the stats per variant (rank 0 writes)."""
    return dist.on_main(lambda: _build_pairs(run))


def probe_run(run: Run) -> dict:
    """Generate the training answers (the generate stage, cached) and probe them (`cfdpo.probe`) into
    probe.json; returns the probe with the scorer's unit under "unit"."""
    from cfdpo.probe import probe
    from cfdpo.runio import write_json
    from cfdpo.scorers import make_scorer

    generate(run)
    r = run.recipe
    train, _ = run.split()
    rows = _answer_rows(run, train)
    scorer = make_scorer(r.behaviour.scorer.name, r.behaviour.scorer.params)
    result = probe(rows, scorer.score_many([row["answer"] for row in rows]), r.behaviour.scorer.desired,
                   r.variants, r.generation.seed)
    result["unit"] = scorer.unit
    if dist.is_main():
        write_json(run.dir / "probe.json", result)
    return result


def _answer_rows(run: Run, prompts: list[dict]) -> list[dict]:
    """The rows of the run's answers.jsonl that answer `prompts`."""
    from cfdpo.generate import answers_path
    from cfdpo.runio import JsonlLog

    ap = answers_path(run.dir)
    if not ap.is_file():
        raise CfdpoError(f"{ap}: not found; run `cfdpo generate` first")
    wanted = {p["id"] for p in prompts}
    return [row for row in JsonlLog(ap).rows if row["prompt_id"] in wanted]


def _build_pairs(run: Run) -> dict[str, dict]:
    from cfdpo.scorers import make_scorer

    r = run.recipe
    train, _ = run.split()
    rows = _answer_rows(run, train + run.retain_prompts())
    scorer = make_scorer(r.behaviour.scorer.name, r.behaviour.scorer.params)
    self_scores = answer_self_scores(run, rows) if r.pairs.score == "self" else None
    out = {v: write_variant_pairs(rows, v, r, scorer, run.dir / "pairs" / v, self_scores) for v in r.variants}
    _done(run, "pairs")
    return out


def write_variant_pairs(rows: list[dict], variant: str, recipe: Recipe, scorer, out: Path,
                        self_scores: dict[str, float] | None = None) -> dict:
    """One variant's pairs from answer rows (with its retain pairs under pairs.retain) into `out`; returns their
    stats. `self_scores` ({answer key: self-score}) with pairs.score self."""
    from cfdpo.pairs import mix_pairs, pair_stats, write_pairs
    from cfdpo.variants import retain_rows

    pairs, stats = _pairs_of(rows, variant, recipe, scorer, self_scores)
    joining = retain_rows(variant, recipe.pairs.retain_prompts is not None) if recipe.pairs.retain else ()
    if joining:  # scope-aware: the retain pairs mixed in, tagged by kind, counted per kind
        parts, kinds = {variant: pairs}, {variant: stats}
        for row in joining:
            parts[row.name], kinds[row.name] = _pairs_of(rows, row.name, recipe, scorer, self_scores)
        pairs = mix_pairs(parts, recipe.generation.seed)
        stats = pair_stats(pairs, scorer, candidates=sum(k["candidates"] for k in kinds.values()))
        # retain pairs choose the behaviour on purpose: the share that shows the signal is the variant's own
        stats.update(kinds=kinds, better_share=kinds[variant].get("better_share"))
    stats.update(filter=recipe.pairs.filter, best_of_k=recipe.pairs.best_of_k, variant=variant)
    if self_scores is not None:
        stats["score"] = "self"  # count of candidates: what filter / best_of_k kept on the self margin
    write_pairs(pairs, out, stats)
    return stats


def _pairs_of(rows: list[dict], name: str, recipe: Recipe, scorer,
              self_scores: dict[str, float] | None) -> tuple[list[dict], dict]:
    """The pairs of one table row (a variant or a retain row) as the recipe asks, and their stats."""
    from cfdpo.pairs import build_pairs as build
    from cfdpo.pairs import pair_stats
    from cfdpo.variants import get_row

    b, p = recipe.behaviour, recipe.pairs
    # a retain-prompts pair is kept only where its rejected instruction took (on SmolLM2-135M "Answer in
    # English." still got French to 79 % of French prompts): otherwise both answers show the behaviour
    keep_better = p.filter or get_row(name).own_prompts
    plain = build(rows, name, behaviour=b)
    pairs = build(rows, name, scorer, b.scorer.desired, keep_better, p.best_of_k, behaviour=b, self_scores=self_scores)
    return pairs, pair_stats(pairs, scorer, candidates=len(plain), desired=b.scorer.desired)


def answer_self_scores(run: Run, rows: list[dict]) -> dict[str, float]:
    """pairs.score self: {answer key: self-score} under the base model, cached in pairs/self_scores.jsonl
    (the model is loaded only for answers the cache lacks)."""
    from cfdpo.models import load_model, load_tokenizer, model_id
    from cfdpo.runio import JsonlLog
    from cfdpo.runtime import resolve_dtype, set_threads
    from cfdpo.self_reward import score_answers

    r = run.recipe
    path = run.model_path

    def load():
        set_threads()
        tokenizer = load_tokenizer(path, r.trust_remote_code)
        model = load_model(path, resolve_dtype(r.generation.dtype, purpose="evaluate"), r.trust_remote_code)
        return model.to(dist.device()), tokenizer

    return score_answers(rows, r.behaviour, model_id(path), JsonlLog(run.dir / "pairs" / "self_scores.jsonl"), load,
                         r.evaluation.batch_size)


def train(run: Run, variants: list[str] | None = None, merge: bool = False, sft: bool = False) -> list[Path]:
    """Train one LoRA adapter per variant (and the SFT baseline with `sft=True`); with dpo.rounds > 1
    each variant's adapter comes from its on-policy rounds (`cfdpo.rounds`)."""
    from cfdpo.pairs import load_pairs
    from cfdpo.rounds import run_rounds
    from cfdpo.runtime import set_threads
    from cfdpo.train import train_sft
    from cfdpo.variants import SFT_SOURCES

    r = run.recipe
    todo = variants or list(r.variants)
    unknown = [v for v in todo if v not in r.variants]
    if unknown:
        raise CfdpoError(f"variant '{unknown[0]}' is not in this recipe's variants ({', '.join(r.variants)})")
    if merge and dist.sharded_weights():
        raise CfdpoError("--merge needs the whole model on one process; under ZeRO-3 / FSDP train without it "
                         "(or use the ddp / zero2 accelerate config)")
    set_threads()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    src = next((v for v in SFT_SOURCES if v in r.variants), None)  # whose pairs give the SFT targets
    if sft and src is None:
        listed = ", ".join(SFT_SOURCES[:-1]) + " or " + SFT_SOURCES[-1]
        raise CfdpoError(f"the SFT baseline needs an {listed} variant (their chosen answers are its targets)")
    out = []
    with tracking.training(run.dir, r.tracking):
        for v in todo:
            if r.dpo.rounds > 1:
                out.append(run_rounds(run, v, merge))
            else:
                out.append(train_variant(run, v, run.dir / "pairs" / v, run.dir / "adapters" / v, merge))
        if sft:
            ds = load_pairs(run.dir / "pairs" / src)
            out.append(train_sft(run.model_path, ds, r.dpo, run.dir / "adapters" / "sft", merge, r.trust_remote_code,
                                 validation=validation_plan(run, src)))
    _done(run, "train")
    return out


def train_variant(run: Run, variant: str, pairs_dir: Path, out: Path, merge: bool = False,
                  start: Path | None = None) -> Path:
    """The variant's DPO adapter trained on the pairs at `pairs_dir` into `out` (`start`: continuing that adapter)."""
    from cfdpo.pairs import load_pairs
    from cfdpo.train import train_dpo

    r = run.recipe
    return train_dpo(run.model_path, load_pairs(pairs_dir), r.dpo, out, merge, r.trust_remote_code,
                     validation=validation_plan(run, variant), start=start)


def validation_plan(run: Run, variant: str):
    """dpo.auto: validation under the variant's `validation_condition` (None without dpo.auto)."""
    from cfdpo.validation import plan_validation
    from cfdpo.variants import BY_NAME

    r = run.recipe
    spec = BY_NAME[variant]
    return (plan_validation(r, run.validation_prompts(), spec.validation_condition, teacher=spec.chosen == "treatment")
            if r.dpo.auto else None)


def evaluate(run: Run) -> dict:
    """Evaluate on rank 0 (the other ranks wait)."""
    return dist.on_main(lambda: _evaluate(run))


def _evaluate(run: Run) -> dict:
    from cfdpo.evaluate import evaluate_run
    from cfdpo.runtime import set_threads

    set_threads()
    check_adapters(run.dir / "adapters")
    metrics = evaluate_run(run.dir, run.recipe, run.model_path, run.held_out(), run.validation_prompts())
    _done(run, "evaluate")
    tracking.log_results(run.dir, run.recipe.tracking)
    return metrics


def check_adapters(root: Path) -> None:
    """Adapters are loaded from safetensors only: refuse one that has only pickled weights."""
    for cfg in sorted(root.glob("*/adapter_config.json")):
        if not (cfg.parent / "adapter_model.safetensors").is_file():
            raise CfdpoError(f"{cfg.parent}: no adapter_model.safetensors; cfdpo loads adapter weights only from safetensors")


def report(run: Run) -> Path:
    from cfdpo.report import write_report

    path = dist.on_main(lambda: write_report(run.dir))
    _done(run, "report")
    return path


def run_all(run: Run, merge: bool = False, sft: bool = False, warn: Callable[[str], None] = warnings.warn) -> Path:
    """Every stage; `warn` gets the pairs' warnings (`pairs.weak_signal`) before training starts."""
    from cfdpo.pairs import weak_signal

    generate(run)
    for variant, stats in build_pairs(run).items():
        message = weak_signal(variant, stats)
        if message:
            warn(message)
    train(run, merge=merge, sft=sft)
    evaluate(run)
    return report(run)
