"""Experiment tracking: the training curves and cfdpo's own figures, sent to the recipe's trackers.

`training(run_dir, spec)` surrounds the training of a run's adapters. While it is open,
`trainer_args(work_dir)` gives each Trainer its `report_to` and run name, so TRL reports the
training curves; TensorBoard writes each adapter's curves to RUN/tracking/tensorboard/<adapter>/;
MLflow's settings are in the environment (MLFLOW_EXPERIMENT_NAME, MLFLOW_TRACKING_URI, MLFLOW_TAGS)
and restored when it closes.

MLflow: a run directory is one MLflow run, its id kept in RUN/tracking.json so a rerun resumes it.
Each adapter's training is a child run of it (tag mlflow.parentRunId): TRL logs the Trainer's
arguments as parameters, and those differ between adapters, which one MLflow run refuses.

`log_results(run_dir, spec)`, after evaluation: the recipe as parameters (flattened), the pair
funnel, when each stage finished and the headline metrics, to the run directory's MLflow run and
to TensorBoard (RUN/tracking/tensorboard/cfdpo/). Other trackers get the training curves only.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cfdpo import dist
from cfdpo.errors import CfdpoError
from cfdpo.runio import read_json, write_json
from cfdpo.spec import TrackingSpec

# The tracking integrations whose package is not named like the integration: (module, package to install);
# None: the integration needs no package (kubeflow reads its server from the environment).
TRACKER_PACKAGES: dict[str, tuple[str, str] | None] = {
    "azure_ml": ("azureml", "azureml-core"), "comet_ml": ("comet_ml", "comet-ml"), "flyte": ("flytekit", "flytekit"),
    "mlflow": ("mlflow", "mlflow-skinny"), "kubeflow": None,
}


def check_trackers(names: list[str]) -> None:
    """Raise ValueError unless every name is a tracking integration of transformers whose package is installed."""
    import importlib.util

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ValueError(f"'{name}' is not a tracking integration; expected some of: {', '.join(INTEGRATION_TO_CALLBACK)}")
        if names.count(name) > 1:
            raise ValueError(f"'{name}' is listed twice")
        needs = TRACKER_PACKAGES.get(name, (name, name))
        if needs is not None and importlib.util.find_spec(needs[0]) is None:
            raise ValueError(f"'{name}' needs the {needs[1]} package: pip install {needs[1]}")


STATE = "tracking.json"  # in the run directory: {"mlflow_run_id": ...}
ENVIRONMENT = (  # set while tracking (mlflow.set_experiment sets MLFLOW_EXPERIMENT_ID), restored after
    "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI", "MLFLOW_TAGS", "TENSORBOARD_LOGGING_DIR",
)
OWN_TRACKERS = ("mlflow", "tensorboard")  # the trackers cfdpo's own figures go to
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # manifest.json's timestamps

_open: tuple[Path, TrackingSpec] | None = None  # (run directory, its tracking) while `training` is open


def tensorboard_dir(run_dir: Path) -> Path:
    return run_dir / "tracking" / "tensorboard"


def run_name(run_dir: Path, spec: TrackingSpec) -> str:
    return spec.run_name or run_dir.resolve().name


@contextmanager
def training(run_dir: Path, spec: TrackingSpec) -> Iterator[None]:
    """Report the training of this run's adapters to `spec.report_to` (nothing when it is empty)."""
    global _open
    if not spec.report_to:
        yield
        return
    with _environment(spec):
        if "mlflow" in spec.report_to and dist.is_main():
            with _mlflow_run(run_dir, spec) as parent:
                tags = json.loads(os.environ.get("MLFLOW_TAGS") or "{}")
                os.environ["MLFLOW_TAGS"] = json.dumps({**tags, "mlflow.parentRunId": parent.info.run_id})
        _open = (run_dir, spec)
        try:
            yield
        finally:
            _open = None


def trainer_args(work_dir: Path) -> dict:
    """The Trainer arguments that report the training of the adapter whose checkpoints go to `work_dir`
    (adapters/.<name>-work): `report_to` ([] outside `training`), `run_name` and `project`.

    Also points TensorBoard (its callback reads TENSORBOARD_LOGGING_DIR when the Trainer is made) at
    the adapter's folder; `training` restores the variable when it closes.
    """
    if _open is None:
        return {"report_to": []}
    run_dir, spec = _open
    adapter = work_dir.name.removeprefix(".").removesuffix("-work")
    if "tensorboard" in spec.report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir(run_dir) / adapter)
    args = {"report_to": list(spec.report_to), "run_name": f"{run_name(run_dir, spec)}/{adapter}"}
    if spec.project:
        args["project"] = spec.project
    return args


