"""Stage entry points for orchestrators (KFP components): artifact paths in, artifact paths out.

A KFP component hands each stage a few directories (its input and output artifacts); these
functions map them onto the same config keys the CLI and dvc.yaml use, call the same stage
functions, and report numbers to a KFP Metrics artifact. No stage logic lives here, only the
path mapping, so `psamf pipeline run`, `dvc repro` and `make demo` do the same work.

Every task gets only content-keyed inputs, so KFP's cache can skip it when nothing changed:
`profile`, `overrides`, `params_yaml` (the params file's text; '' = the image's params.yaml),
the run's `fingerprint` (psamf.fingerprint: code + data + params) and artifacts made by
cached tasks. The MLflow parent run is found (or created) from the fingerprint.

Artifacts: `raw` (fetch: `raw/<corpus>/...` + source.json), `dataset` (ingest: `prepared/`
and `cache/`, the text features computed once so every LOO task reuses them).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol, Sequence

from psamf.config import REAL_CORPORA, Config, load_config


class MetricsSink(Protocol):
    def log_metric(self, metric: str, value: float) -> None: ...


LOOP_THREADS_ENV = "PSAMF_LOOP_THREADS"
# A dir where a failing task leaves {task, exit_code, message}: `psamf pipeline run` (kfp.local) sets
# it, so the run ends with the failing task's own one-line error, not kfp.local's traceback.
TASK_ERRORS_ENV = "PSAMF_TASK_ERRORS"


def task(name: str):
    """Mark a stage function as the body of the pipeline task `name` (its name in the DAG). When it
    raises, the task's one-line error (as the stage command would print it) goes to its log and,
    under kfp.local, to $PSAMF_TASK_ERRORS; the exception still fails the task."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            from psamf.logs import install_redaction
            from psamf.resources import skip_final_gc_at_exit

            install_redaction()  # a kfp.local/KFP task process never ran the CLI's logging set-up
            skip_final_gc_at_exit()  # the task's process ends when it returns
            try:
                out = fn(*args, **kwargs)
            except Exception as e:
                record_task_error(name, e)
                raise
            for a in (*args, *kwargs.values()):
                write_metrics_file(a)
            return out

        run.task_name = name  # type: ignore[attr-defined]
        return run

    return wrap


def write_metrics_file(sink: Any) -> None:
    """A KFP Metrics output keeps its numbers in metadata and nothing writes its file. kfp.local's
    cache treats an output whose file is missing as a miss, so no task with metrics would ever be
    served from it: write the numbers to the file as well."""
    path = getattr(sink, "path", None)
    if path and callable(getattr(sink, "log_metric", None)) and not os.path.exists(path):
        import json

        from psamf.io import atomic_path

        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(getattr(sink, "metadata", {}) or {}, sort_keys=True) + "\n")


def record_task_error(name: str, e: BaseException) -> dict[str, Any]:
    import sys
    import time

    from psamf.errors import InputError, StageFailed
    from psamf.redact import redact

    if isinstance(e, (InputError, StageFailed)):
        code, what = (2 if isinstance(e, InputError) else e.exit_code), str(e)
    else:  # a bug or an outage, not the user's input: its type says more than its text alone
        code, what = 1, f"{type(e).__name__}: {e}"
    lines = what.strip().splitlines() or [type(e).__name__]
    what = redact(lines[0] if len(lines[0]) <= 1000 else lines[0][:1000] + "...")
    rec = {"task": name, "exit_code": code, "message": what}
    print(f"psamf: error: {what}", file=sys.stderr, flush=True)
    where = os.environ.get(TASK_ERRORS_ENV)
    if where:
        from psamf.io import write_json

        try:
            write_json(Path(where) / f"{time.time_ns()}-{os.getpid()}.json", rec)
        except OSError:  # the report is a courtesy; the task's own failure is what matters
            pass
    return rec


