"""Running the study: one worker's trial loop, worker processes, and the `tune` stage.

Exactly tune.n_trials trials finish (COMPLETE + PRUNED), however many workers share the study:
each worker takes a storage-wide lock (pg_advisory_lock on PostgreSQL, a flock for a sqlite
file), counts finished + running trials, and only then asks for a new trial; the lock is
released as soon as the trial exists. A worker that finds every remaining trial running
elsewhere waits (when the heartbeat is on) instead of leaving, so a trial whose worker dies
is still run (study.optimize runs just that trial: MaxTrialsCallback counts without the lock, so
it cannot keep the total exact). Other SQL dialects get no lock: up to workers-1 extra trials.
tune.n_trials failed trials stop the study; `tune` then names the last failure.

Failures: with tune.heartbeat_interval (default 60 s) every running trial writes a heartbeat;
one silent for tune.grace_period (default 2x) is marked FAIL (optuna.storages.fail_stale_trials,
run by every worker before each trial and while it waits) and re-queued with the same params
by RetryHeartbeatStaleTrialCallback(max_retry=tune.max_retry) (Optuna 5's name for
RetryFailedTrialCallback, which is deprecated there). The retry carries the `failed_trial`
system attr (RetryHeartbeatStaleTrialCallback.retried_trial_number) and resumes from the dead
trial's last epoch checkpoint when it runs where that was written (trial dirs are keyed by the
original trial number). A trial that raises is FAIL and not retried, and its worker exits
non-zero (a bug or bad input should not be retried blindly); `tune` reports worker exit codes
and fails only when the study did not complete. A non-finite valid MAE fails just that trial
(NonFiniteError, in optimize's `catch`) and the worker goes on.

Worker processes run the hidden `psamf tune-process` command (worker_argv), logging to
<tune.out_dir>/<corpus>/workers/worker-<i>.log.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import yaml

from psamf import tracking
from psamf.config import Config
from psamf.errors import InputError
from psamf.io import write_text
from psamf.locks import NamedLock, dialect, sqlite_file
from psamf.metrics import NonFiniteError
from psamf.psa_mf.tune.report import finalize
from psamf.psa_mf.tune.search import (STORAGE_ENV, Objective, budget_allows_trial, create_study, encoder_depth,
                                      load_study, report_dir, storage_url, study_finished, trial_counts)
from psamf.resources import cpu_count

log = logging.getLogger(__name__)

MAX_WAIT_POLL_S = 5.0


# ---------------------------------------------------------------------------- one worker

def _fail_stale_trials(study) -> None:
    """Mark heartbeat-stale trials FAIL, queuing their retries. optimize does this too, but only
    after the count that decides whether to ask: a dead worker's trial must not count as running."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _next_move(study, cfg: Config) -> str:
    """Under the lock: "run" a trial, "wait" for running ones, or "stop"."""
    n = cfg.tune.n_trials
    c = trial_counts(study)
    done = c["COMPLETE"] + c["PRUNED"]
    if done >= n or not budget_allows_trial(study, cfg, running=False):
        return "stop"
    if c["FAIL"] >= n:  # every trial diverges (or dies): stop rather than loop forever
        log.warning("tune: %d trials failed, as many as tune.n_trials; stopping", c["FAIL"])
        return "stop"
    if done + c["RUNNING"] >= n or not budget_allows_trial(study, cfg):
        # Every remaining trial (or epoch) is running elsewhere. Without a heartbeat a dead
        # worker's trial would stay RUNNING forever, so leave; with one, wait: it either
        # finishes or goes stale and is re-queued for us.
        return "wait" if cfg.tune.heartbeat_interval else "stop"
    return "run"


