"""Iterative on-policy rounds (`dpo.rounds: N`): each variant's adapter trained again on answers of its own.

Round 1 is the single-round pipeline: the base model's answers (answers.jsonl), the variant's pairs
(pairs/<variant>/), an adapter, written to rounds/1/adapters/<variant>/. Round r >= 2 answers the
same training prompts under the variant's conditions with round r-1's adapter applied (same plan and
seeds; the rows' model is `<base>|<variant>|<adapter hash>`, so the cache knows one adapter's
answers from another's), builds the variant's pairs from them with the same pair table and trains
on from round r-1's weights (the DPO reference stays the base model: the adapter disabled). Rounds
r >= 2 generate with the transformers backend (`TransformersGenerator` over the base model with the
adapter applied), whatever generation.backend says.

A round's score measures its adapter: the validation score of its published step when dpo.auto
validates (`uses_validation`), else the mean behaviour score of the adapter's own answers to the
training prompts under the variant's DPO prompt condition (control for enc / dis / contrastive,
negative for negation: where the variant's behaviour shows), which are among the next round's
answers (after the last round only those, into rounds/<N+1>/answers.jsonl). The rounds stop when a round's score does
not improve on the previous round's (`stop_reason`); the round before it is kept. adapters/<variant>/
is a copy of the kept round's adapter.

    rounds/summary.json          per variant: each round's score, its source, the round kept and why the rounds stopped
    rounds/<r>/score.json        per variant: the round's adapter's score and its source
    rounds/<r>/answers.jsonl     r >= 2: the answers of round r-1's adapters (every variant's, told apart by model)
    rounds/<r>/pairs/<variant>/  r >= 2: the variant's pairs from them
    rounds/<r>/adapters/<variant>/  the round's adapter

Every step resumes like its stage: answers are cached by key, pairs and adapters are rewritten only
when their inputs changed (an adapter's identity names the adapter it continued from), so a rerun
redoes nothing a finished round made.
"""

from __future__ import annotations

import shutil
import tempfile
from functools import partial
from pathlib import Path

from cfdpo import dist, variants
from cfdpo.pipeline import Run, answer_self_scores, generate_rows, train_variant, write_variant_pairs
from cfdpo.runio import JsonlLog, read_json, replace_dir, write_json

ROUNDS = "rounds"


def round_dir(run_dir: Path, number: int) -> Path:
    return Path(run_dir) / ROUNDS / str(number)


# --- the pure core ---

def improved(score: float, previous: float, desired: str) -> bool:
    return score < previous if desired == "lower" else score > previous


def stop_reason(scores: list[float], desired: str) -> str | None:
    """Why the rounds stop after the last of `scores` (round 1's adapter's first); None while it improves."""
    if len(scores) < 2 or improved(scores[-1], scores[-2], desired):
        return None
    last = len(scores)
    return (f"round {last}'s score {scores[-1]:.4g} did not improve on round {last - 1}'s {scores[-2]:.4g} "
            f"({desired} is better)")


def validation_score(train_log: dict) -> float:
    """The validation score of the step an adapter's train_log.json says was published."""
    return next(point["score"] for point in train_log["validation"] if point["step"] == train_log["best_step"])


def score_source(variant: str, validated: bool) -> str:
    """What scores a round's adapter: `validation`, or the condition of the variant's DPO prompt, whose
    answers show the variant's behaviour (control for enc / dis / contrastive, negative for negation)."""
    return "validation" if validated else variants.get_row(variant).prompt


def mean_condition_score(rows: list[dict], scorer, condition: str) -> float:
    """The mean behaviour score of the rows' answers under `condition`."""
    answers = [row["answer"] for row in rows if row["condition"] == condition]
    return sum(scorer.score_many(answers)) / len(answers)


# --- the loop ---

def uses_validation(run: Run) -> bool:
    """Whether each round's adapter has a validation score (dpo.auto with validation prompts, on a
    process that holds the whole model)."""
    return run.recipe.dpo.auto and bool(run.validation_prompts()) and not dist.sharded_weights()


def round_pairs(run: Run, rows: list[dict], variant: str, scorer, out: Path) -> dict:
    """A round's pairs of one variant from its answer rows (self-scored by the base model under pairs.score self)."""
    self_scores = answer_self_scores(run, rows) if run.recipe.pairs.score == "self" else None
    return write_variant_pairs(rows, variant, run.recipe, scorer, out, self_scores)