def params_file(params_yaml: str) -> Path | None:
    """The pipeline's params text as a file the config loader reads (content-addressed)."""
    if not params_yaml:
        return None
    from psamf.io import write_text

    digest = hashlib.sha256(params_yaml.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"psamf-params-{os.getuid()}-{digest}.yaml"
    if not path.is_file() or path.read_text(errors="replace") != params_yaml:  # never trust a file we did not write
        write_text(path, params_yaml)
    return path


def raw_overrides(raw: str | Path) -> list[str]:
    """A fetched `raw` artifact as the data root: its corpora, MOSI/MOSEI SDK dirs and personality corpus."""
    r = Path(raw) / "raw"
    sdk = [f"data.{c}_dir={r / c}" for c in REAL_CORPORA if (r / c).is_dir()]
    return [f"data.raw_dir={r}", f"data.shared_dir={r}", *sdk]


def dataset_overrides(dataset: str | Path) -> list[str]:
    d = Path(dataset)
    return [f"data.prepared_dir={d / 'prepared'}", f"text_features.cache_dir={d / 'cache'}"]


def set_task_threads(in_loo_loop: bool = False) -> None:
    """Torch threads: inside the LOO loop, its share when kfp.local runs iterations side by side
    ($PSAMF_LOOP_THREADS, set by run_local); else the pod's cgroup CPU limit (unless
    OMP_NUM_THREADS says otherwise)."""
    import torch

    from psamf.resources import cpu_count

    n = os.environ.get(LOOP_THREADS_ENV) if in_loo_loop else None
    n = n or (None if os.environ.get("OMP_NUM_THREADS") else str(cpu_count()))
    if n:
        torch.set_num_threads(max(1, int(n)))


def stage_config(profile: str, overrides: Sequence[str], params_yaml: str = "", fingerprint: str = "", *,
                 raw: str | Path | None = None, dataset: str | Path | None = None,
                 extra: Sequence[str] = ()) -> Config:
    """The config a task runs with: params + profile + the run's overrides + artifact paths.

    With a fingerprint, the task's stage runs nest under that pipeline run in MLflow."""
    from psamf import tracking

    paths = [*(raw_overrides(raw) if raw is not None else []), *(dataset_overrides(dataset) if dataset is not None else [])]
    if raw is not None:
        os.environ.pop("PSAMF_SHARED_DATA", None)  # the task reads its artifact, never a host path
        source = Path(raw) / "source.json"
        if source.is_file():
            from psamf.fingerprint import DATA_ENV
            os.environ[DATA_ENV] = json.loads(source.read_text())["data_version"]
    cfg = load_config(params_file(params_yaml), profile or None, [*overrides, *paths, *extra])
    if fingerprint:
        os.environ[tracking.PARENT_ENV] = tracking.pipeline_run(cfg, fingerprint)
    return cfg


def log_metrics(sink: MetricsSink | None, values: dict[str, Any], prefix: str = "") -> None:
    if sink is None:
        return
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            sink.log_metric(f"{prefix}{k}", float(v))


# ---------------------------------------------------------------------------- data

def run_fingerprint(profile: str, overrides: Sequence[str], params_yaml: str,
                    data_source: str) -> tuple[Config, str, str, str]:
    """(config, data version, fingerprint, params text) of a pipeline run: what its `fingerprint`
    task computes (and `run_local` recomputes to end the run's MLflow parent)."""
    from psamf.config import default_params_path
    from psamf.data.source import source_version
    from psamf.fingerprint import pipeline_fingerprint

    cfg = stage_config(profile, overrides, params_yaml)
    text = params_yaml or (default_params_path().read_text() if default_params_path().is_file() else "")
    data_version = source_version(cfg, data_source)
    return cfg, data_version, pipeline_fingerprint(cfg.profile, overrides, data_version, params_text=text), text


@task("fingerprint")
def fingerprint_stage(profile: str, overrides: Sequence[str], params_yaml: str, data_source: str,
                      name: str = "kfp") -> dict[str, str]:
    """The run's data version (from the source, no download) and fingerprint; opens the parent
    run. This task is never cached: it is what notices that the data or the code changed."""
    from psamf import tracking
    from psamf.fingerprint import code_version, params_hash

    cfg, data_version, fp, text = run_fingerprint(profile, overrides, params_yaml, data_source)
    tracking.pipeline_run(cfg, fp, name, tags={"data_version": data_version, "code_version": code_version(),
                                                "params_hash": params_hash(cfg.profile, overrides, text)})
    return {"data_version": data_version, "fingerprint": fp, "code_version": code_version()}


@task("fetch-data")
def fetch_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, data_source: str,
                data_version: str, raw: str) -> dict[str, Any]:
    """Materialize the corpus into the `raw` artifact (simulating MOSI's/MOSEI's AV when it has none)."""
    from psamf.data.source import materialize
    from psamf.io import write_json

    del fingerprint  # a cache key only: this task talks to no tracking server
    cfg = stage_config(profile, overrides, params_yaml)
    report = materialize(cfg, data_source, raw, expect_version=data_version)
    if cfg.data.corpus in REAL_CORPORA and cfg.data.format == "sdk":
        from psamf.data.ingest import corpus_sources
        from psamf.errors import InputError

        cfg = stage_config(profile, overrides, params_yaml, raw=raw)
        try:
            corpus_sources(cfg)
        except InputError:  # no real or simulated AV features in the source
            from psamf.data.mosi import simulate_av

            sim = Path(raw) / "simulated-av"  # simulate_av swaps in a whole dir: not the SDK dir itself
            report["simulated_av"] = simulate_av(cfg, sim)
            for f in sim.iterdir():
                os.replace(f, cfg.data.sdk_path / f.name)
            sim.rmdir()
    write_json(Path(raw) / "source.json", report)
    return report


