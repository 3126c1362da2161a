"""Run, compile, submit and schedule the KFP pipeline (pipelines/training.py).

    run_local   kfp.local + SubprocessRunner(use_venv=False): the whole DAG in this virtualenv
    compile     the pipeline YAML a cluster runs (image from $PSAMF_IMAGE)
    submit      one run on a KFP endpoint
    schedule    a recurring run: max_concurrency 1, no catch-up

KFP's cache skips every task whose inputs (fingerprint: code + data + params) are unchanged, on a
cluster and locally alike: kfp.local (2.17) keeps its own cache under <pipeline_root>/.kfp_cache
(`local.init(enable_caching=True, cache_root=...)`) and honours each task's set_caching_options,
so a second run on unchanged inputs is served task by task; `cache=False` (--no-cache) reruns all.
`--params FILE` travels as the pipeline parameter `params_yaml` (its text), so a pod that holds
only the image reads the same keys as the machine that submitted the run.

This is the only library module that imports pipelines/.
"""
from __future__ import annotations

import contextlib

import io
import re
import time
from pathlib import Path
from typing import Any, Sequence

PIPELINE_NAME = "psamf-training"
CACHE_DIR = ".kfp_cache"  # under the pipeline root: kfp.local's cache entries (JSON per task key)
LOCAL_LOOP_WORKERS = 2  # kfp.local's cap on concurrent ParallelFor iterations (2.17)


def _pipeline():
    from pipelines.training import training

    return training


def pipeline_arguments(profile: str | None, overrides: Sequence[str], params: str | Path | None = None,
                       data_source: str = "synthetic", ranks: int | None = None,
                       run_name: str = "kfp") -> dict[str, Any]:
    """The pipeline's parameters; the config is loaded here first so a bad key fails before any task."""
    from psamf.config import load_config, loo_rank_slots
    from psamf.io import read_text

    cfg = load_config(params, profile, list(overrides))
    return {"profile": cfg.profile, "overrides": list(overrides),
            "params_yaml": read_text(params) if params else "", "data_source": data_source,
            "loo_ranks": loo_rank_slots(cfg) if ranks is None else list(range(ranks)),
            "tune_workers": list(range(max(1, cfg.tune.workers))), "run_name": run_name}


def compile_pipeline(path: str | Path) -> Path:
    from kfp import compiler

    from psamf.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        compiler.Compiler().compile(_pipeline(), str(tmp))
    return path


class TaskLines(io.TextIOBase):
    """kfp.local's stdout, tamed: everything goes to a log file; the terminal gets one line as
    each task starts and ends (kfp.local otherwise prints every task's executor JSON and output)."""

    ANSI = re.compile(r"\x1b\[[0-9;]*m")
    EVENT = re.compile(r"(Executing task|Task) '([^']+)'(?: finished with status (\w+))?")
    CACHED = re.compile(r"Task '?([\w.-]+?)'? cache hit")

    def __init__(self, log: io.TextIOBase, term):
        self.log, self.term, self._buf, self.done, self.cached = log, term, "", 0, 0
        self._started: dict[str, list[float]] = {}  # a ParallelFor runs same-named tasks side by side

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.log.write(s)
        self._buf += s
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            hit = self.CACHED.search(self.ANSI.sub("", line))
            if hit:
                self.done += 1
                self.cached += 1
                self.term.write(f"[{self.done:>2}] {hit.group(1):<14} {'cached':<8} {0.0:6.1f} s\n")
                self.term.flush()
                continue
            m = self.EVENT.search(self.ANSI.sub("", line))
            if m and m.group(1) == "Executing task":
                self._started.setdefault(m.group(2), []).append(time.perf_counter())
            elif m and m.group(3):
                starts = self._started.get(m.group(2)) or [time.perf_counter()]
                took = time.perf_counter() - starts.pop(0)
                self.done += 1
                self.term.write(f"[{self.done:>2}] {m.group(2):<14} {m.group(3).lower():<8} {took:6.1f} s\n")
                self.term.flush()
        return len(s)

    def flush(self) -> None:
        self.log.flush()