def log_results(run_dir: Path, spec: TrackingSpec) -> None:
    """Log the recipe, pair funnel, stage times and headline metrics to MLflow and TensorBoard, where asked for."""
    if not set(OWN_TRACKERS) & set(spec.report_to):
        return
    params = flatten(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")))
    scalars = run_scalars(run_dir)
    if "mlflow" in spec.report_to:
        with _environment(spec), _mlflow_run(run_dir, spec) as run:
            _log_mlflow(run.info.run_id, params, scalars)
    if "tensorboard" in spec.report_to:
        _log_tensorboard(tensorboard_dir(run_dir) / "cfdpo", params, scalars)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings as {"a.b.c": text}: strings as they are, other values as JSON."""
    if isinstance(data, dict):
        flat = {}
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}{_tracker_key(str(key))}."))
        return flat
    return {prefix.removesuffix("."): data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}


def run_scalars(run_dir: Path) -> dict[str, float]:
    """The run's figures found in its files (missing files and fields are left out):
    pairs/<variant>/{candidates,count}, stages/<stage>/finished_after_s (since the run was made),
    metrics/<model>/<condition>/score, metrics/<model>/{nll_ratio,mcq_accuracy,kl}."""
    found: dict[str, Any] = {}
    for stats_path in sorted((run_dir / "pairs").glob("*/stats.json")):
        stats = _read(stats_path)
        for key in ("candidates", "count"):
            found[f"pairs/{stats_path.parent.name}/{key}"] = stats.get(key)
    manifest = _read(run_dir / "manifest.json")
    created = _timestamp(manifest.get("created"))
    for stage, entry in _mapping(manifest, "stages").items():
        finished = _timestamp(_dig(entry, "finished"))
        if created is not None and finished is not None:
            found[f"stages/{stage}/finished_after_s"] = finished - created
    metrics = _read(run_dir / "metrics.json")
    conditions = metrics.get("conditions") if isinstance(metrics.get("conditions"), list) else []
    for model, entry in _mapping(metrics, "models").items():
        for condition in conditions:
            found[f"metrics/{model}/{condition}/score"] = _dig(entry, condition, "score")
        for condition, result in _mapping(entry, "conditions").items():
            found[f"metrics/{model}/{condition}/score"] = _dig(result, "score")
        for key, path in (("nll_ratio", ("nll_ratio",)), ("mcq_accuracy", ("mcq_accuracy",)), ("kl", ("capability", "kl"))):
            found[f"metrics/{model}/{key}"] = _dig(entry, *path)
    return {_tracker_key(key): float(value) for key, value in found.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)}


def _tracker_key(key: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . / : and spaces)."""
    return re.sub(r"[^\w./: -]", "_", key)


def _read(path: Path) -> dict:
    try:
        data = read_json(path)
    except (CfdpoError, OSError):  # missing or unreadable: nothing to log from it
        return {}
    return data if isinstance(data, dict) else {}


def _dig(data: Any, *keys: str) -> Any:
    """data[k1][k2]...; None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _mapping(data: Any, key: str) -> dict:
    """data[key] where it is a mapping; otherwise {}."""
    value = _dig(data, key)
    return value if isinstance(value, dict) else {}


def _timestamp(text: Any) -> float | None:
    try:
        return datetime.strptime(text, TIME_FORMAT).timestamp()
    except (TypeError, ValueError):
        return None


@contextmanager
def _environment(spec: TrackingSpec) -> Iterator[None]:
    """MLflow's experiment and tracking URI from the recipe in the environment; every variable restored on exit."""
    saved = {key: os.environ.get(key) for key in ENVIRONMENT}
    if spec.project:
        os.environ["MLFLOW_EXPERIMENT_NAME"] = spec.project
    if spec.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = spec.tracking_uri
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _mlflow_run(run_dir: Path, spec: TrackingSpec):
    """The run directory's MLflow run, active: resumed by the id in tracking.json, or started (and its id saved)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    state = _read(run_dir / STATE)
    try:
        if spec.project:
            mlflow.set_experiment(spec.project)
        try:
            run = mlflow.start_run(run_id=state["mlflow_run_id"]) if "mlflow_run_id" in state else None
        except MlflowException:  # not in this tracking store
            run = None
        run = run or mlflow.start_run(run_name=run_name(run_dir, spec))
    except MlflowException as e:
        raise CfdpoError(f"tracking: MLflow cannot use the tracking store {mlflow.get_tracking_uri()}: "
                         f"{(str(e).strip().splitlines() or ['unknown error'])[0]}") from None
    if state.get("mlflow_run_id") != run.info.run_id:
        write_json(run_dir / STATE, {**state, "mlflow_run_id": run.info.run_id})
    with run:
        yield run


def _log_mlflow(run_id: str, params: dict[str, str], scalars: dict[str, float]) -> None:
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    logged = mlflow.get_run(run_id).data.params  # a parameter is logged once: a rerun adds only new ones
    mlflow.log_params({key: value[:MAX_PARAM_VAL_LENGTH] for key, value in params.items() if key not in logged})
    mlflow.log_metrics(scalars, step=0)


def _log_tensorboard(folder: Path, params: dict[str, str], scalars: dict[str, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)  # written whole each time: one value per figure
    writer = SummaryWriter(log_dir=str(folder))
    try:
        rows = "".join(f"| {key} | {value.replace('|', '/')} |\n" for key, value in params.items())
        writer.add_text("recipe", "| parameter | value |\n|---|---|\n" + rows)
        for key, value in scalars.items():
            writer.add_scalar(key, value, 0)
    finally:
        writer.close()