@task("ingest")
def ingest_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, raw: str,
                 dataset: str, metrics: MetricsSink | None = None) -> dict[str, Any]:
    """Ingest the fetched corpus, then precompute the text features once for every later task."""
    from psamf.data.ingest import ingest

    set_task_threads()
    cfg = stage_config(profile, overrides, params_yaml, fingerprint, raw=raw, dataset=dataset)
    report = ingest(cfg, text_features=True)
    log_metrics(metrics, {k: report[k] for k in ("n_labelled", "n_prepared")})
    return report


@task("validate")
def validate_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, dataset: str,
                   docs_html: str, metrics: MetricsSink | None = None) -> None:
    """Run the GX suites; a failure raises, which fails the task and stops the run."""
    from psamf.validation import validate

    cfg = stage_config(profile, overrides, params_yaml, fingerprint, dataset=dataset)
    out = Path(docs_html).parent / (Path(docs_html).name + "-validation")
    result = validate(cfg, out)
    Path(docs_html).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.data_docs_index, docs_html)  # GX's index page: the run's overview
    log_metrics(metrics, {"validation_success": float(result.success), "failures": len(result.failures)})
    if not result.success:
        from psamf.errors import ValidationFailed

        raise ValidationFailed("validation failed: " + "; ".join(result.failures[:5]))


# ---------------------------------------------------------------------------- Personalized MulT

@task("personality")
def personality_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, raw: str,
                      model: str, metrics: MetricsSink | None = None) -> dict[str, Any]:
    from psamf.psa_mf.personality import train_personality

    set_task_threads()
    cfg = stage_config(profile, overrides, params_yaml, fingerprint, raw=raw, extra=[f"personality.out_dir={model}"])
    report = train_personality(cfg)
    log_metrics(metrics, {f"test_r_{k}": v for k, v in (report.get("test") or {}).items()})
    return report


@task("pretrain")
def pretrain_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, dataset: str,
                   rank: int, model: str) -> dict[str, Any] | None:
    from psamf.mult.pretrain import pretrain
    from psamf.mult.loo import skipped_slot_file, user_at_rank, write_skipped_slot

    set_task_threads(in_loo_loop=True)
    cfg = stage_config(profile, overrides, params_yaml, fingerprint, dataset=dataset,
                       extra=[f"pretrain.out_dir={model}"])
    user = user_at_rank(cfg, rank)
    if user is None:  # a rank slot beyond data.loo_users
        write_skipped_slot(cfg, skipped_slot_file(cfg, model, rank), rank)
        return None
    return pretrain(cfg, user)


@task("finetune")
def finetune_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, dataset: str,
                   rank: int, pretrained: str, report: str) -> dict[str, Any] | None:
    """Writes the user's finetune report JSON to `report` (the skipped-slot marker for a skipped slot)."""
    from psamf.mult.finetune import finetune
    from psamf.mult.loo import user_at_rank, write_skipped_slot

    set_task_threads(in_loo_loop=True)
    cfg = stage_config(profile, overrides, params_yaml, fingerprint, dataset=dataset,
                       extra=[f"pretrain.out_dir={pretrained}"])
    user = user_at_rank(cfg, rank)
    if user is None:
        write_skipped_slot(cfg, report, rank)
        return None
    return finetune(cfg, user, report_path=report)


@task("loo-report")
def loo_report_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, dataset: str,
                     reports: Sequence[str], out_dir: str, markdown: str,
                     metrics: MetricsSink | None = None, page: str | None = None) -> dict[str, Any]:
    from psamf.mult.loo import tracked_loo_report

    cfg = stage_config(profile, overrides, params_yaml, fingerprint, dataset=dataset)
    summary = tracked_loo_report(cfg, report_files=[Path(p) for p in reports], out_dir=out_dir)
    shutil.copyfile(summary["files"]["markdown"], markdown)
    if page:  # tables + chart as one HTML page for the KFP UI (Markdown cannot carry the chart)
        shutil.copyfile(summary["files"]["html"], page)
    log_metrics(metrics, {f"{v}_{m}": x for v, ms in summary["averages"].items() for m, x in ms.items()})
    return summary


