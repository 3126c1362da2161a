"""Stage entry points for orchestrators (KFP components): artifact paths in, artifact paths out.

A KFP component hands each stage a few directories (its input and output artifacts); these
functions map them onto the same config keys the CLI and dvc.yaml use, call the same stage
functions, and report numbers to a KFP Metrics artifact. No stage logic lives here, only the
path mapping, so `psamf pipeline run`, `dvc repro` and `make demo` do the same work.

Layout of a `dataset` artifact: `raw/` (SDK corpus), `prepared/` (ingest output), `cache/`
(text features, computed once at ingest so every LOO task reuses them).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Protocol, Sequence

from psamf.config import Config, load_config


class MetricsSink(Protocol):
    def log_metric(self, metric: str, value: float) -> None: ...


def dataset_overrides(dataset: str | Path) -> list[str]:
    d = Path(dataset)
    return [f"data.raw_dir={d / 'raw'}", f"data.prepared_dir={d / 'prepared'}", f"text_features.cache_dir={d / 'cache'}"]


def stage_config(profile: str, overrides: Sequence[str], dataset: str | Path | None = None,
                 parent_run_id: str = "", extra: Sequence[str] = ()) -> Config:
    """The config a task runs with: params.yaml + profile + the run's overrides + artifact paths."""
    from psamf.tracking import PARENT_ENV

    if parent_run_id:
        os.environ[PARENT_ENV] = parent_run_id  # this task's stage runs nest under the pipeline run
    paths = dataset_overrides(dataset) if dataset is not None else []
    return load_config(None, profile or None, [*overrides, *paths, *extra])


def log_metrics(sink: MetricsSink | None, values: dict[str, Any], prefix: str = "") -> None:
    if sink is None:
        return
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            sink.log_metric(f"{prefix}{k}", float(v))


def retrain_decision(profile: str, overrides: Sequence[str], name: str, force: bool = True) -> str:
    """'run' or 'skip': skip when a completed pipeline run has the same data, code and config.

    A skip is recorded in MLflow as a `pipeline` run tagged skipped=true with the reason."""
    from psamf import tracking
    from psamf.pipeline import should_run

    cfg = stage_config(profile, overrides)
    go, reason, fp = should_run(cfg, overrides, force)
    if not go:
        tags = {"pipeline_fingerprint": fp, "skipped": True, "decision_reason": reason, "completed": False}
        with tracking.stage_run(cfg, "pipeline", f"{name}[skipped]", tags):
            pass
    return "run" if go else "skip"


def start_pipeline_run(profile: str, overrides: Sequence[str], name: str) -> str:
    """Open the parent MLflow run every task nests under; returns its id ('' with tracking off).

    It carries the run's fingerprint; `finish_pipeline_run` marks it completed at the end."""
    from psamf import tracking
    from psamf.pipeline import pipeline_fingerprint

    cfg = stage_config(profile, overrides)
    tags = {"pipeline_fingerprint": pipeline_fingerprint(cfg, overrides), "skipped": False, "decision_reason": "", "completed": False}
    with tracking.stage_run(cfg, "pipeline", name, tags) as run:
        return run.info.run_id or ""


def finish_pipeline_run(cfg: Config, parent_run_id: str) -> None:
    """Mark the parent run completed: later scheduled runs may skip against it."""
    if not parent_run_id:
        return
    import mlflow

    from psamf import tracking

    if tracking.enabled():
        mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
        mlflow.MlflowClient().set_tag(parent_run_id, "completed", "true")


def ingest_stage(profile: str, overrides: Sequence[str], dataset: str, parent_run_id: str = "",
                 metrics: MetricsSink | None = None) -> dict[str, Any]:
    """Build or simulate the raw corpus as configured, ingest it, precompute text features."""
    from psamf.data.ingest import ingest
    from psamf.data.prepared import load_prepared
    from psamf.data.text_features import text_features

    cfg = stage_config(profile, overrides, dataset, parent_run_id)
    if cfg.data.corpus == "synthetic":
        from psamf.data.synth import write_synthetic_corpus
        write_synthetic_corpus(cfg)
    elif cfg.data.corpus == "mosi":
        from psamf.data.ingest import corpus_sources
        from psamf.errors import InputError
        try:
            corpus_sources(cfg)
        except InputError:  # no real or simulated AV features yet
            from psamf.data.mosi import simulate_av
            simulate_av(cfg)
    report = ingest(cfg)
    text_features(cfg, load_prepared(cfg.data.prepared_path))
    log_metrics(metrics, {k: report[k] for k in ("n_labelled", "n_prepared")})
    return report


def validate_stage(profile: str, overrides: Sequence[str], dataset: str, docs_html: str,
                   parent_run_id: str = "", metrics: MetricsSink | None = None) -> None:
    """Run the GX suites; a failure raises, which fails the task and stops the run."""
    from psamf.validation import validate

    cfg = stage_config(profile, overrides, dataset, parent_run_id)
    out = Path(dataset).parent / (Path(dataset).name + "-validation")
    result = validate(cfg, out)
    Path(docs_html).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.data_docs_index, docs_html)  # GX's index page: the run's overview
    log_metrics(metrics, {"validation_success": float(result.success), "failures": len(result.failures)})
    if not result.success:
        raise RuntimeError("validation failed: " + "; ".join(result.failures[:5]))


