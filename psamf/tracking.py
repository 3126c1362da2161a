"""MLflow tracking for every stage: one parent run per pipeline run, nested child runs below it.

- The tracking URI is `$MLFLOW_TRACKING_URI` or `tracking.uri` (default `sqlite:///mlruns.db`,
  artifacts next to it), so the embedded default needs no server and `mlflow ui
  --backend-store-uri sqlite:///mlruns.db` shows everything.
- A stage started inside an active run nests under it. A stage started as its own process
  (DVC, KFP) nests under `$PSAMF_PARENT_RUN_ID` when the orchestrator sets it.
- Each run records the flattened config (credentials masked) as params and tags: corpus, profile, av_simulated,
  code version and data version (psamf.fingerprint) and stage.
- `PSAMF_TRACKING=off` disables tracking (a no-op run), e.g. for quick local experiments.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from psamf.config import Config

log = logging.getLogger(__name__)
PARENT_ENV = "PSAMF_PARENT_RUN_ID"
# The stages that train: their runs carry MLflow system metrics (system/cpu_utilization_percentage, ...).
SYSTEM_METRICS_STAGES = ("personality", "pretrain", "train")
INPUT_STAGES = ("pretrain", "finetune", "train")  # training runs that read data/prepared: its dataset is their input
# MLflow 3's UI opens an experiment by its kind (tag mlflow.experimentKind): without one it guessed
# GenAI and showed an empty traces view; psamf's runs are trainings.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"


# A new sqlite store announces its schema migration at INFO on stderr; a CLI error must stay one
# line, and a user has no use for those lines anyway.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

def enabled() -> bool:
    return os.environ.get("PSAMF_TRACKING", "on").lower() not in ("off", "0", "false")


def tracking_uri(cfg: Config) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri


def data_hash(path: str | Path = "data.dvc") -> str:
    """The run's data version: $PSAMF_DATA_VERSION (set by the orchestrator from the fetched
    data), else the md5 DVC recorded for data/raw, else 'untracked'."""
    import yaml

    from psamf.fingerprint import DATA_ENV

    if os.environ.get(DATA_ENV):
        return os.environ[DATA_ENV]
    p = Path(path)
    if not p.is_file():
        return "untracked"
    try:
        outs = (yaml.safe_load(p.read_text()) or {}).get("outs") or [{}]
        return str(outs[0].get("md5", "untracked"))
    except Exception:  # a damaged data.dvc must not stop training; the tag says so
        return "unreadable"


def _tag(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def base_tags(cfg: Config, stage: str) -> dict[str, str]:
    from psamf.fingerprint import code_version

    return {"stage": stage, "corpus": cfg.data.corpus, "profile": cfg.profile, "git_commit": code_version(),
            "data_hash": data_hash()}


def ensure_experiment(cfg: Config) -> str:
    """Select the experiment, creating it with a local artifact root for a file/sqlite store
    (otherwise MLflow would drop artifacts in ./mlruns of whatever the cwd is)."""
    import mlflow

    name = cfg.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        uri = tracking_uri(cfg)
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        root = os.environ.get("PSAMF_ARTIFACT_ROOT") or cfg.tracking.artifacts
        try:
            mlflow.create_experiment(name, artifact_location=Path(root).resolve().as_uri() if local else None,
                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another process created it first
            pass
    elif exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # an experiment made before psamf set its kind
        try:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception as e:  # the UI's default view only; never a reason to stop a stage
            log.warning("MLflow: could not set the experiment kind (%s)", str(e).splitlines()[0][:120])
    return mlflow.set_experiment(name).experiment_id


def prepared_digest(path: str | Path) -> str:
    """The prepared data's digest: sha256 over its files (segments, arrays, manifest), 16 hex."""
    import hashlib

    from psamf.fingerprint import file_sha256

    h = hashlib.sha256()
    for name in ("segments.parquet", "arrays.npz", "manifest.json"):
        f = Path(path) / name
        h.update(f"{name}:{file_sha256(f) if f.is_file() else '-'}\n".encode())
    return h.hexdigest()[:16]


def experiment_link(ui: str, experiment_id: str) -> str:
    """The experiment's page in the MLflow UI on its training runs: MLflow 3.17's UI chooses
    GenAI or Model training per browser (this URL parameter, else its stored choice, default
    GenAI), whatever the experiment's kind tag says."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def compare_link(ui: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's side-by-side comparison of runs (e.g. two registered versions' source runs)."""
    import json
    from urllib.parse import quote

    return (f"{ui.rstrip('/')}/#/compare-runs?runs={quote(json.dumps(list(run_ids)))}"
            f"&experiments={quote(json.dumps([experiment_id]))}")