# ---------------------------------------------------------------------------- PSA-MF

def _tune_config(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, dataset: str,
                 personality: str, out_dir: str) -> Config:
    """One study per fingerprint: a shared storage (PostgreSQL) never hands a run the trials of
    another run's data or code, and a retried task resumes its own study. The storage URL
    itself is read from $PSAMF_OPTUNA_STORAGE where it is used (psamf.psa_mf.tune.storage_url)."""
    cfg = stage_config(profile, overrides, params_yaml, fingerprint, dataset=dataset,
                       extra=[f"psamf.personality_encoder={personality}", f"tune.out_dir={out_dir}"])
    if fingerprint:
        cfg = dataclasses.replace(cfg, tune=dataclasses.replace(
            cfg.tune, study_name=f"{cfg.tune.study_name}-{fingerprint}"))
    return cfg


@task("tune-worker")
def tune_worker_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, dataset: str,
                      personality: str, rank: int, out_dir: str) -> dict[str, Any]:
    """One worker of the study (a ParallelFor iteration, one GPU each on a cluster). The first
    worker to reach the storage creates the study; the others find it (create_study handles the
    race), so no task runs before them just to create it."""
    from psamf.psa_mf.tune import tune

    set_task_threads()
    cfg = _tune_config(profile, overrides, params_yaml, fingerprint, dataset, personality, out_dir)
    return tune(cfg, workers=1, join=True, worker_index=rank, create=True)


@task("tune-report")
def tune_report_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, dataset: str,
                      personality: str, best_params: str, metrics: MetricsSink | None = None,
                      plots: str | None = None) -> dict[str, Any]:
    from psamf.psa_mf.tune import finish_study, report_dir

    cfg = _tune_config(profile, overrides, params_yaml, fingerprint, dataset, personality,
                       str(Path(best_params).parent / "tune"))
    result = finish_study(cfg)
    shutil.copyfile(report_dir(cfg) / "best_params.json", best_params)
    if plots:  # the interactive Optuna plots, rendered by the KFP UI as an HTML visualization
        shutil.copyfile(result["plots_html"], plots)
    log_metrics(metrics, {"best_valid_mae": result.get("best_value")})
    return result


@task("train")
def train_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, dataset: str,
                personality: str, best_params: str, model: str,
                metrics: MetricsSink | None = None) -> dict[str, Any]:
    from psamf.psa_mf.train import train_psamf
    from psamf.config import best_params_overrides

    set_task_threads()
    cfg = stage_config(profile, overrides, params_yaml, fingerprint, dataset=dataset,
                       extra=[f"psamf.personality_encoder={personality}", *best_params_overrides(best_params)])
    result = train_psamf(cfg, out_dir=model)
    log_metrics(metrics, result["test"], prefix="test_")
    return result


@task("register")
def register_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, dataset: str,
                   personality: str, model: str, metrics: MetricsSink | None = None) -> dict[str, Any]:
    """The registry gate: register the trained model, compare with @champion, set the alias."""
    from psamf.registry.gate import register_stage as gate

    cfg = stage_config(profile, overrides, params_yaml, fingerprint, dataset=dataset,
                       extra=[f"psamf.personality_encoder={personality}"])
    result = gate(cfg, "psamf", model_dir=model)
    log_metrics(metrics, {"promoted": float(bool(result.get("promoted"))), **{
        f"test_{k}": v for k, v in (result.get("metrics") or {}).items()}})
    return result


@task("report")
def report_stage(profile: str, overrides: Sequence[str], params_yaml: str, fingerprint: str, dataset: str,
                 loo_tables: str, model: str, page: str, out_dir: str,
                 metrics: MetricsSink | None = None) -> dict[str, Any]:
    """The personalization report, the DAG's last task: it then marks the parent run completed."""
    from psamf import tracking
    from psamf.reports.personalization import METRICS, report

    cfg = stage_config(profile, overrides, params_yaml, fingerprint, dataset=dataset)
    summary = report(cfg, Path(loo_tables) / "loo_summary.json", model, out_dir)
    shutil.copyfile(summary["files"]["html"], page)
    tracking.complete_pipeline_run(cfg, os.environ.get(tracking.PARENT_ENV, ""))
    log_metrics(metrics, {f"{m}_{METRICS[k]}": v for m, ms in summary["averages"].items() for k, v in ms.items()})
    return summary
