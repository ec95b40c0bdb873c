"""Publish a run directory's pairs and adapters in formats other tools read.

- `hf` (default): `OUT/dataset/` (one parquet split per variant + a dataset card) and
  `OUT/models/<adapter>/` (the PEFT adapter files + a model card), as Hugging Face Hub repos hold them;
  `push_to_hub` uploads them.
- `openrlhf`: `OUT/<variant>.jsonl`, one pair per line, prompt/chosen/rejected as message lists.
- `llamafactory`: `OUT/<variant>.json` in LLaMA-Factory's sharegpt preference format + `OUT/dataset_info.json`.

The export is written aside and renamed into place at the end, so `OUT` is whole or absent. The
field mappings are documented in docs/EXPORT.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfdpo import variants
from cfdpo.errors import CfdpoError
from cfdpo.models import BUILTIN, HUB_ID_RE
from cfdpo.recipe import Recipe, dump_recipe, load_recipe
from cfdpo.runio import read_json, write_json

FORMATS = ("hf", "openrlhf", "llamafactory")
DATASET_TAGS = ["dpo", "counterfactual-dpo", "preference", "synthetic", "cfdpo"]
LICENSE_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt"}
PAPER = "Butcher 2024, *Aligning Large Language Models with Counterfactual DPO*, arXiv:2401.09566"


@dataclass
class RunContents:
    """What an export reads from a run directory."""

    dir: Path
    recipe: Recipe
    pairs: dict[str, Any]  # variant -> datasets.Dataset, in the recipe's variant order; none for 0 pairs
    stats: dict[str, dict]  # variant -> pairs/<variant>/stats.json, every variant with a pairs folder
    adapters: dict[str, Path]  # adapter name -> adapters/<name>/, in the report's model order
    metrics: dict | None  # metrics.json, when the run was evaluated


def read_run(run_dir: str | Path) -> RunContents:
    from cfdpo.pairs import load_pairs
    from cfdpo.report import check_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise CfdpoError(f"{run_dir}: not a run directory (no recipe.yaml); expected a folder made by `cfdpo run`")
    recipe = load_recipe(run_dir / "recipe.yaml")
    pairs, stats = {}, {}
    for variant in recipe.variants:
        folder = run_dir / "pairs" / variant
        if folder.is_dir():
            stats[variant] = read_json(folder / "stats.json")
            if stats[variant].get("count") != 0:  # a variant that kept no pairs has no split
                pairs[variant] = load_pairs(folder)
    if not pairs:
        raise CfdpoError(f"{run_dir / 'pairs'}: no pairs to export; run `cfdpo pairs {run_dir}` first "
                         "(a variant that kept none has nothing to export)")
    adapters = {name: run_dir / "adapters" / name for name in variants.TRAINED_ORDER
                if (run_dir / "adapters" / name / "adapter_config.json").is_file()}
    metrics_path = run_dir / "metrics.json"
    metrics = check_metrics(read_json(metrics_path), metrics_path) if metrics_path.is_file() else None
    return RunContents(run_dir, recipe, pairs, stats, adapters, metrics)


def hub_base_model(model: str, override: str | None = None) -> str | None:
    """The Hub id of the base model: `override`, else the recipe's model when it names a Hub repo, else None."""
    if override is not None:
        if not HUB_ID_RE.match(override):
            raise CfdpoError(f"--base-model '{override}': expected a Hub id like org/name")
        return override
    local = model in BUILTIN or model.endswith(".gguf") or model.startswith((".", "/", "~")) or Path(model).exists()
    return None if local or not HUB_ID_RE.match(model) else model