def run_worker(cfg: Config, worker: int = 0, *, parallel: bool = False, study=None) -> dict[str, Any]:
    """Run trials until the study has tune.n_trials finished (COMPLETE + PRUNED) trials.

    `worker` offsets the sampler seed. Returns {"worker", "trials_run", "wall_s"}."""
    t0 = time.perf_counter()
    if study is None:
        study = load_study(cfg, worker=worker, parallel=parallel)
    heartbeat = cfg.tune.heartbeat_interval
    poll_s = min(float(heartbeat), MAX_WAIT_POLL_S) if heartbeat else 0.0
    ran, move = 0, "run"
    with contextlib.closing(NamedLock(storage_url(cfg), f"psamf-tune:{cfg.tune.study_name}")) as lock:
        if lock.kind == "none":
            log.warning("tune: no cross-worker lock for this storage; the study may finish up to "
                        "workers-1 trials more than tune.n_trials")
        # The objective releases the lock once its trial exists: counting and asking are atomic.
        objective = Objective(cfg, encoder_depth(cfg.psamf.encoder), on_start=lock.release)
        while move != "stop":
            lock.acquire()
            try:
                _fail_stale_trials(study)
                move = _next_move(study, cfg)
                if move == "run":
                    study.optimize(objective, n_trials=1, catch=(NonFiniteError,), gc_after_trial=True)
                    ran += 1
            finally:
                lock.release()
            if move == "wait":
                time.sleep(poll_s)
    return {"worker": worker, "trials_run": ran, "wall_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------- the stage

def preflight(cfg: Config) -> int:
    """Fail before any worker starts: data, encoders. Returns the encoder depth L."""
    from psamf.psa_mf.train import check_personality_encoder

    seg = cfg.data.prepared_path / "segments.parquet"
    if not seg.is_file():
        raise InputError(seg, "missing; run `psamf data ingest` first")
    check_personality_encoder(cfg)
    depth = encoder_depth(cfg.psamf.encoder)
    if depth < 2:
        raise InputError("psamf.encoder", f"needs >= 2 layers to split (N in [1, L-1]), it has {depth}")
    return depth


def _worker_env(workers: int, parent_run_id: str | None, url: str) -> dict[str, str]:
    env = dict(os.environ)
    env[STORAGE_ENV] = url
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, cpu_count() // workers))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def worker_argv(config_path: Path, worker: int) -> list[str]:
    """The hidden `psamf tune-process` command, via `python -m psamf` so no console script on PATH is needed."""
    return [sys.executable, "-m", "psamf", "--log-level", "INFO", "tune-process", "--config", str(config_path),
            "--worker", str(worker)]


def _run_worker_processes(cfg: Config, workers: int, config_path: Path, parent_run_id: str | None,
                          study, first_worker: int = 0) -> list[dict[str, Any]]:
    """Start `workers` worker processes, show progress from the storage, wait for all of them."""
    from tqdm import tqdm

    logs = report_dir(cfg) / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    env = _worker_env(workers, parent_run_id, storage_url(cfg))
    procs = []
    for i in range(first_worker, first_worker + workers):
        fh = open(logs / f"worker-{i}.log", "wb")
        p = subprocess.Popen(worker_argv(config_path, i), stdout=fh, stderr=subprocess.STDOUT, env=env)
        procs.append((i, p, fh))
    bar = tqdm(total=cfg.tune.n_trials, desc=f"tune[{cfg.data.corpus}]", unit="trial", leave=False)
    try:
        while any(p.poll() is None for _, p, _ in procs):
            time.sleep(1.0)
            with contextlib.suppress(Exception):  # progress only; the storage may be busy
                c = trial_counts(study)
                bar.n = min(cfg.tune.n_trials, c["COMPLETE"] + c["PRUNED"])
                bar.refresh()
    except BaseException:
        for _, p, _ in procs:  # ours, by pid: a Ctrl-C must not leave workers behind
            if p.poll() is None:
                p.terminate()
        for _, p, _ in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
        raise
    finally:
        bar.close()
        for _, _, fh in procs:
            fh.close()
    return [{"worker": i, "pid": p.pid, "exit_code": p.returncode, "log": str(logs / f"worker-{i}.log")}
            for i, p, _ in procs]


def _log_tail(path: str, n: int = 1500) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text(errors="replace")[-n:]
    return ""


def _incomplete(cfg: Config, study, results: list[dict[str, Any]]) -> RuntimeError:
    """Why the study fell short of tune.n_trials: exit codes, failures, the last failure's reason
    and the last failed worker's log."""
    from optuna.trial import TrialState

    c = trial_counts(study)
    bad = [r for r in results if r["exit_code"] != 0]
    tail = _log_tail(bad[-1]["log"]) if bad and "log" in bad[-1] else ""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    reasons = [t.user_attrs["fail_reason"] for t in failed if t.user_attrs.get("fail_reason")]
    return RuntimeError(f"tune: the study has {c['COMPLETE'] + c['PRUNED']} of {cfg.tune.n_trials} finished "
                        f"trials after all workers exited (exit codes {[r['exit_code'] for r in results]}, "
                        f"{c['FAIL']} failed" + (f"; last failure: {reasons[-1]}" if reasons else "") + ")"
                        + (f"; last worker log:\n{tail}" if tail else ""))


def tune(cfg: Config, workers: int | None = None, *, join: bool = False,
         worker_index: int | None = None, create: bool = False) -> dict[str, Any]:
    """The `tune` stage: create the study once, run `workers` workers (processes when > 1, in
    this process when 1), write the report. `join`: run workers only and return their results,
    no report; the study must exist (another node created it) unless `create`, with which the
    first joining worker creates it (KFP's worker tasks: create_study survives the race).
    `worker_index` seeds a joining worker (KFP passes its ParallelFor rank; default: from the
    host name)."""
    workers = cfg.tune.workers if workers is None else workers
    if workers < 1:
        raise InputError("--workers", f"must be >= 1, got {workers}")
    preflight(cfg)
    url = storage_url(cfg)
    if workers > 1 and dialect(url) == "sqlite" and sqlite_file(url) is None:
        raise InputError("tune.storage", "an in-memory sqlite study cannot be shared by worker processes")
    t0 = time.perf_counter()
    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / ("tune_config.yaml" if not join else f"tune_config.{socket.gethostname()}.yaml")
    write_text(config_path, yaml.safe_dump(cfg.loggable(), sort_keys=False))  # workers get the storage from env
    parallel = workers > 1 or join
    # Worker seeds: 0..workers-1 here; a joining node offsets by its index or host name.
    if not join:
        first = 0
    elif worker_index is not None:
        first = worker_index
    else:
        first = (zlib.crc32(socket.gethostname().encode()) % 100_000) + 1
    study = (load_study(cfg, worker=first, parallel=parallel) if join and not create
             else create_study(cfg, worker=first, parallel=parallel))
    results: list[dict[str, Any]]
    with tracking.stage_run(cfg, "tune", run_name=f"tune[{cfg.data.corpus}]" + (f"[worker {first}]" if join else ""),
                            tags={"study": cfg.tune.study_name, "workers": workers, "join": join}) as run:
        if workers == 1:
            results = [{**run_worker(cfg, first, parallel=parallel, study=study), "pid": os.getpid(), "exit_code": 0}]
        else:
            results = _run_worker_processes(cfg, workers, config_path, run.info.run_id, study, first)
        c = trial_counts(study)
        wall = round(time.perf_counter() - t0, 2)
        if join:
            return {"joined": cfg.tune.study_name, "workers": results, "trials_by_state": c, "wall_s": wall}
        if not study_finished(study, cfg):
            raise _incomplete(cfg, study, results)
        return finalize(cfg, study, {"workers": results, "n_workers": workers, "wall_s": wall})
