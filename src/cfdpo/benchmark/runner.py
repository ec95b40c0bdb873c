"""Running a benchmark plan; results.json as a `ResultsStore`.

    out/
      recipes/<name>-seed<s>[-filter|-bestofk].yaml   the derived recipes the runs were made with
      <name>/seed<s>/            the plain run (all variants + the SFT baseline); adapters/multi added later
      <name>/seed<s>-filter/     scorer-filtered pairs (pair-quality recipes, one variant)
      <name>/seed<s>-bestofk/    best-of-k pairs
      <name>/seed<s>-self/       pairs filtered by the base model's own margin (`pairs.score: self`; method recipes)
      <name>/seed<s>-rounds/     iterative on-policy rounds (`dpo.rounds: 3`; method recipes)
      multi/seed<s>/             union of two recipes' pairs and the adapter trained on it
      results.json               every run's metrics, sizes and wall time; the runs skipped and why
    docs/results.json            the same records beside RESULTS.md, to commit with it

Run directories do not travel (a new machine, a later session starts without them); the records in
`docs/results.json` do. A run whose directory holds no metrics but whose record there was made from
the same derived recipe (and holds every model the run would evaluate) is not made again: its record
is kept, with the machine it was made on (`made`, from the run's manifest). So a benchmark longer than
one sitting goes on where the last one stopped, on whatever machine comes next.

Seeds vary generation sampling and training (`generation.seed`, `dpo.seed`); `prompts.seed` is
kept, so every seed is evaluated on the same held-out prompts. Evaluation is greedy, so the base
and prompted answers (and their multiple-choice scores) are the same for every seed and are
copied between runs instead of recomputed; the filter / best-of-k runs reuse the plain run's
training answers, so they differ only in which pairs are kept. A method recipe's plain run also
evaluates the steering baseline (`evaluation.baselines: [steering]`), and its self / rounds runs
start from the plain run's answers the same way.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path

import yaml

from cfdpo.benchmark.aggregate import CONFIGS, METHODS, PAIR_QUALITY, UNTRAINED
from cfdpo.benchmark.plan import Plan, derive
from cfdpo.benchmark.tables import write_results
from cfdpo.errors import CfdpoError
from cfdpo.recipe import load_recipe
from cfdpo.runio import JsonlLog, read_json, write_atomic, write_json
from cfdpo.variants import SFT_SOURCES


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _key(row: dict) -> tuple[str, str, int]:
    return row["recipe"], row["config"], row["seed"]


def _name(row: dict) -> str:
    return f"{row['recipe']}/{row['config']}/seed{row['seed']}"


class ResultsStore:
    """results.json of one benchmark invocation: the runs recorded and the configs skipped (with their
    reason), saved after every change so an interrupted benchmark keeps them; the runs and skips of recipes
    this invocation does not run, kept from the file as an earlier invocation left them (each with that
    invocation's `command`); and the wall time of every run recorded before, which a rerun keeps for the
    runs it finds finished."""

    def __init__(self, path: Path, command: str, seeds: int, recipes: Collection[str],
                 on_save: Callable[[dict], object] = lambda results: None, archive: Path | None = None):
        self.path = path
        self.on_save = on_save  # e.g. rewrite RESULTS.md from the results
        before = _merged(archive, path)
        # records of this invocation's recipes whose run directories may be gone: kept instead of made again
        self.archived = {_key(r): r for r in before["runs"] if r["recipe"] in recipes}
        self.adopted: set[tuple[str, str, int]] = set()
        # every earlier invocation's wall time per run, also of runs the last one did not record, so a run
        # picked up again later keeps its whole cost
        self.earlier_seconds = {**before.get("earlier_seconds", {}), **{_name(r): r["seconds"] for r in before["runs"]}}
        kept = [r for r in before["runs"] if r["recipe"] not in recipes]  # each with its command (`_merged`)
        skipped = [sk for sk in before.get("skipped", []) if sk["recipe"] not in recipes]
        self.results: dict = {"command": command, "seeds": seeds, "runs": kept, "started": _now(),
                              "earlier_seconds": self.earlier_seconds, **({"skipped": skipped} if skipped else {})}

    def finished(self, recipe: str, config: str, seed: int, run_dir: Path, expected: set[str]) -> float | None:
        """The earlier seconds of a run whose metrics already cover every expected model and whose manifest
        (where it has one) has not had its evaluate stage made due again by a changed recipe, recorded again
        as they are (checking a finished run costs no run time); None: run it."""
        metrics, manifest = run_dir / "metrics.json", run_dir / "manifest.json"
        if not metrics.is_file() or not expected <= set(read_json(metrics)["models"]):
            return None
        if manifest.is_file() and "evaluate" not in read_json(manifest).get("stages", {}):
            return None
        return self.earlier(recipe, config, seed)

    def adopt(self, recipe: str, config: str, seed: int, run, expected: set[str]) -> bool:
        """Keep the archived record of a run whose directory holds no metrics, where the record was made
        from the same recipe (`run.recipe`) and holds every expected model; False: the run is to be made."""
        rec = self.archived.get((recipe, config, seed))
        if (run.dir / "metrics.json").is_file() or rec is None or not expected <= set(rec["metrics"]["models"]):
            return False
        if not same_recipe(rec["recipe_data"], run.recipe):
            return False
        rec = {k: v for k, v in rec.items() if k != "command"}
        self.results["runs"] = [r for r in self.results["runs"] if _key(r) != _key(rec)] + [rec]
        self.adopted.add(_key(rec))
        self.save()
        return True

    def earlier(self, recipe: str, config: str, seed: int) -> float:
        """The seconds an earlier invocation recorded for this run (0 if none): a run picked up again, to be
        re-evaluated or to add a model, costs its earlier time plus this invocation's."""
        return self.earlier_seconds.get(_name({"recipe": recipe, "config": config, "seed": seed}), 0.0)

    def record(self, recipe: str, config: str, seed: int, run, seconds: float) -> None:
        """A finished run (a pipeline `Run`): its recipe, metrics and pair stats, replacing an earlier record."""
        self.results["runs"] = [r for r in self.results["runs"] if _key(r) != (recipe, config, seed)]
        self.results["runs"].append({
            "recipe": recipe, "config": config, "seed": seed, "dir": str(run.dir), "seconds": round(seconds, 1),
            "made": made(run.dir),
            "recipe_data": run.recipe.model_dump(mode="json"), "metrics": read_json(run.dir / "metrics.json"),
            "pairs": {v: read_json(run.dir / "pairs" / v / "stats.json") for v in run.recipe.variants
                      if (run.dir / "pairs" / v / "stats.json").is_file()},
            **({"rounds": read_json(run.dir / "rounds" / "summary.json")}
               if (run.dir / "rounds" / "summary.json").is_file() else {}),
        })
        self.save()

    def skip(self, recipe: str, config: str, seed: int, why: str) -> None:
        """A config that did not train, and why (RESULTS.md lists it)."""
        if not why:
            raise ValueError(f"{recipe} {config} seed {seed}: a skipped run needs its reason")
        self.results.setdefault("skipped", []).append({"recipe": recipe, "config": config, "seed": seed, "why": why})
        self.save()

    def seconds(self, recipe: str, config: str, seed: int) -> float:
        return next(r["seconds"] for r in self.results["runs"] if _key(r) == (recipe, config, seed))

    def finish(self, seconds: float) -> None:
        self.results["seconds"] = round(seconds, 1)
        self.results["finished"] = _now()
        self.save()

    def save(self) -> None:
        write_json(self.path, self.results)
        self.on_save(self.results)


def _merged(archive: Path | None, path: Path) -> dict:
    """The records of `archive` (docs/results.json) overlaid with those of `path` (out/results.json), which
    win for the same run; the top-level fields and earlier wall times of both, `path`'s first."""
    files = [read_json(p) for p in (archive, path) if p is not None and p.is_file()]
    if not files:
        return {"runs": []}
    merged = {**files[0], **files[-1]}
    for key in ("runs", "skipped"):
        rows = {}
        for f in files:  # each record keeps the command of the file it comes from
            rows.update({_key(r): {**r, "command": r.get("command", f.get("command", ""))} for r in f.get(key, [])})
        merged[key] = list(rows.values())
    merged["earlier_seconds"] = {k: v for f in files for k, v in f.get("earlier_seconds", {}).items()}
    return merged


def same_recipe(data: dict, recipe) -> bool:
    """A record's recipe (`recipe_data`) is `recipe`: read as a recipe now, so a field added to the format
    since the record was made counts as its default (the setting the record was made with), while a
    changed value, a changed default or a field since removed makes the record stale."""
    try:
        return type(recipe).model_validate(data) == recipe
    except ValueError:  # pydantic's ValidationError: a field the format no longer has, or no longer allows
        return False


def made(run_dir: Path) -> dict:
    """Where and when a run was made, from its manifest: creation time, git commit, torch, machine."""
    path = run_dir / "manifest.json"
    m = read_json(path) if path.is_file() else {}
    return {"created": m.get("created"), "git_commit": m.get("git_commit"),
            "torch": (m.get("packages") or {}).get("torch"), "machine": m.get("machine")}


def union_pairs(parts: dict[str, list[dict]], seed: int) -> list[dict]:
    """Several behaviours' pairs as one shuffled training set; each pair keeps a `source` tag."""
    rows = [{**p, "source": name} for name, ps in parts.items() for p in ps]
    random.Random(seed).shuffle(rows)
    return rows


def _copy_eval_cache(src: Path, dst: Path) -> None:
    """Give `dst`'s evaluation caches the base / prompted answers of `src` that it lacks (by row key: a run
    re-evaluated on more prompts gets them too) and all MCQ results of `src`."""
    s_ans, d_ans = src / "eval" / "answers.jsonl", dst / "eval" / "answers.jsonl"
    if s_ans.is_file():
        have = {r["key"] for r in JsonlLog(d_ans).rows} if d_ans.exists() else set()
        rows = [r for r in JsonlLog(s_ans).rows if r.get("model_label") in UNTRAINED and r["key"] not in have]
        if rows:
            JsonlLog(d_ans).append(rows)
    s_mcq, d_mcq = src / "eval" / "mcq.json", dst / "eval" / "mcq.json"
    if s_mcq.is_file():
        merged = {**read_json(s_mcq), **(read_json(d_mcq) if d_mcq.is_file() else {})}
        write_json(d_mcq, merged)


def _open(plan: Plan, data: dict, tag: str, run_dir: Path):
    from cfdpo.pipeline import open_run

    path = plan.out / "recipes" / f"{tag}.yaml"
    write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return open_run(run_dir, path)


def _log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_benchmark(plan: Plan) -> dict:
    from cfdpo import pipeline

    recipes = {name: load_recipe(p) for name, p in plan.recipes.items()}
    extra = {name: {c: v for c in PAIR_QUALITY} for name, v in plan.pair_quality}  # recipe -> config -> variant
    for name, v in plan.methods:
        extra.setdefault(name, {}).update({c: v for c in METHODS})
    steered = {name for name, _ in plan.methods}
    sampled = {name for name, _ in plan.pair_quality}  # their plain runs answer with --samples (best-of-k's k)
    archive = plan.docs / "results.json"

    def save(results: dict) -> None:  # the records and RESULTS.md beside them, after every run
        write_json(archive, results)
        write_results(results, plan)

    store = ResultsStore(plan.out / "results.json", plan.command, plan.seeds, list(recipes), on_save=save, archive=archive)
    multi_names = {n for n, _ in plan.multi} if len(plan.multi) >= 2 else set()
    t_all = time.perf_counter()

    for seed in range(plan.seeds):
        plain_runs = {}
        multi_done = False
        for name, recipe in recipes.items():
            t0 = time.perf_counter()
            data = derive(recipe, seed, plan.sizes, name in sampled, steering=name in steered,
                           settings=plan.settings_for(name))
            run_dir = plan.out / name / f"seed{seed}"
            if seed > 0:
                _copy_eval_cache(plan.out / name / "seed0", run_dir)
            run = _open(plan, data, f"{name}-seed{seed}", run_dir)
            sft = any(v in run.recipe.variants for v in SFT_SOURCES)
            expected = set(run.recipe.variants) | ({"sft"} if sft else set()) | set(run.recipe.evaluation.baselines)
            if store.adopt(name, "plain", seed, run, expected | ({"multi"} if name in multi_names else set())):
                _log(f"{name} seed {seed}: plain run kept from {archive}")
            else:
                old = store.finished(name, "plain", seed, run_dir, expected)
                if old is None:
                    _log(f"{name} seed {seed}: plain run{' + SFT' if sft else ''}")
                    try:
                        pipeline.run_all(run, sft=sft)
                    except CfdpoError as e:  # e.g. no pairs left after filtering: report it, run the rest
                        _log(f"{name} seed {seed}: failed: {e}")
                        store.skip(name, "plain", seed, str(e))
                        continue
                store.record(name, "plain", seed, run, old if old is not None else time.perf_counter() - t0 + store.earlier(name, "plain", seed))
            plain_runs[name] = run
            for config, variant in extra.get(name, {}).items():
                t0 = time.perf_counter()
                qdir = plan.out / name / f"seed{seed}-{config}"
                qdata = derive(recipe, seed, plan.sizes, name in sampled, CONFIGS[config], [variant],
                              settings=plan.settings_for(name))
                qrun = _open(plan, qdata, f"{name}-seed{seed}-{config}", qdir)
                if store.adopt(name, config, seed, qrun, {variant}):
                    _log(f"{name} seed {seed}: {config} kept from {archive}")
                    continue
                if not (run_dir / "answers.jsonl").exists():  # the plain run was kept from the archive
                    pipeline.generate(run)
                if not (qdir / "answers.jsonl").exists():
                    shutil.copyfile(run_dir / "answers.jsonl", qdir / "answers.jsonl")
                _copy_eval_cache(run_dir, qdir)
                old = store.finished(name, config, seed, qdir, {variant})
                if old is None:
                    _log(f"{name} seed {seed}: {config}, variant {variant}")
                    pipeline.generate(qrun)  # nothing new: the plain run's answers are there
                    kept = pipeline.build_pairs(qrun)[variant]["count"]
                    if kept == 0:  # nothing to train on: say so in RESULTS.md instead of failing the benchmark
                        store.skip(name, config, seed, "no pairs kept")
                        continue
                    pipeline.train(qrun)
                    pipeline.evaluate(qrun)
                    pipeline.report(qrun)
                store.record(name, config, seed, qrun, old if old is not None else time.perf_counter() - t0 + store.earlier(name, config, seed))
            # the multi-behaviour adapter as soon as its recipes' pairs exist
            if not multi_done and multi_names and all(n in plain_runs for n in multi_names):
                multi_done = True
                archived = {n for n in multi_names if (n, "plain", seed) in store.adopted}  # their records hold multi
                if archived == multi_names:
                    continue
                t0 = time.perf_counter()
                _log(f"seed {seed}: multi-behaviour adapter on {' + '.join(f'{n}:{v}' for n, v in plan.multi)}")
                for mname in archived:  # the pairs of a run kept from the archive are made again here
                    pipeline.generate(plain_runs[mname])
                    pipeline.build_pairs(plain_runs[mname])
                adapter = train_multi(plan, plain_runs, seed)
                for mname in sorted(multi_names - archived, key=[n for n, _ in plan.multi].index):
                    mrun = plain_runs[mname]
                    dst = mrun.dir / "adapters" / "multi"
                    if store.finished(mname, "plain", seed, mrun.dir, {"multi"}) is not None and same_adapter(adapter, dst):
                        continue
                    if dst.exists():
                        shutil.rmtree(dst)
                    shutil.copytree(adapter, dst)
                    pipeline.evaluate(mrun)
                    pipeline.report(mrun)
                    store.record(mname, "plain", seed, mrun, store.seconds(mname, "plain", seed) + time.perf_counter() - t0)
    store.finish(time.perf_counter() - t_all)
    return store.results


def same_adapter(adapter: Path, copy: Path) -> bool:
    """`copy` is a copy of `adapter` as it is now: the same identity (see `train.adapter_identity`)."""
    from cfdpo.train import IDENTITY

    try:
        return read_json(copy / IDENTITY) == read_json(adapter / IDENTITY)
    except CfdpoError:  # no copy yet, or one cut short
        return False


def train_multi(plan: Plan, runs: dict, seed: int) -> Path:
    """One DPO adapter on the union of the chosen recipes' pairs: the first recipe's DPO settings with
    the lowest learning rate among the recipes (twice the pairs at the same rate as a single adapter
    moved the model too far: MCQ -6.7 points at seed 0 with pirate's 1e-3)."""
    from cfdpo.pairs import load_pairs, write_pairs
    from cfdpo.runtime import set_threads
    from cfdpo.train import train_dpo

    parts = {f"{n}:{v}": load_pairs(runs[n].dir / "pairs" / v).to_list() for n, v in plan.multi}
    pairs = union_pairs(parts, seed)
    d = plan.out / "multi" / f"seed{seed}"
    stats = {"count": len(pairs), "parts": {k: len(v) for k, v in parts.items()}}
    ds_dir = write_pairs(pairs, d / "pairs", stats)
    first = runs[plan.multi[0][0]]
    set_threads()
    lr = min(runs[n].recipe.dpo.learning_rate for n, _ in plan.multi)
    spec = first.recipe.dpo.model_copy(update={"learning_rate": lr})
    return train_dpo(first.model_path, load_pairs(ds_dir), spec, d / "adapter")  # kept while its identity holds