def export_run(
    run_dir: str | Path, out: str | Path, fmt: str = "hf", push_to_hub: str | None = None,
    base_model: str | None = None, license_id: str = "other",
) -> Path:
    """Write the export of `run_dir` to the new folder `out`; with `push_to_hub`, upload it after (hf only)."""
    if fmt not in FORMATS:
        raise CfdpoError(f"--format '{fmt}': expected one of: {', '.join(FORMATS)}")
    if push_to_hub is not None and fmt != "hf":
        raise CfdpoError(f"--push-to-hub: uploads the hf format only; drop --format {fmt} or --push-to-hub")
    if push_to_hub is not None and not HUB_ID_RE.match(push_to_hub):
        raise CfdpoError(f"--push-to-hub '{push_to_hub}': expected a Hub repo id like user/name")
    if not LICENSE_RE.match(license_id):
        raise CfdpoError(f"--license '{license_id}': expected a Hub license id such as apache-2.0, mit or other")
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise CfdpoError(f"{out}: already exists and is not an empty folder; choose a new --out")
    run = read_run(run_dir)
    hub_model = hub_base_model(run.recipe.model, base_model)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed export
    partial.mkdir()
    try:
        if fmt == "hf":
            write_hf(run, partial, hub_model, license_id)
        elif fmt == "openrlhf":
            write_openrlhf(run, partial)
        else:
            write_llamafactory(run, partial)
        if out.is_dir():
            out.rmdir()
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if push_to_hub is not None:
        upload(out, push_to_hub)
    return out


# --- hf: parquet dataset + PEFT adapters, each with a card -------------------------------------------


def write_hf(run: RunContents, folder: Path, hub_model: str | None, license_id: str) -> None:
    from datasets.utils.logging import disable_progress_bar
    from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

    disable_progress_bar()
    files = {}
    for variant, ds in run.pairs.items():
        files[variant] = f"data/{variant}-00000-of-00001.parquet"
        (folder / "dataset" / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / "dataset" / files[variant]))
    meta = DatasetCardData(
        license=license_id, task_categories=["text-generation"], tags=DATASET_TAGS,
        pretty_name=f"{run.recipe.behaviour.name}: Counterfactual DPO pairs",
        configs=[{"config_name": "default", "data_files": [{"split": v, "path": p} for v, p in files.items()]}],
    )
    DatasetCard(f"---\n{meta.to_yaml()}\n---\n\n{dataset_card_body(run)}").save(folder / "dataset" / "README.md")
    for name, source in run.adapters.items():
        dest = folder / "models" / name
        dest.mkdir(parents=True)
        for item in source.iterdir():  # the adapter's own files; merged/ (a whole model) stays behind
            if item.is_file():
                shutil.copy2(item, dest / item.name)
        if hub_model:  # point the adapter at the Hub model, not at the folder it was trained from
            config = read_json(dest / "adapter_config.json")
            write_json(dest / "adapter_config.json", {**config, "base_model_name_or_path": hub_model})
        log = read_json(source / "train_log.json")
        kind = log.get("kind", "dpo")
        meta = ModelCardData(
            library_name="peft", license=license_id, pipeline_tag="text-generation",
            tags=["cfdpo", "counterfactual-dpo", kind, "lora", "trl"],
            **({"base_model": hub_model, "base_model_relation": "adapter"} if hub_model else {}),
        )
        body = model_card_body(run, name, log, hub_model)
        ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{body}").save(dest / "README.md")


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    from cfdpo.report import md_table

    return "\n".join(md_table(head, [[str(cell).replace("|", "\\|").replace("\n", " ") for cell in r] for r in rows]))


def _instructions(recipe: Recipe) -> str:
    b = recipe.behaviour
    rows = [[cond, f"`{text}`"] for cond, text in (("treatment", b.treatment), ("negative", b.negative)) if text]
    where = ("in the user turn, a blank line before the prompt" if b.placement == "user_prefix"
             else "as the system prompt")
    system = f" Every prompt has the fixed system prompt `{b.system_prompt}`." if b.system_prompt else ""
    return f"{_md_table(['condition', 'instruction'], rows)}\n\nThe instruction goes {where}.{system}"


def _scorer(recipe: Recipe) -> str:
    from cfdpo.scorers import make_scorer

    spec = recipe.behaviour.scorer
    unit = make_scorer(spec.name, spec.params).unit
    return (f"`{spec.name}` ({unit}); **{spec.desired}** is the desired direction; "
            f"parameters: `{json.dumps(spec.params, ensure_ascii=False)}`.")


def _recipe_block(recipe: Recipe) -> str:
    return f"```yaml\n{dump_recipe(recipe)}```"


