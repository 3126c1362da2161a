"""Run, compile, submit and schedule the KFP pipeline (pipelines/training.py).

    run_local   kfp.local + SubprocessRunner(use_venv=False): the whole DAG in this virtualenv
    compile     the pipeline YAML a cluster runs (image from $PSAMF_IMAGE)
    submit      one run on a KFP endpoint
    schedule    a recurring run: max_concurrency 1, no catch-up

Scheduled runs skip retraining when neither the data nor the code changed since the last
finished pipeline run with the same profile and overrides (`should_run`); the skip is recorded
as an MLflow run tagged `skipped=true`. `force` retrains anyway.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from psamf import __version__

PIPELINE_NAME = "psamf-training"
LOCAL_LOOP_WORKERS = 2  # kfp.local's cap on concurrent ParallelFor iterations (2.17)


def _pipeline():
    from pipelines.training import training

    return training


def pipeline_arguments(profile: str, overrides: Sequence[str], ranks: int | None = None,
                       run_name: str = "kfp", force: bool = False) -> dict[str, Any]:
    from psamf.config import load_config

    cfg = load_config(None, profile, list(overrides))  # fail fast on a bad key, before any task starts
    k = cfg.data.loo_users if ranks is None else ranks
    return {"profile": cfg.profile, "overrides": list(overrides), "loo_ranks": list(range(k)),
            "run_name": run_name, "force": force}


def compile_pipeline(path: str | Path) -> Path:
    from kfp import compiler

    from psamf.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        compiler.Compiler().compile(_pipeline(), str(tmp))
    return path


def run_local(profile: str, overrides: Sequence[str], pipeline_root: str | Path = "reports/kfp",
              force: bool = True) -> dict[str, Any]:
    """Run the whole DAG locally; returns the wall time and the task outputs' root."""
    from kfp import local

    from psamf.orchestration import LOOP_THREADS_ENV

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # kfp.local runs up to LOCAL_LOOP_WORKERS ParallelFor iterations at once: share the cores.
    os.environ.setdefault(LOOP_THREADS_ENV, str(max(1, (os.cpu_count() or 1) // LOCAL_LOOP_WORKERS)))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    t0 = time.perf_counter()
    _pipeline()(**pipeline_arguments(profile, overrides, run_name="kfp-local", force=force))
    return {"pipeline_root": str(root), "wall_s": round(time.perf_counter() - t0, 1)}


def submit(host: str, profile: str, overrides: Sequence[str], experiment: str = "psamf",
           package: str | Path | None = None) -> dict[str, Any]:
    import kfp

    client = kfp.Client(host=host)
    package = package or compile_pipeline(Path("reports") / "psamf-training.yaml")
    run = client.create_run_from_pipeline_package(str(package), arguments=pipeline_arguments(profile, overrides),
                                                  experiment_name=experiment, run_name=f"psamf-{profile}")
    return {"run_id": run.run_id, "host": host}


def schedule(host: str, cron: str, profile: str, overrides: Sequence[str], experiment: str = "psamf",
             name: str = "psamf-retrain", package: str | Path | None = None) -> dict[str, Any]:
    """A recurring run. KFP's cron has a seconds field: '0 0 3 * * *' is 03:00 every day."""
    import kfp

    if len(cron.split()) != 6:
        from psamf.errors import InputError
        raise InputError("--cron", f"{cron!r}: KFP cron needs 6 fields (seconds first), e.g. '0 0 3 * * *'")
    client = kfp.Client(host=host)
    package = package or compile_pipeline(Path("reports") / "psamf-training.yaml")
    exp = client.create_experiment(experiment)
    job = client.create_recurring_run(experiment_id=exp.experiment_id, job_name=name, cron_expression=cron,
                                      max_concurrency=1, no_catchup=True, pipeline_package_path=str(package),
                                      params=pipeline_arguments(profile, overrides, run_name="scheduled",
                                                                force=False))
    return {"recurring_run_id": getattr(job, "recurring_run_id", None), "cron": cron}


# ---- skip when nothing changed -------------------------------------------------------------------

def run_fingerprint(profile: str, overrides: Sequence[str], data_hash: str, code: str) -> str:
    blob = json.dumps({"profile": profile, "overrides": sorted(overrides), "data": data_hash, "code": code},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def code_version() -> str:
    """The git commit when there is one, else the package version (what an image carries)."""
    from psamf.tracking import git_commit

    commit = git_commit()
    return commit if commit != "unknown" else f"psamf-{__version__}"


def pipeline_fingerprint(cfg, overrides: Sequence[str]) -> str:
    """What a pipeline run is of: profile, overrides, the data hash and the code version."""
    from psamf import tracking

    return run_fingerprint(cfg.profile, overrides, tracking.data_hash(), code_version())


def should_run(cfg, overrides: Sequence[str], force: bool) -> tuple[bool, str, str]:
    """(run?, reason, fingerprint): skip if a completed pipeline run has the same fingerprint.

    `completed` is set on the parent run by the last stage (register), so a run that failed
    half-way never causes a skip."""
    import mlflow

    from psamf import tracking

    fp = pipeline_fingerprint(cfg, overrides)
    if force:
        return True, "forced", fp
    if not tracking.enabled():
        return True, "tracking off: cannot look up earlier runs", fp
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    exp_id = tracking.ensure_experiment(cfg)
    done = mlflow.search_runs([exp_id], filter_string=f"tags.pipeline_fingerprint = '{fp}' and "
                              "tags.stage = 'pipeline' and tags.completed = 'true'",
                              max_results=1, output_format="list")
    if done:
        return False, f"data and code unchanged since run {done[0].info.run_id}", fp
    return True, "data or code changed", fp