def personality_stage(profile: str, overrides: Sequence[str], dataset: str, model: str,
                      parent_run_id: str = "", metrics: MetricsSink | None = None) -> dict[str, Any]:
    from psamf.personality_model import train_personality

    cfg = stage_config(profile, overrides, dataset, parent_run_id, [f"personality.out_dir={model}"])
    report = train_personality(cfg)
    log_metrics(metrics, {f"test_r_{k}": v for k, v in (report.get("test") or {}).items()})
    return report


LOOP_THREADS_ENV = "PSAMF_LOOP_THREADS"


def share_cores_in_loop() -> None:
    """Torch threads for a task inside the LOO ParallelFor, when the runner says how many.

    kfp.local runs two loop iterations at once on this machine's cores; with torch's default
    (all cores each) they oversubscribe the CPU and each runs several times slower. `run_local`
    sets $PSAMF_LOOP_THREADS; on a cluster every pod has its own CPUs and it stays unset."""
    n = os.environ.get(LOOP_THREADS_ENV)
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


def pretrain_stage(profile: str, overrides: Sequence[str], dataset: str, rank: int, model: str,
                   parent_run_id: str = "") -> dict[str, Any] | None:
    from psamf.personalized import pretrain, user_at_rank

    share_cores_in_loop()
    cfg = stage_config(profile, overrides, dataset, parent_run_id, [f"pretrain.out_dir={model}"])
    user = user_at_rank(cfg, rank)
    if user is None:  # a rank slot beyond data.loo_users
        Path(model).mkdir(parents=True, exist_ok=True)
        return None
    return pretrain(cfg, user)


def finetune_stage(profile: str, overrides: Sequence[str], dataset: str, rank: int, pretrained: str,
                   report: str, parent_run_id: str = "") -> dict[str, Any] | None:
    """Writes the user's finetune report JSON to `report` (an empty JSON object for a skipped slot)."""
    from psamf.io import write_json
    from psamf.personalized import finetune, user_at_rank

    share_cores_in_loop()
    cfg = stage_config(profile, overrides, dataset, parent_run_id, [f"pretrain.out_dir={pretrained}"])
    user = user_at_rank(cfg, rank)
    if user is None:
        write_json(report, {})
        return None
    return finetune(cfg, user, report_path=report)


def loo_report_stage(profile: str, overrides: Sequence[str], dataset: str, reports: Sequence[str],
                     out_dir: str, markdown: str, parent_run_id: str = "",
                     metrics: MetricsSink | None = None) -> dict[str, Any]:
    from psamf.personalized import tracked_loo_report

    cfg = stage_config(profile, overrides, dataset, parent_run_id)
    files = [Path(p) for p in reports if json.loads(Path(p).read_text() or "{}")]  # drop skipped slots
    summary = tracked_loo_report(cfg, report_files=files, out_dir=out_dir)
    shutil.copyfile(summary["files"]["markdown"], markdown)
    log_metrics(metrics, {f"{v}_{m}": x for v, ms in summary["averages"].items() for m, x in ms.items()})
    return summary


def tune_stage(profile: str, overrides: Sequence[str], dataset: str, personality: str, best_params: str,
               parent_run_id: str = "", metrics: MetricsSink | None = None) -> dict[str, Any]:
    from psamf.tune import report_dir, tune

    storage = os.environ.get("PSAMF_OPTUNA_STORAGE")
    extra = [f"psamf.personality_encoder={personality}", f"tune.out_dir={Path(best_params).parent / 'tune'}"]
    cfg = stage_config(profile, overrides, dataset, parent_run_id, extra + ([f"tune.storage={storage}"] if storage else []))
    if parent_run_id:
        # One study per pipeline run: a shared storage (PostgreSQL) must not hand this run the
        # finished trials of an earlier run on other data. A retried task resumes its own study.
        cfg = dataclasses.replace(cfg, tune=dataclasses.replace(
            cfg.tune, study_name=f"{cfg.tune.study_name}-{parent_run_id[:12]}"))
    result = tune(cfg)
    shutil.copyfile(report_dir(cfg) / "best_params.json", best_params)
    log_metrics(metrics, {"best_valid_mae": result.get("best_value")})
    return result


def train_stage(profile: str, overrides: Sequence[str], dataset: str, personality: str, best_params: str,
                model: str, parent_run_id: str = "", metrics: MetricsSink | None = None) -> dict[str, Any]:
    from psamf.psamf_train import train_psamf
    from psamf.tune import best_params_overrides

    best = best_params_overrides(best_params)
    cfg = stage_config(profile, overrides, dataset, parent_run_id,
                       [f"psamf.personality_encoder={personality}", *best])
    result = train_psamf(cfg, out_dir=model)
    log_metrics(metrics, result["test"], prefix="test_")
    return result


def register_stage(profile: str, overrides: Sequence[str], dataset: str, personality: str, model: str,
                   parent_run_id: str = "", metrics: MetricsSink | None = None) -> dict[str, Any]:
    from psamf.registry import register_stage as gate

    cfg = stage_config(profile, overrides, dataset, parent_run_id, [f"psamf.personality_encoder={personality}"])
    result = gate(cfg, "psamf", model_dir=model)
    finish_pipeline_run(cfg, parent_run_id)
    log_metrics(metrics, {"promoted": float(bool(result.get("promoted"))), **{
        f"test_{k}": v for k, v in (result.get("metrics") or {}).items()}})
    return result