def _fmt(value: Any) -> str:
    from cfdpo.report import fmt_value

    return fmt_value(value)


def dataset_card_body(run: RunContents) -> str:
    r = run.recipe
    funnel = []
    for variant, stats in run.stats.items():
        row = variants.get(variant)
        funnel.append([f"`{variant}`" if variant in run.pairs else "(none)", row.label, f"{row.prompt} prompt", f"{row.chosen} answer", f"{row.rejected} answer",
                       row.teaches, stats.get("candidates"), stats.get("count"), _fmt(stats.get("score_chosen")),
                       _fmt(stats.get("score_rejected"))])
    head = ["split", "variant", "prompt", "chosen", "rejected", "teaches", "candidates", "kept",
            "mean score chosen", "mean score rejected"]
    candidates = ("sample i of the chosen condition paired with sample i of the rejected one, pairs of identical "
                  "answers dropped")
    kept = ("best-of-k: per prompt, the best-scoring chosen sample paired with the worst-scoring rejected one"
            if r.pairs.best_of_k else "every candidate")
    if r.pairs.filter:
        kept += ", less the pairs whose chosen answer does not beat the rejected one on the scorer"
    split = next(iter(run.pairs))
    return f"""# {r.behaviour.name}: Counterfactual DPO preference pairs

Synthetic preference pairs made by cfdpo with Counterfactual DPO ({PAPER}).
The model `{r.model}` answered {r.prompts.train_size} prompts (`{r.prompts.source}`) three ways: as asked
(control), with the treatment instruction and with the negative instruction, {r.generation.samples} answer(s)
each (temperature {r.generation.temperature}, at most {r.generation.max_new_tokens} new tokens). No human labels:
which answer is chosen follows from the instruction that produced it.

## Instructions

{_instructions(r)}

## Splits: how the pairs were made

One split per variant that kept pairs. The prompt given to DPO and the two answers come from the conditions named in the
row (the answers were produced under their own condition's prompt).

{_md_table(head, funnel)}

Candidates: {candidates}. Kept: {kept}.

## Scorer

{_scorer(r)}

## Columns

TRL's conversational preference format, plus where each pair came from:

- `prompt`: the messages given to DPO (`role`, `content`), possibly with a system message
- `chosen`, `rejected`: one assistant message each
- `prompt_id`, `sample`: the prompt and the sample index; `chosen_key`, `rejected_key`: the answers' rows in the
  run's `answers.jsonl`

## Use

```python
from datasets import load_dataset

pairs = load_dataset("PATH_OR_REPO_ID", split="{split}")
```

With TRL's command line: `trl dpo --dataset_name PATH_OR_REPO_ID --dataset_train_split {split} --model_name_or_path ...`.

## Recipe

{_recipe_block(r)}
"""


def _training_table(log: dict, recipe: Recipe) -> str:
    spec = log.get("spec") or recipe.dpo.model_dump(mode="json")
    history = log.get("log_history") or []
    final = next((e for e in reversed(history) if "train_loss" in e), {})
    steps = max((e.get("step", 0) for e in history), default=None)
    rows = [["method", "SFT (TRL SFTTrainer)" if log.get("kind") == "sft" else "DPO (TRL DPOTrainer)"],
            *([key, json.dumps(value) if isinstance(value, (list, dict)) else value] for key, value in spec.items()),
            ["training examples", log.get("pairs")], ["optimizer steps", steps],
            ["final training loss", _fmt(final.get("train_loss"))], ["runtime (s)", log.get("train_runtime")]]
    return _md_table(["setting", "value"], [[k, "–" if v is None else v] for k, v in rows])


def _metrics_section(run: RunContents) -> str:
    from cfdpo.report import MODEL_NOTES, table_rows

    if run.metrics is None:
        return "This run was not evaluated (no metrics.json)."
    head, rows = table_rows(run.metrics)
    b = run.metrics["behaviour"]
    names = "; ".join(f"`{m}` {MODEL_NOTES.get(m, m)}" for m in run.metrics["models"])
    n = run.metrics.get("n_eval_prompts", "the")
    return (f"{n} held-out prompts (never used for training). Score: scorer `{b['scorer']}` ({b.get('unit', '')}), "
            f"**{b['desired']}** is better. `nll_ratio`: per-token NLL of the base model's sampled "
            f"answers to unrelated prompts under the model, over the base model's own (1.0: unchanged).\n\n{_md_table(head, rows)}\n\nModels: {names}.")