def run_rounds(run: Run, variant: str, merge: bool = False) -> Path:
    """The variant's rounds (see the module docstring); returns adapters/<variant>/, the kept round's copy."""
    from cfdpo.scorers import make_scorer

    r = run.recipe
    scorer = make_scorer(r.behaviour.scorer.name, r.behaviour.scorer.params)
    desired = r.behaviour.scorer.desired
    source = score_source(variant, uses_validation(run))
    scores: list[float] = []
    adapters: list[Path] = []
    reason = None

    def judge(number: int, score: float) -> str | None:  # record round `number`'s score; why to stop, if so
        scores.append(score)
        dist.on_main(lambda: _write_if_changed(round_dir(run.dir, number) / "score.json", variant,
                                               {"score": score, "source": source}))
        return stop_reason(scores, desired)

    for number in range(1, r.dpo.rounds + 1):
        pairs_dir = run.dir / "pairs" / variant
        if number > 1:
            rows = policy_answers(run, variant, adapters[-1], number, conditions=None)
            if source != "validation":
                reason = judge(number - 1, mean_condition_score(rows, scorer, source))
                if reason:
                    break
            pairs_dir = round_dir(run.dir, number) / "pairs" / variant
            dist.on_main(partial(round_pairs, run, rows, variant, scorer, pairs_dir))
        start = adapters[-1] if adapters else None
        adapters.append(train_variant(run, variant, pairs_dir, round_dir(run.dir, number) / "adapters" / variant,
                                      merge, start))
        if source == "validation":
            reason = judge(number, validation_score(read_json(adapters[-1] / "train_log.json")))
            if reason:
                break
    else:
        if source != "validation":  # the last adapter's own answers under its prompt's condition score it
            rows = policy_answers(run, variant, adapters[-1], r.dpo.rounds + 1, conditions=(source,))
            reason = judge(r.dpo.rounds, mean_condition_score(rows, scorer, source))
    kept = len(scores) - 1 if reason else len(adapters)
    summary = {"source": source, "rounds": [{"round": i + 1, "score": s} for i, s in enumerate(scores)],
               "kept": kept, "stopped": reason or f"all {r.dpo.rounds} rounds ran"}
    dist.on_main(lambda: _write_if_changed(run.dir / ROUNDS / "summary.json", variant, summary))
    return dist.on_main(lambda: publish(adapters[kept - 1], run.dir / "adapters" / variant))


def policy_answers(run: Run, variant: str, adapter: Path, number: int, conditions: tuple[str, ...] | None) -> list[dict]:
    """The answers of the base model with `adapter` applied to the training prompts, under `conditions`
    (None: the variant's), into rounds/<number>/answers.jsonl; returns them."""
    from cfdpo.evaluate import adapter_hash
    from cfdpo.generate import GenParams, plan_rows
    from cfdpo.models import model_id
    from cfdpo.variants import BY_NAME

    r = run.recipe
    g = r.generation
    train, _ = run.split()
    policy = f"{model_id(run.model_path)}|{variant}|{adapter_hash(adapter)}"
    rows = plan_rows(train, conditions or BY_NAME[variant].conditions, r.behaviour, g.samples, policy,
                     GenParams(g.max_new_tokens, g.temperature, g.top_p), g.seed)
    path = round_dir(run.dir, number) / "answers.jsonl"
    generate_rows(run, rows, path, lambda: _policy_generator(run, adapter), f"round {number} {variant}")
    done = {row["key"]: row for row in JsonlLog(path).rows}
    return [done[row["key"]] for row in rows]


def _policy_generator(run: Run, adapter: Path) -> tuple:
    """(generator, tokenizer): the transformers backend over the base model with `adapter` applied."""
    from peft import PeftModel

    from cfdpo.backends.transformers import TransformersGenerator
    from cfdpo.models import load_model, load_tokenizer
    from cfdpo.runtime import resolve_dtype

    r = run.recipe
    tok = load_tokenizer(run.model_path, r.trust_remote_code)
    tok.padding_side = "left"
    base = load_model(run.model_path, resolve_dtype(r.generation.dtype), r.trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter)).to(dist.device())
    model.eval()
    return TransformersGenerator(model), tok


def publish(adapter: Path, out: Path) -> Path:
    """A copy of `adapter` at `out`, swapped in whole; left alone when it is already that adapter."""
    from cfdpo.runio import recover_dir

    recover_dir(out)
    if _same_adapter(out, adapter):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shutil.copytree(adapter, tmp / "adapter")
        replace_dir(tmp / "adapter", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _same_adapter(out: Path, adapter: Path) -> bool:
    from cfdpo.evaluate import adapter_hash
    from cfdpo.train import IDENTITY

    try:
        return ((out / IDENTITY).read_bytes() == (adapter / IDENTITY).read_bytes()
                and adapter_hash(out) == adapter_hash(adapter))
    except OSError:
        return False


def _write_if_changed(path: Path, variant: str, entry: dict) -> None:
    """Set `variant`'s entry of the JSON object at `path` (the file is left untouched when it has it already)."""
    data = read_json(path) if path.is_file() else {}
    if data.get(variant) != entry:
        write_json(path, {**data, variant: entry})
