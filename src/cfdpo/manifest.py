"""The run manifest, `manifest.json`: what a run was made from, so it can be reproduced.

    {"cfdpo_manifest": 1, "created": ..., "recipe_sha256": ..., "inputs": {"prompts": ..., "model": ...},
     "seeds": {...}, "packages": {...}, "python": ..., "git_commit": ..., "machine": {...},
     "stages": {stage: {...}}}

`inputs` are fixed when the run directory is made; reopening the directory with inputs that
changed since (an edited prompt file, another model checkpoint) is refused, because the cached
answers, pairs and adapters were made from the old ones. A local model is identified by the
sha256 of its files' contents (`inputs.model.sha256`, see `models.model_sha256`); a manifest
without it was written by an older cfdpo that hashed file sizes only, and is refused. `machine`
is `runtime.machine()` where the run directory was made. `stages` records when each stage last
finished (and the package versions / git commit, where they differ from the ones at the top);
`stages.train.adapters` what each adapter was trained from (its
`identity.json`, see `train.adapter_identity`). Reopening a run with a recipe changed only in
evaluation settings (`Recipe.only_evaluation_changed_from`) updates `recipe_sha256` and drops
`stages.evaluate` and `stages.report`: those are due again, on the same answers, pairs and adapters.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import time
from importlib import metadata, resources
from pathlib import Path

from cfdpo import runtime
from cfdpo.errors import CfdpoError
from cfdpo.recipe import Recipe
from cfdpo.runio import file_sha256, read_json, write_json

PACKAGES = ("cfdpo", "torch", "transformers", "trl", "peft", "datasets", "accelerate")
NAME = "manifest.json"


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of the git checkout around `cwd` (default: the current directory), or None."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and len(sha) == 40 else None


def prompts_identity(recipe: Recipe) -> dict:
    from cfdpo.prompts import BUILTIN_SETS

    src = recipe.prompts.source
    if src in BUILTIN_SETS:
        data = (resources.files("cfdpo") / "data" / "prompts" / f"{src}.jsonl").read_bytes()
        return {"source": src, "sha256": hashlib.sha256(data).hexdigest()}
    return {"source": str(Path(src).resolve()), "sha256": file_sha256(src)}


def inputs(recipe: Recipe, model_path: str) -> dict:
    from cfdpo.models import model_id, model_sha256

    model = {"name": recipe.model, "id": model_id(model_path)}
    digest = model_sha256(model_path)
    if digest is not None:  # a local checkpoint (a hub id is its own identity)
        model["sha256"] = digest
    return {"prompts": prompts_identity(recipe), "model": model}


def build(recipe: Recipe, model_path: str) -> dict:
    return {
        "cfdpo_manifest": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe_sha256": hashlib.sha256(recipe.canonical_json().encode()).hexdigest(),
        "inputs": inputs(recipe, model_path),
        "seeds": {"prompts": recipe.prompts.seed, "generation": recipe.generation.seed, "dpo": recipe.dpo.seed},
        "packages": package_versions(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "machine": runtime.machine(),
        "stages": {},
    }


def check(run_dir: Path, recipe: Recipe, model_path: str) -> dict | None:
    """The saved manifest, after checking that the run's inputs are unchanged (None if there is none)."""
    path = run_dir / NAME
    if not path.exists():
        return None
    saved = read_json(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("inputs"), dict):
        raise CfdpoError(f"{path}: not a cfdpo manifest; expected the manifest.json cfdpo wrote")
    now = inputs(recipe, model_path)
    if "sha256" in now["model"] and "sha256" not in (saved["inputs"].get("model") or {}):
        raise CfdpoError(
            f"{run_dir}: made by an older cfdpo, which identified a model by its file sizes only; its answers cannot be "
            "checked against this model and would not be reused; use a new --out directory"
        )
    for what, fields in (("prompts", ("source", "sha256")), ("model", ("id",))):
        old, new = saved["inputs"].get(what) or {}, now[what]
        for f in fields:
            if old.get(f) != new[f]:
                label = "prompt file" if what == "prompts" else "model"
                raise CfdpoError(
                    f"{run_dir}: the {label} changed since this run started ({what}.{f} was {old.get(f)!s:.24}, "
                    f"now {new[f]!s:.24}); restore it or use a new --out directory"
                )
    return saved


def evaluation_changed(run_dir: Path, recipe: Recipe) -> None:
    """The run's recipe is now `recipe`, changed in evaluation settings only: its hash is updated and the
    evaluate and report stages are no longer recorded as finished (no-op if the run has no manifest)."""
    path = run_dir / NAME
    if not path.is_file():
        return
    m = read_json(path)
    m["recipe_sha256"] = hashlib.sha256(recipe.canonical_json().encode()).hexdigest()
    for stage in ("evaluate", "report"):
        m.setdefault("stages", {}).pop(stage, None)
    write_json(path, m)


def adapter_identities(run_dir: Path) -> dict[str, dict]:
    """Each trained adapter's identity.json, by adapter name."""
    from cfdpo.train import IDENTITY

    return {f.parent.name: read_json(f) for f in sorted((run_dir / "adapters").glob(f"*/{IDENTITY}"))}


def record_stage(run_dir: Path, stage: str, **info) -> None:
    """Note in the manifest that `stage` finished (atomic rewrite; no-op if the run has no manifest)."""
    path = run_dir / NAME
    if not path.is_file():
        return
    m = read_json(path)
    entry = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    if stage == "train":
        entry["adapters"] = adapter_identities(run_dir)
    versions, commit = package_versions(), git_commit()
    if versions != m.get("packages"):
        entry["packages"] = versions
    if commit != m.get("git_commit"):
        entry["git_commit"] = commit
    m.setdefault("stages", {})[stage] = entry
    write_json(path, m)
