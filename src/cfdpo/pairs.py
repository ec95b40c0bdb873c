"""Counterfactual preference pairs: the heart of the method.

A variant (a row of the table in `cfdpo.variants`) names the condition whose messages form the
DPO prompt, the condition whose answer is chosen and the one whose answer is rejected. A retain
row does the same with its prompt rebuilt in the deployer's context (the instruction as the
system prompt), from the same answers; `mix_pairs` puts its pairs among its variant's.

Filtering and best-of-k rank answers by the behaviour's scorer, or (`pairs.score: self`) by their
self-scores under the base model (`cfdpo.self_reward`), computed beforehand and passed in by answer
key; then each pair also carries its self `margin`.

`build_pairs` and `mix_pairs` are pure (rows in, pairs out); `write_pairs` saves a `datasets`
dataset in TRL's conversational preference format plus `stats.json`.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from cfdpo import counterfactual, self_reward, variants
from cfdpo.errors import CfdpoError
from cfdpo.runio import recover_dir, replace_dir, write_json
from cfdpo.scorers import Scorer
from cfdpo.scorers.base import words
from cfdpo.spec import Behaviour

COLUMNS = ("prompt", "chosen", "rejected", "prompt_id", "sample", "chosen_key", "rejected_key")


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def build_pairs(
    rows: list[dict], variant: str, scorer: Scorer | None = None, desired: str = "lower",
    filter_pairs: bool = False, best_of_k: bool = False, behaviour: Behaviour | None = None,
    self_scores: Mapping[str, float] | None = None,
) -> list[dict]:
    """Pairs for one variant or retain row from answer rows (`prompt_id`, `condition`, `sample`, `messages`, `answer`).

    Sample i of the chosen condition is paired with sample i of the rejected condition.
    `filter_pairs` drops pairs whose chosen answer does not beat the rejected one on the scorer
    in the desired direction (for a row whose chosen answer shows the behaviour, a retain row:
    the other direction); `best_of_k` pairs, per prompt, the best-scoring chosen sample with
    the worst-scoring rejected sample (the largest scorer gap). A row with a placement of its own
    rebuilds its prompt from the row's `prompt` and `seed` with `behaviour` (the same paraphrase
    drawn as for the answers).

    With `self_scores` ({answer key: self-score}, `cfdpo.self_reward`) filtering and best-of-k rank
    answers by self-score instead of the scorer (higher is more desired; for a retain row, the other
    direction) and every pair gets its `margin`: filtering keeps the pairs whose margin is above 0.
    """
    variant_row = variants.get_row(variant)
    if (filter_pairs or best_of_k) and scorer is None and self_scores is None:
        raise ValueError("filtering and best-of-k need a scorer or self-scores")
    if variant_row.placement is not None and behaviour is None:
        raise ValueError(f"'{variant}' pairs rebuild their prompt at placement {variant_row.placement}: pass the behaviour")
    prompt_cond, chosen_cond, rejected_cond = variant_row.prompt, variant_row.chosen, variant_row.rejected
    by_prompt: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    order: list[str] = []
    for r in rows:
        if r["prompt_id"] not in by_prompt:
            order.append(r["prompt_id"])
        by_prompt[r["prompt_id"]][r["condition"]][r["sample"]] = r
    sign = -1.0 if desired == "lower" else 1.0  # larger signed score = more desired
    if variant_row.prefers_behaviour:
        sign = -sign  # larger signed score = more of the behaviour
    flip = -1.0 if variant_row.prefers_behaviour else 1.0  # a self-score's larger = more desired

    def value(r: dict) -> float:  # larger = the row's preferred direction
        if self_scores is not None:
            return flip * self_scores[r["key"]]
        return sign * scorer.score_one(r["answer"])

    pairs: list[dict] = []
    for pid in order:
        conds = by_prompt[pid]
        if not (conds.get(prompt_cond) and conds.get(chosen_cond) and conds.get(rejected_cond)):
            continue
        samples = sorted(set(conds[chosen_cond]) & set(conds[rejected_cond]) & set(conds[prompt_cond]))
        if best_of_k and samples:
            best = max((conds[chosen_cond][s] for s in samples), key=value)
            worst = min((conds[rejected_cond][s] for s in samples), key=value)
            candidates = [(samples[0], best, worst)]
        else:
            candidates = [(s, conds[chosen_cond][s], conds[rejected_cond][s]) for s in samples]
        for s, ch, rj in candidates:
            if ch["answer"].strip() == rj["answer"].strip():
                continue  # identical answers carry no preference
            if filter_pairs and not value(ch) > value(rj):
                continue
            asked = conds[prompt_cond][s]
            if variant_row.placement is None:
                prompt = asked["messages"]
            else:
                prompt = counterfactual.messages(asked["prompt"], prompt_cond, behaviour, pid, asked.get("seed", 0),
                                                 variant_row.placement)
            pair = {
                "prompt": prompt, "chosen": _assistant(ch["answer"]),
                "rejected": _assistant(rj["answer"]), "prompt_id": pid, "sample": s,
                "chosen_key": ch["key"], "rejected_key": rj["key"],
            }
            if self_scores is not None:
                pair["margin"] = self_reward.margin(value(ch), value(rj))
            pairs.append(pair)
    return pairs


def mix_pairs(parts: dict[str, list[dict]], seed: int) -> list[dict]:
    """One list of the pairs of several table rows (name -> pairs), each tagged with its `kind` (the
    row's name), in an order shuffled by `seed` (the same on every run)."""
    mixed = [{**pair, "kind": kind} for kind, pairs in parts.items() for pair in pairs]
    random.Random(seed).shuffle(mixed)
    return mixed


WEAK_SHARE = 0.25  # below this share of pairs whose chosen answer scores better, the pairs carry little signal


def pair_stats(pairs: list[dict], scorer: Scorer | None = None, candidates: int | None = None,
               desired: str | None = None) -> dict:
    """Counts, mean words and (with a scorer) mean scores of chosen and rejected answers; with `desired`
    also `better_share`, the share of pairs whose chosen answer scores better than its rejected one."""
    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    chosen = [p["chosen"][0]["content"] for p in pairs]
    rejected = [p["rejected"][0]["content"] for p in pairs]
    stats = {
        "count": len(pairs),
        "candidates": candidates if candidates is not None else len(pairs),
        "mean_words_chosen": mean([len(words(t)) for t in chosen]),
        "mean_words_rejected": mean([len(words(t)) for t in rejected]),
    }
    margins = [p["margin"] for p in pairs if "margin" in p]
    if margins:
        stats["mean_margin"] = mean(margins)
    if scorer is not None:
        stats["scorer"] = scorer.name
        chosen_scores, rejected_scores = scorer.score_many(chosen), scorer.score_many(rejected)
        stats["score_chosen"] = mean(chosen_scores)
        stats["score_rejected"] = mean(rejected_scores)
        if desired is not None:
            sign = 1 if desired == "higher" else -1
            stats["better_share"] = mean([float(sign * (c - r) > 0) for c, r in zip(chosen_scores, rejected_scores)])
    return stats


def weak_signal(variant: str, stats: dict) -> str | None:
    """A one-line warning when few of a variant's pairs show the behaviour's difference (`better_share`
    under `WEAK_SHARE`): the instructions barely change this model's answers, so DPO has little to learn."""
    share = stats.get("better_share")
    if share is None or share >= WEAK_SHARE:
        return None
    better = round(share * stats["count"])
    return (f"{variant}: in {better} of {stats['count']} pairs the chosen answer scores better than the rejected one "
            f"({stats.get('scorer')}): the instructions barely change this model's answers, so the pairs carry little "
            "of the behaviour; compare the prompted model's score with base's, or reword the instruction")


def write_pairs(pairs: list[dict], out_dir: str | Path, stats: dict) -> Path:
    """Save as a `datasets` dataset (load_from_disk) + stats.json; written aside, then renamed."""
    from datasets import Dataset

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if _same_pairs(out, pairs, stats):
        return out  # a rerun: leave the dataset (and the trainer's cache beside it) alone
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        columns = _columns(pairs)
        ds = Dataset.from_dict({c: [p[c] for p in pairs] for c in columns}) if pairs else Dataset.from_dict(
            {c: [] for c in columns}
        )
        ds.save_to_disk(str(tmp / "data"))
        write_json(tmp / "data" / "stats.json", stats)
        replace_dir(tmp / "data", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _columns(pairs: list[dict]) -> list[str]:
    """The dataset's columns: `margin` too with self-scores, `kind` when the pairs are mixed (`mix_pairs`)."""
    return [*COLUMNS, *(column for column in ("margin", "kind") if pairs and column in pairs[0])]


def _same_pairs(out: Path, pairs: list[dict], stats: dict) -> bool:
    recover_dir(out)
    try:
        if json.loads((out / "stats.json").read_text(encoding="utf-8")) != json.loads(json.dumps(stats)):
            return False
        ds = load_pairs(out)
        cols = [c for c in _columns(pairs) if c not in ("prompt", "chosen", "rejected")]
        return ds.select_columns(cols).to_list() == [{c: p[c] for c in cols} for p in pairs]
    except (OSError, ValueError, CfdpoError):
        return False


def load_pairs(pairs_dir: str | Path):
    from datasets import Dataset, load_from_disk

    p = Path(pairs_dir)
    recover_dir(p)
    if not (p / "state.json").is_file():
        raise CfdpoError(f"{p}: no pairs dataset here; run `cfdpo pairs` first")
    try:
        return load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - any reader failure means a damaged dataset
        if _kept_none(p):  # `datasets` cannot read back an empty dataset it saved
            return Dataset.from_dict({c: [] for c in COLUMNS})
        raise CfdpoError(f"{p}: cannot read the pairs dataset ({type(e).__name__}); rerun `cfdpo pairs`") from None


def _kept_none(pairs_dir: Path) -> bool:
    """Whether the pairs stage kept no pair here (its stats.json says so)."""
    try:
        return json.loads((pairs_dir / "stats.json").read_text(encoding="utf-8")).get("count") == 0
    except (OSError, ValueError):
        return False