@contextlib.contextmanager
def cache_hits_to(lines: "TaskLines"):
    """kfp.local reports a cache hit with logging.info on the root logger, outside the logging
    context it sets up for running a task, so at the default WARNING level the hit is never
    recorded. For the run: root at INFO, a handler that passes the hits (and nothing else) to
    `lines`, and the root's other handlers held at their old threshold so nothing else shows."""
    import logging

    class Hits(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "cache hit" in msg:
                lines.write(msg + "\n")

    root = logging.getLogger()
    level, handler = root.level, Hits(logging.INFO)
    held = [(h, h.level) for h in root.handlers]
    for h, old in held:
        h.setLevel(max(old, level))
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for h, old in held:
            h.setLevel(old)


def run_local(profile: str | None, overrides: Sequence[str], pipeline_root: str | Path = "reports/kfp",
              cache: bool = True, params: str | Path | None = None, data_source: str = "synthetic",
              run_name: str = "kfp-local", verbose: bool = True) -> dict[str, Any]:
    """Run the whole DAG locally; returns the wall time and the task outputs' root.

    cache=True serves every cacheable task whose inputs are unchanged from kfp.local's cache in
    <root>/.kfp_cache (outputs of earlier runs under <root> are reused, so keep them); False reruns all.
    verbose=False prints a line per task and keeps kfp.local's full output in <root>/pipeline.log."""
    import os

    from kfp import local

    import shutil

    from psamf.resources import cpu_count
    from psamf.stages import LOOP_THREADS_ENV, TASK_ERRORS_ENV

    from psamf import tracking
    from psamf.stages import run_fingerprint

    args = pipeline_arguments(profile, overrides, params, data_source, run_name=run_name)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # kfp.local runs up to LOCAL_LOOP_WORKERS ParallelFor iterations at once: share the cores.
    os.environ.setdefault(LOOP_THREADS_ENV, str(max(1, cpu_count() // LOCAL_LOOP_WORKERS)))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               enable_caching=cache, cache_root=str(root / CACHE_DIR))
    # A failing task leaves its one-line error here (psamf.stages.task); the run ends with it.
    errors = root / "task-errors"
    shutil.rmtree(errors, ignore_errors=True)
    errors.mkdir()
    before = os.environ.get(TASK_ERRORS_ENV)
    os.environ[TASK_ERRORS_ENV] = str(errors)  # kfp.local's task processes inherit it
    t0 = time.perf_counter()
    lines = None
    status = "FAILED"
    try:
        if verbose:
            try:
                _pipeline()(**args)
            except RuntimeError as e:
                raise task_failure(e, errors, None) or e
        else:
            import sys
            import warnings

            # kfp.local warns per task that resource settings do nothing locally and that the component
            # image is not used: both true, and known (this venv is the image's environment).
            warnings.filterwarnings("ignore", message=r"Task .* have no effect in the current local runner")
            warnings.filterwarnings("ignore", message=r"You may be attemping to run a task that uses custom")
            log_path = root / "pipeline.log"
            lines = TaskLines(open(log_path, "w"), sys.stderr)
            with lines.log as log, contextlib.redirect_stdout(lines), cache_hits_to(lines):
                try:
                    _pipeline()(**args)
                except BaseException as e:
                    log.flush()
                    failed = task_failure(e, errors, log_path) if isinstance(e, RuntimeError) else None
                    if failed is not None:  # a task failed: its name and own error, the rest in the log
                        raise failed from None
                    tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
                    sys.stderr.write(TaskLines.ANSI.sub("", tail) + f"\n(full output: {log_path})\n")
                    raise
        status = "FINISHED"
    finally:
        # The pipeline's MLflow parent run spans the run: the fingerprint task opened it, and it
        # ends here (a run served from the cache has no last task to end it).
        try:
            cfg, _, fp, _ = run_fingerprint(args["profile"], args["overrides"], args["params_yaml"],
                                            args["data_source"])
            tracking.end_pipeline_runs(cfg, fp, status, cached_tasks=lines.cached if lines is not None else None)
        except Exception:  # the source the run failed on: the run's own error says more
            if status == "FINISHED":
                raise
        if before is None:
            os.environ.pop(TASK_ERRORS_ENV, None)
        else:
            os.environ[TASK_ERRORS_ENV] = before
    # kfp.local keeps each task's outputs under <root>/<run>/<task>/<output>: the newest report page.
    pages = sorted(root.glob("*/report/page"), key=lambda p: p.stat().st_mtime)
    return {"pipeline_root": str(root), "wall_s": round(time.perf_counter() - t0, 1),
            "report": str(pages[-1]) if pages else None,
            **({"cached_tasks": lines.cached} if lines is not None else {})}


FAILED_RUN = re.compile(r"finished with status FAILURE\. Inner task failed: (.+?)\.?$")
LAST_ERROR = re.compile(r"^(?:psamf: error: (.+)|([A-Za-z_][\w.]*(?:Error|Exception|Failed)): (.+))$")


def task_failure(e: BaseException, errors: Path, log_path: Path | None):
    """kfp.local's `Pipeline ... finished with status FAILURE. Inner task failed: 'x' inside 'y'.`
    as a TaskFailed: the innermost task's name and the error it recorded (psamf.stages.task), else
    the last error line of the log; None when `e` is not a failed run."""
    from psamf.errors import TaskFailed
    from psamf.io import read_json

    m = FAILED_RUN.search(TaskLines.ANSI.sub("", str(e)).strip())
    if m is None:
        return None
    name = m.group(1).split(" inside ")[0].strip().strip("'")
    records = []
    for p in sorted(errors.glob("*.json")):  # named by time: a retried task's last try is last
        try:
            records.append(read_json(p))
        except Exception:  # a half-written record of a killed task: the log still has the story
            continue
    mine = [r for r in records if isinstance(r, dict) and r.get("task") == name] or records
    where = f" (full log: {log_path})" if log_path is not None else ""
    if mine:
        r = mine[-1]
        return TaskFailed(name, f"{r.get('message')}{where}", int(r.get("exit_code", 1)))
    last = None  # no record (the task died before its stage ran): the log's last error line
    if log_path is not None and log_path.is_file():
        for line in log_path.read_text(errors="replace").splitlines():
            hit = LAST_ERROR.match(TaskLines.ANSI.sub("", line).strip())
            if hit:
                last = hit.group(1) or f"{hit.group(2)}: {hit.group(3)}"
    return TaskFailed(name, f"{last or 'no error message; see the log'}{where}", 1)


def submit(host: str, profile: str | None, overrides: Sequence[str], experiment: str = "psamf",
           package: str | Path | None = None, params: str | Path | None = None,
           data_source: str = "synthetic") -> dict[str, Any]:
    import kfp

    client = kfp.Client(host=host)
    package = package or compile_pipeline(Path("reports") / "psamf-training.yaml")
    args = pipeline_arguments(profile, overrides, params, data_source)
    run = client.create_run_from_pipeline_package(str(package), arguments=args, experiment_name=experiment,
                                                  run_name=f"psamf-{args['profile']}")
    return {"run_id": run.run_id, "host": host}


def schedule(host: str, cron: str, profile: str | None, overrides: Sequence[str], experiment: str = "psamf",
             name: str = "psamf-retrain", package: str | Path | None = None, params: str | Path | None = None,
             data_source: str = "synthetic") -> dict[str, Any]:
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
                                      params=pipeline_arguments(profile, overrides, params, data_source,
                                                                run_name="scheduled"))
    return {"recurring_run_id": getattr(job, "recurring_run_id", None), "cron": cron}