def model_card_body(run: RunContents, name: str, log: dict, hub_model: str | None) -> str:
    from cfdpo.report import MODEL_NOTES

    r = run.recipe
    row = variants.BY_NAME.get(name)
    made = (f"Pairs: the {row.prompt} prompt, the {row.chosen} answer chosen over the {row.rejected} answer; "
            f"it teaches the model to {row.teaches}." if row else "")
    base = f"`{hub_model}`" if hub_model else f"`{r.model}` (not a Hub id: pass `--base-model` to name one)"
    load_base = hub_model or "BASE_MODEL"
    return f"""# {r.behaviour.name}: {MODEL_NOTES.get(name, name)} LoRA adapter (`{name}`)

A PEFT LoRA adapter trained by cfdpo with Counterfactual DPO ({PAPER}) on pairs the base
model made itself, with no human labels. {made}

Base model: {base}.

## Instructions

{_instructions(r)}

Scorer: {_scorer(r)}

## Training

{_training_table(log, r)}

`train_log.json` holds TRL's full log history.

## Evaluation

{_metrics_section(run)}

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{load_base}")
model = PeftModel.from_pretrained(base, "PATH_OR_REPO_ID")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")
```

## Recipe

{_recipe_block(r)}
"""


def upload(folder: Path, repo_id: str) -> list[str]:
    """Upload an hf export: the dataset to the dataset repo `repo_id`, each adapter to the model repo `repo_id-<adapter>`."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise CfdpoError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, the Hub is not reachable; "
                         f"the export is kept in {folder}")
    api = HfApi()
    targets = [(repo_id, "dataset", folder / "dataset")]
    targets += [(f"{repo_id}-{p.name}", "model", p) for p in sorted((folder / "models").glob("*")) if p.is_dir()]
    urls = []
    for repo, kind, path in targets:
        try:
            url = api.create_repo(repo, repo_type=kind, exist_ok=True)
            api.upload_folder(repo_id=repo, repo_type=kind, folder_path=str(path), commit_message="cfdpo export")
        except Exception as e:  # noqa: BLE001 - offline, refused, unauthorised: whatever the Hub client raises
            message = (str(e).splitlines() or [""])[0][:200]
            raise CfdpoError(f"--push-to-hub {repo}: upload failed ({type(e).__name__}: {message}); "
                             f"the export is kept in {folder}") from None
        urls.append(str(url))
    return urls


# --- OpenRLHF and LLaMA-Factory ----------------------------------------------------------------------


def write_openrlhf(run: RunContents, folder: Path) -> None:
    """One JSONL file per variant; every pair as it is in the run (prompt/chosen/rejected message lists)."""
    for variant, ds in run.pairs.items():
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ds)
        (folder / f"{variant}.jsonl").write_text(lines, encoding="utf-8")


def sharegpt_pair(row: dict) -> dict:
    """One pair in LLaMA-Factory's sharegpt preference format; a leading system message goes to `system`."""
    messages = list(row["prompt"])
    system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else ""
    return {
        "conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages],
        "chosen": {"from": "gpt", "value": row["chosen"][-1]["content"]},
        "rejected": {"from": "gpt", "value": row["rejected"][-1]["content"]},
        "system": system,
        "prompt_id": row["prompt_id"],
        "sample": row["sample"],
    }


def write_llamafactory(run: RunContents, folder: Path) -> None:
    """One JSON file per variant and the `dataset_info.json` entries (`cfdpo_<variant>`) that register them."""
    info = {}
    for variant, ds in run.pairs.items():
        write_json(folder / f"{variant}.json", [sharegpt_pair(row) for row in ds])
        info[f"cfdpo_{variant}"] = {
            "file_name": f"{variant}.json", "formatting": "sharegpt", "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "system"},
        }
    write_json(folder / "dataset_info.json", info)