def log_prepared_input(cfg: Config, context: str = "training") -> None:
    """The prepared data as the active run's input dataset (the UI's Dataset column and lineage):
    named <corpus>-prepared, its digest `prepared_digest`, its source the prepared dir."""
    if not enabled():
        return
    import warnings

    import mlflow

    path = Path(cfg.data.prepared_path)
    if mlflow.active_run() is None or not (path / "manifest.json").is_file():
        return
    try:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # "resolved with the local source": yes, a local dir
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path.resolve()))
        dataset = MetaDataset(source=source, name=f"{cfg.data.corpus}-prepared", digest=prepared_digest(path))
        with _quick_retries():
            mlflow.log_input(dataset, context=context)
    except Exception as e:  # lineage is a courtesy; the stage's own work goes on
        log.warning("MLflow: could not log the input dataset (%s)", str(e).splitlines()[0][:120])


class _NullRun:
    """Stands in for an MLflow run when tracking is off; every call is a no-op."""

    info = type("info", (), {"run_id": None})()

    def __getattr__(self, name):  # pragma: no cover - trivial
        return lambda *a, **k: None


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, run_name: str | None = None, tags: dict[str, Any] | None = None,
              log_params: bool = True, system_metrics: bool | None = None) -> Iterator[Any]:
    """Open a run for `stage`, nested under the active or the orchestrator's parent run.
    `system_metrics`: log MLflow system metrics (default: for SYSTEM_METRICS_STAGES)."""
    if not enabled():
        yield _NullRun()
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    ensure_experiment(cfg)
    active = mlflow.active_run()
    kwargs: dict[str, Any] = {"run_name": run_name or stage}
    if active is not None:
        kwargs["nested"] = True
    elif os.environ.get(PARENT_ENV):
        kwargs["parent_run_id"] = os.environ[PARENT_ENV]
    all_tags = {**base_tags(cfg, stage), **{k: _tag(v) for k, v in (tags or {}).items()}}
    if system_metrics is None:
        system_metrics = stage in SYSTEM_METRICS_STAGES
    if system_metrics and SYSTEM_METRICS_ENV not in os.environ:
        kwargs["log_system_metrics"] = True  # CPU/GPU/memory beside the losses; the env var can turn it off
    run = mlflow.start_run(tags=all_tags, **kwargs)
    status = "FAILED"
    try:
        if log_params:
            mlflow.log_params({k: ("null" if v is None else v) for k, v in cfg.flat().items()})
        if stage in INPUT_STAGES:
            log_prepared_input(cfg)
        yield run
        status = "FINISHED"
    finally:
        _close(run, status)


# ---- surviving a tracking outage: the work goes on, its numbers follow when MLflow is back -------

# Each logging call gives up after a few seconds instead of MLflow's default of minutes of
# backoff; what it could not send waits in _pending and goes with the next call that works.
QUICK_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
PATIENCE_ENV = "PSAMF_TRACKING_PATIENCE_S"  # how long a finished stage waits for MLflow (default 120)
_pending: list[tuple[str, dict[str, float], int | None, int]] = []  # (run id, metrics, step, ms)


@contextlib.contextmanager
def _quick_retries() -> Iterator[None]:
    old = {k: os.environ.get(k) for k in QUICK_RETRIES}
    for k, v in QUICK_RETRIES.items():
        os.environ.setdefault(k, v)  # a user's own setting wins
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


def flush() -> bool:
    """Send the metrics an outage held back, oldest first; False while MLflow is unreachable."""
    import mlflow
    from mlflow.entities import Metric

    while _pending:
        run_id, values, step, ms = _pending[0]
        try:
            with _quick_retries():
                mlflow.MlflowClient().log_batch(run_id, metrics=[Metric(k, v, ms, step or 0) for k, v in values.items()])
        except Exception as e:  # any transport or server error: keep it for the next try
            log.warning("MLflow unreachable (%s); %d metric batch(es) held back, training goes on",
                        str(e).splitlines()[0][:120], len(_pending))
            return False
        _pending.pop(0)
    return True


def _close(run, status: str) -> None:
    """End the run; first wait (up to $PSAMF_TRACKING_PATIENCE_S) for held-back metrics to go out.
    If MLflow stays away, the stage still ends with its outputs written; the run says RUNNING."""
    import time

    import mlflow

    deadline = time.monotonic() + float(os.environ.get(PATIENCE_ENV, "120"))
    while not flush() and time.monotonic() < deadline:
        time.sleep(2.0)
    try:
        with _quick_retries():
            mlflow.end_run(status)
    except Exception as e:
        lost = sum(len(m) for r, m, _, _ in _pending if r == run.info.run_id)
        log.error("MLflow run %s could not be closed (%s); %d metric value(s) not logged",
                  run.info.run_id, str(e).splitlines()[0][:120], lost)


def _pipeline_runs(exp_id: str, fingerprint: str, completed: bool) -> list:
    """Parent runs of the pipeline with this fingerprint, newest first."""
    import mlflow

    return mlflow.search_runs([exp_id], filter_string=f"tags.pipeline_fingerprint = '{fingerprint}' and "
                              f"tags.stage = 'pipeline' and tags.completed = '{str(completed).lower()}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")


def pipeline_run(cfg: Config, fingerprint: str, name: str = "pipeline", tags: dict[str, Any] | None = None) -> str:
    """The MLflow parent run of the pipeline run with this fingerprint: the newest one that is
    not completed, else a new one. Tasks find it from the fingerprint (a content-keyed input),
    so a retried or re-run task nests under the same parent and KFP can cache every task."""
    if not enabled():
        return ""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp_id = ensure_experiment(cfg)
    found = _pipeline_runs(exp_id, fingerprint, completed=False)
    if found:
        if found[0].info.status != "RUNNING":  # a retry of a failed run: it spans the retry too
            mlflow.MlflowClient().update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    all_tags = {**base_tags(cfg, "pipeline"), "pipeline_fingerprint": fingerprint, "completed": "false",
                **{k: _tag(v) for k, v in (tags or {}).items()}}
    client = mlflow.MlflowClient()
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str("null" if v is None else v))
                                               for k, v in cfg.flat().items()])
    return run.info.run_id  # left RUNNING: the last task (or `psamf pipeline run`) ends it


def complete_pipeline_run(cfg: Config, run_id: str, status: str = "FINISHED") -> None:
    """End the parent run (the last stage does, or `psamf pipeline run` once the DAG is done), so
    its duration is the pipeline's; FINISHED also marks it completed: later runs start anew."""
    if run_id and enabled():
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(cfg))
        client = mlflow.MlflowClient()
        if status == "FINISHED":
            client.set_tag(run_id, "completed", "true")
        client.set_terminated(run_id, status)


def end_pipeline_runs(cfg: Config, fingerprint: str, status: str = "FINISHED",
                      cached_tasks: int | None = None) -> None:
    """End every still-running parent run of this fingerprint: under kfp.local's cache the last
    task may be served from the cache, and then nothing else ends the run its fingerprint opened."""
    if not enabled():
        return
    import mlflow

    try:
        with _quick_retries():
            mlflow.set_tracking_uri(tracking_uri(cfg))
            client = mlflow.MlflowClient()
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            if exp is None:
                return
            runs = client.search_runs([exp.experiment_id], f"tags.pipeline_fingerprint = '{fingerprint}' and "
                                      "tags.stage = 'pipeline' and attributes.status = 'RUNNING'")
            for run in runs:
                if cached_tasks is not None:
                    client.set_tag(run.info.run_id, "cached_tasks", str(cached_tasks))
                complete_pipeline_run(cfg, run.info.run_id, status)
    except Exception as e:  # the pipeline's outputs are written; a tracking outage must not fail it
        log.warning("MLflow: could not end the pipeline run (%s)", str(e).splitlines()[0][:120])


def ensure_user(uri: str, username: str, password: str) -> str:
    """Create (or reset the password of) a user on a tracking server running MLflow's basic-auth
    app, as the admin in MLFLOW_TRACKING_USERNAME/PASSWORD. Returns 'created' or 'updated'.
    The infra's mlflow-users Job runs this for the pipeline's user (infra/k8s/base/mlflow.yaml)."""
    from mlflow.exceptions import RestException
    from mlflow.server.auth.client import AuthServiceClient

    client = AuthServiceClient(uri)
    try:
        client.create_user(username, password)
        return "created"
    except RestException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    client.update_user_password(username, password)
    return "updated"


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if not enabled():
        return
    import math

    import time

    import mlflow

    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    run = mlflow.active_run()
    if clean and run is not None:
        _pending.append((run.info.run_id, clean, step, int(time.time() * 1000)))
        flush()


def log_artifact(path: str | Path, artifact_path: str | None = None, *, parent: bool = False) -> None:
    """Log a file to the active run; with `parent`, to its parent run (the pipeline run) instead,
    and nowhere when it has none."""
    if not enabled():
        return
    import mlflow

    active = mlflow.active_run()
    if active is not None and Path(path).exists():
        try:
            with _quick_retries():
                run_id = active.info.run_id
                if parent:
                    run_id = mlflow.MlflowClient().get_run(run_id).data.tags.get("mlflow.parentRunId")
                if run_id:
                    mlflow.MlflowClient().log_artifact(run_id, str(path), artifact_path)
        except Exception as e:  # the file is on disk; an outage must not fail a finished stage
            log.warning("MLflow: could not log %s (%s)", path, str(e).splitlines()[0][:120])


def set_tags(tags: dict[str, Any]) -> None:
    if not enabled():
        return
    import mlflow

    if mlflow.active_run() is not None:
        try:
            with _quick_retries():
                mlflow.set_tags({k: _tag(v) for k, v in tags.items()})
        except Exception as e:
            log.warning("MLflow: could not set tags %s (%s)", sorted(tags), str(e).splitlines()[0][:120])


def epoch_logger(prefix: str = ""):
    """An `on_epoch` callback for psamf.training.fit that logs each epoch's metrics with step."""

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        log_metrics({f"{prefix}{k}": v for k, v in metrics.items()}, step=epoch)

    return on_epoch
