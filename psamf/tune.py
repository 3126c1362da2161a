"""`psamf tune`: an Optuna search over PSA-MF's τ, N and λ (PSA-MF §4 Search).

    create_study(cfg)               the study in its storage, created ONCE before any worker starts
    run_worker(cfg, worker=0)       one worker: runs trials until the study has tune.n_trials finished
    tune(cfg, workers=None)         create the study, run the workers, write the report
    tune_report(cfg, study=None)    (re)write the report from the storage (`psamf tune --report-only`)
    python -m psamf.tune worker --config PATH --worker I     the worker process `tune` starts

Search space (Optuna parameter names are the dotted config keys, so best_params.json feeds
`psamf train --best-params` / `--set` directly):

    psamf.tau         log-uniform [tune.tau_min, tune.tau_max]       InfoNCE temperature
    psamf.split_layer integer [1, L-1], L = depth of psamf.encoder   N (AutoConfig; no weights loaded)
    psamf.aux_lambda  uniform [tune.lambda_min, tune.lambda_max]     weight of L_Align + L_clm

Each trial trains PSA-MF (`train_psamf`, cfg.psamf.ablation as configured) for tune.epochs
epochs with early stopping as in `train`, reports the valid MAE of every epoch to the pruner,
and returns the best-epoch valid MAE (minimized). The test split is never looked at.

Storage: `$PSAMF_OPTUNA_STORAGE` or tune.storage; any SQLAlchemy URL. sqlite (the default,
one machine) is switched to WAL with a 60 s busy timeout so local workers can share it.
PostgreSQL is the multi-node path: start `psamf tune` on one node (it creates the study, runs
its workers, and writes the report once the study is complete) and `psamf tune --join
[--workers N]` on any other node with the same `PSAMF_OPTUNA_STORAGE`. The schema and the
study are created once, before any worker runs (concurrent creation races on PostgreSQL's
CREATE TYPE); workers open the storage with skip_table_creation, and create_study itself retries
when it loses that race to another creator.

tune.epoch_budget (null = none) caps the training epochs of the whole study: a worker starts a
trial only while the epochs already run (finished trials) plus those reserved by running ones
(tune.epochs each) leave room for all tune.epochs of a new one. With a pruner the study can then
run more, mostly short, trials in the epochs an unpruned search spends on tune.n_trials; the study
ends at whichever limit comes first (bench/psamf.py compares searches that way).

Exactly tune.n_trials trials finish (COMPLETE + PRUNED), however many workers share the study:
each worker takes a storage-wide lock (pg_advisory_lock on PostgreSQL, a flock for a sqlite
file), counts finished + running trials, and only then asks for a new trial; the lock is
released as soon as the trial exists. A worker that finds every remaining trial running
elsewhere waits (when the heartbeat is on) instead of leaving, so a trial whose worker dies
is still run. Optuna's MaxTrialsCallback(n_trials, states=(COMPLETE, PRUNED)) stops the
optimize loop as well. Other SQL dialects get no lock: up to workers-1 extra trials.

Failures: with tune.heartbeat_interval (default 60 s) every running trial writes a heartbeat;
one silent for tune.grace_period (default 2x) is marked FAIL (optuna.storages.fail_stale_trials,
run by every worker before each trial and while it waits) and re-queued with the same params
by RetryHeartbeatStaleTrialCallback(max_retry=tune.max_retry) (Optuna 5's name for
RetryFailedTrialCallback, which is deprecated there). The retry carries the `failed_trial`
system attr (RetryHeartbeatStaleTrialCallback.retried_trial_number) and resumes from the dead
trial's last epoch checkpoint when it runs where that was written (trial dirs are keyed by the
original trial number). A trial that raises is FAIL and not retried, and its worker exits
non-zero (a bug or bad input should not be retried blindly); `tune` reports worker exit codes
and fails only when the study did not complete. A non-finite valid MAE fails just that trial.

Outputs, atomic, in `<tune.out_dir>/<corpus>/`:

    best_params.json   {"psamf.tau": .., "psamf.split_layer": .., "psamf.aux_lambda": ..}
    summary.json       corpus, av_simulated, trials by state, best value / trial, pruned count,
                       epochs run in total, retries, per-trial rows, worker exit codes, wall time
    summary.md, trials.csv
    plots/             optimization_history, param_importances, parallel_coordinate,
                       intermediate_values: .html with plotly installed, else .png (matplotlib)
    tune_config.yaml   the resolved config the workers ran with
    trials/<study>/<n> one dir per trial: metrics.json (model.pt only with tune.keep_trial_models)
    workers/           worker-<i>.log for worker processes

MLflow: one `tune` run (params = config, metrics = best value / counts / epochs, the files
above as artifacts), one nested child run per trial (the config incl. τ/N/λ as params, tags
trial / state / retry_of / worker, metric valid_mae per epoch with step, value), and below it
the `train` run train_psamf opens. Worker processes nest under the tune run through
$PSAMF_PARENT_RUN_ID. Child runs of trials whose worker died are closed as KILLED at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import yaml

from psamf import tracking
from psamf.config import PRUNERS, Config, load_config
from psamf.errors import InputError
from psamf.io import write_json, write_text
from psamf.locks import NamedLock, dialect, sqlite_file
from psamf.metrics import NonFiniteError
from psamf.redact import redact
from psamf.resources import cpu_count

log = logging.getLogger(__name__)

STORAGE_ENV = "PSAMF_OPTUNA_STORAGE"
PARAMS = ("psamf.tau", "psamf.split_layer", "psamf.aux_lambda")
SQLITE_BUSY_TIMEOUT_S = 60
SCHEMA_RETRIES = 4
MAX_WAIT_POLL_S = 5.0
ROW_COLUMNS = ["number", "state", "value", *PARAMS, "epochs", "best_epoch", "retry_of", "worker", "duration_s",
               "fail_reason"]
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


# ---------------------------------------------------------------------------- storage and study

def storage_url(cfg: Config) -> str:
    """`$PSAMF_OPTUNA_STORAGE`, else tune.storage."""
    return os.environ.get(STORAGE_ENV) or cfg.tune.storage


def _prepare_sqlite(url: str) -> None:
    """Create the file's directory and switch it to WAL (persistent in the file): readers never
    block the writer, which is what several local workers need."""
    import sqlite3

    path = sqlite_file(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=SQLITE_BUSY_TIMEOUT_S)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def make_storage(cfg: Config, *, create_tables: bool = True):
    """RDBStorage with heartbeat + retry of heartbeat-stale trials, as tune.* says."""
    import optuna

    tc = cfg.tune
    url = storage_url(cfg)
    backend = dialect(url)
    engine_kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    elif backend in ("postgresql", "mysql"):
        engine_kwargs["pool_pre_ping"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        hb: dict[str, Any] = {}
        if tc.heartbeat_interval is not None:
            hb = {"heartbeat_interval": tc.heartbeat_interval, "grace_period": tc.grace_period,
                  "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                      max_retry=tc.max_retry)}
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              skip_table_creation=not create_tables, **hb)
        except (ImportError, ValueError) as e:
            raise InputError("tune.storage", f"{redact(url)}: {str(e).splitlines()[0]}") from None
        except Exception as e:  # sqlalchemy.exc.OperationalError & co: unreachable server, bad path, no schema
            hint = "" if create_tables else "; the study was not found there: run `psamf tune` first"
            raise InputError("tune.storage", f"{redact(url)}: cannot open ({str(e).splitlines()[0]}){hint}") from None


def make_sampler(cfg: Config, worker: int = 0, parallel: bool = False):
    """TPE seeded with tune.seed + worker (distinct workers must not propose the same points);
    constant_liar when several workers share the study."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=cfg.tune.seed + worker, n_startup_trials=cfg.tune.n_startup_trials,
                                          constant_liar=parallel)


def make_pruner(cfg: Config):
    import optuna

    tc = cfg.tune
    if tc.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tc.pruner_startup_trials,
                                           n_warmup_steps=tc.pruner_warmup_steps)
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, tc.epochs))
    if tc.pruner == "none":
        return optuna.pruners.NopPruner()
    raise InputError("tune.pruner", f"unknown pruner {tc.pruner!r} (choose from {', '.join(PRUNERS)})")


def create_study(cfg: Config, *, worker: int = 0, parallel: bool = False):
    """Create (or load) the study: schema + study row, once, before workers start. Minimize valid MAE."""
    import optuna

    url = storage_url(cfg)
    _prepare_sqlite(url)
    for attempt in range(SCHEMA_RETRIES):
        try:
            storage = make_storage(cfg, create_tables=True)
            break
        except InputError as e:
            # Someone else is creating the schema right now (PostgreSQL: CREATE TYPE studydirection
            # -> duplicate pg_type row). Their tables exist a moment later; creation checks first.
            if attempt == SCHEMA_RETRIES - 1 or not any(m in str(e) for m in ("duplicate key", "already exists")):
                raise
            time.sleep(0.5 * (attempt + 1))
    return optuna.create_study(storage=storage, study_name=cfg.tune.study_name, direction="minimize",
                               sampler=make_sampler(cfg, worker, parallel), pruner=make_pruner(cfg),
                               load_if_exists=True)


def load_study(cfg: Config, *, worker: int = 0, parallel: bool = False):
    """The existing study (workers and joining nodes); InputError when it was never created."""
    import optuna

    storage = make_storage(cfg, create_tables=False)
    try:
        return optuna.load_study(study_name=cfg.tune.study_name, storage=storage,
                                 sampler=make_sampler(cfg, worker, parallel), pruner=make_pruner(cfg))
    except KeyError:
        raise InputError("tune.study_name", f"study {cfg.tune.study_name!r} not found in "
                                            f"{redact(storage_url(cfg))}; run `psamf tune` first") from None
    except Exception as e:  # no tables yet (sqlalchemy error)
        raise InputError("tune.storage", f"{redact(storage_url(cfg))}: no Optuna study there "
                                         f"({str(e).splitlines()[0]}); run `psamf tune` first") from None


# ---------------------------------------------------------------------------- search space

def keyed_study(cfg: Config) -> Config:
    """cfg with tune.study_name suffixed by a hash of everything the trials depend on (code,
    prepared data, encoders, search settings): a persisted storage (dvc.yaml's
    checkpoints/tune/optuna.db) then resumes an interrupted search, but a search on other
    inputs starts its own study instead of finding a finished one."""
    from psamf.fingerprint import code_version, file_sha256
    from psamf.psamf_train import dir_identity
    from psamf.training import config_fingerprint

    manifest = cfg.data.prepared_path / "manifest.json"
    skip = ("out_dir", "storage", "study_name", "workers")
    key = config_fingerprint({
        "code": code_version(), "data": file_sha256(manifest) if manifest.is_file() else None,
        "encoder": dir_identity(cfg.psamf.encoder), "personality": dir_identity(cfg.psamf.personality_encoder),
        "psamf": dataclasses.asdict(cfg.psamf), "train": dataclasses.asdict(cfg.train),
        "tune": {k: v for k, v in dataclasses.asdict(cfg.tune).items() if k not in skip}})
    return dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, study_name=f"{cfg.tune.study_name}-{key}"))


def encoder_depth(name_or_path: str) -> int:
    """L, the number of layers of a HF encoder, from its config alone (no weights)."""
    from transformers import AutoConfig

    from psamf.models.encoders import resolve_encoder

    try:
        conf = AutoConfig.from_pretrained(resolve_encoder(name_or_path))
    except (OSError, ValueError) as e:
        raise InputError(name_or_path, f"cannot read the encoder's config ({str(e).splitlines()[0]})") from None
    depth = getattr(conf, "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise InputError(name_or_path, "the encoder's config has no num_hidden_layers")
    return depth


def suggest(trial, cfg: Config, depth: int) -> dict[str, Any]:
    """The trial's τ, N, λ under their dotted config keys."""
    tc = cfg.tune
    return {
        "psamf.tau": trial.suggest_float("psamf.tau", tc.tau_min, tc.tau_max, log=True),
        "psamf.split_layer": trial.suggest_int("psamf.split_layer", 1, depth - 1),
        "psamf.aux_lambda": trial.suggest_float("psamf.aux_lambda", tc.lambda_min, tc.lambda_max),
    }


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of cfg with dotted-key values set (the keys must exist)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    changes = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()}
    return dataclasses.replace(cfg, **changes)


def report_dir(cfg: Config) -> Path:
    return Path(cfg.tune.out_dir) / cfg.data.corpus


def trial_dir(cfg: Config, key: int) -> Path:
    return report_dir(cfg) / "trials" / cfg.tune.study_name / f"{key:04d}"


def trial_config(cfg: Config, params: dict[str, Any], out_dir: Path) -> Config:
    """The trial's config: the suggested params, tune.epochs, checkpoints removed after."""
    c = apply_params(cfg, params)
    return dataclasses.replace(c, train=dataclasses.replace(c.train, epochs=cfg.tune.epochs, out_dir=str(out_dir),
                                                            keep_checkpoints=False))


# ---------------------------------------------------------------------------- the objective

class _RecordingTrial:
    """Forwards report/should_prune to the Optuna trial and remembers the reports."""

    def __init__(self, trial):
        self._trial = trial
        self.reports: list[tuple[int, float]] = []

    def report(self, value: float, step: int) -> None:
        self.reports.append((step, float(value)))
        self._trial.report(value, step)

    def __getattr__(self, name):
        return getattr(self._trial, name)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _cleanup_trial_dir(out: Path, keep_models: bool) -> None:
    """Keep metrics.json (and the model with keep_models); checkpoints always go."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name == "metrics.json" or (keep_models and p.name != "ckpt"):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


class Objective:
    """One trial: suggest τ/N/λ, train PSA-MF for tune.epochs, return the best valid MAE."""

    def __init__(self, cfg: Config, depth: int, on_start: Callable[[], None] | None = None):
        self.cfg, self.depth, self.on_start = cfg, depth, on_start

    def __call__(self, trial) -> float:
        import optuna

        from psamf.psamf_train import train_psamf

        if self.on_start is not None:  # the trial exists now: let other workers ask for theirs
            self.on_start()
        cfg = self.cfg
        params = suggest(trial, cfg, self.depth)
        # A retry (RetryHeartbeatStaleTrialCallback) inherits the dead trial's user attrs, so its
        # trial_key names the original trial's dir, whose last checkpoint it resumes from.
        inherited = trial.user_attrs.get("trial_key")
        key = int(inherited) if inherited is not None else trial.number
        out = trial_dir(cfg, key)
        if inherited is None:
            shutil.rmtree(out, ignore_errors=True)  # a fresh trial never resumes someone else's run
        trial.set_user_attr("trial_key", key)
        trial.set_user_attr("worker", _worker_id())
        trial.set_user_attr("worker_pid", os.getpid())
        trial.set_user_attr("out_dir", str(out))
        cfg_t = trial_config(cfg, params, out)
        rec = _RecordingTrial(trial)
        retry_of = key if inherited is not None else None
        tags = {"trial": trial.number, "worker": _worker_id(), "study": cfg.tune.study_name,
                "retry_of": "" if retry_of is None else retry_of}
        pruned: optuna.TrialPruned | None = None
        value = math.nan
        try:
            with tracking.stage_run(cfg_t, "tune-trial", run_name=f"trial-{trial.number}", tags=tags) as run:
                if run.info.run_id:
                    trial.set_user_attr("mlflow_run_id", run.info.run_id)
                state = "FAIL"
                try:
                    report = train_psamf(cfg_t, trial=rec, out_dir=out)
                    value = float(report["valid"]["mae"])
                    trial.set_user_attr("best_epoch", report["best_epoch"])
                    trial.set_user_attr("av_simulated", bool(report["av_simulated"]))
                    state = "COMPLETE" if math.isfinite(value) else "FAIL"
                except optuna.TrialPruned as e:
                    pruned, state = e, "PRUNED"
                except NonFiniteError as e:  # a diverged trial is a FAIL with its reason; the worker goes on
                    trial.set_user_attr("fail_reason", str(e))
                    tracking.set_tags({"fail_reason": str(e)})
                    log.warning("trial %d failed: %s", trial.number, e)
                finally:
                    for step, v in rec.reports:
                        tracking.log_metrics({"valid_mae": v}, step=step)
                    trial.set_user_attr("epochs_run", len(rec.reports))
                    tracking.set_tags({"state": state})
                if pruned is None:
                    tracking.log_metrics({"value": value})
        finally:
            _cleanup_trial_dir(out, cfg.tune.keep_trial_models)
        if pruned is not None:
            raise pruned
        return value  # a nan value: Optuna marks the trial FAIL and the worker goes on


# ---------------------------------------------------------------------------- one worker

def _counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


def epochs_spent(study, cfg: Config, *, running: bool = True) -> int:
    """Training epochs the study has used: finished trials' epochs_run, plus (running=True)
    tune.epochs for each running trial, which may still use them all."""
    from optuna.trial import TrialState

    spent = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING and running:
            spent += cfg.tune.epochs
        elif t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            spent += int(t.user_attrs.get("epochs_run", len(t.intermediate_values)))
    return spent


def budget_allows_trial(study, cfg: Config, *, running: bool = True) -> bool:
    """tune.epoch_budget: a trial may start only if all its tune.epochs fit in what is left.
    running=False ignores running trials' reservations (they may end early, freeing epochs)."""
    budget = cfg.tune.epoch_budget
    return budget is None or epochs_spent(study, cfg, running=running) + cfg.tune.epochs <= budget


def study_finished(study, cfg: Config) -> bool:
    """tune.n_trials finished trials, or an epoch budget with no room left and nothing running."""
    c = _counts(study)
    if c["COMPLETE"] + c["PRUNED"] >= cfg.tune.n_trials:
        return True
    return c["RUNNING"] == 0 and not budget_allows_trial(study, cfg, running=False)


def run_worker(cfg: Config, worker: int = 0, *, parallel: bool = False, study=None) -> dict[str, Any]:
    """Run trials until the study has tune.n_trials finished (COMPLETE + PRUNED) trials.

    `worker` offsets the sampler seed. Returns {"worker", "trials_run", "wall_s"}."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    t0 = time.perf_counter()
    if study is None:
        study = load_study(cfg, worker=worker, parallel=parallel)
    n = cfg.tune.n_trials
    depth = encoder_depth(cfg.psamf.encoder)
    heartbeat = cfg.tune.heartbeat_interval
    poll_s = min(float(heartbeat), MAX_WAIT_POLL_S) if heartbeat else 0.0
    lock = NamedLock(storage_url(cfg), f"psamf-tune:{cfg.tune.study_name}")
    if lock.kind == "none":
        log.warning("tune: no cross-worker lock for this storage; the study may finish up to "
                    "workers-1 trials more than tune.n_trials")
    objective = Objective(cfg, depth, on_start=lock.release)
    stop = MaxTrialsCallback(n, states=(TrialState.COMPLETE, TrialState.PRUNED))
    ran = 0
    try:
        while True:
            lock.acquire()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)  # also what optimize does before each ask
                c = _counts(study)
                done = c["COMPLETE"] + c["PRUNED"]
                if done >= n or not budget_allows_trial(study, cfg, running=False):
                    break
                if done + c["RUNNING"] >= n or not budget_allows_trial(study, cfg):
                    # Every remaining trial (or epoch) is running elsewhere. Without a heartbeat a
                    # dead worker's trial would stay RUNNING forever, so leave; with one, wait: it
                    # either finishes or goes stale and is re-queued for us.
                    if not heartbeat:
                        break
                    lock.release()
                    time.sleep(poll_s)
                    continue
                study.optimize(objective, n_trials=1, callbacks=[stop], gc_after_trial=True)
                ran += 1
            finally:
                lock.release()
    finally:
        lock.close()
    return {"worker": worker, "trials_run": ran, "wall_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------- the stage

def _preflight(cfg: Config) -> int:
    """Fail before any worker starts: data, encoders. Returns the encoder depth L."""
    from psamf.psamf_train import check_personality_encoder

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
        p = subprocess.Popen([sys.executable, "-m", "psamf.tune", "worker", "--config", str(config_path),
                              "--worker", str(i)], stdout=fh, stderr=subprocess.STDOUT, env=env)
        procs.append((i, p, fh))
    bar = tqdm(total=cfg.tune.n_trials, desc=f"tune[{cfg.data.corpus}]", unit="trial", leave=False)
    try:
        while any(p.poll() is None for _, p, _ in procs):
            time.sleep(1.0)
            with contextlib.suppress(Exception):  # progress only; the storage may be busy
                c = _counts(study)
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


def tune(cfg: Config, workers: int | None = None, *, join: bool = False,
         worker_index: int | None = None) -> dict[str, Any]:
    """The `tune` stage: create the study once, run `workers` workers (processes when > 1, in
    this process when 1), write the report. `join`: the study must exist (another node or KFP
    task created it); run workers only and return their results, no report. `worker_index`
    seeds a joining worker (KFP passes its ParallelFor rank; default: from the host name)."""
    workers = cfg.tune.workers if workers is None else workers
    if workers < 1:
        raise InputError("--workers", f"must be >= 1, got {workers}")
    _preflight(cfg)
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
    study = (load_study(cfg, worker=first, parallel=parallel) if join
             else create_study(cfg, worker=first, parallel=parallel))
    results: list[dict[str, Any]]
    with tracking.stage_run(cfg, "tune", run_name=f"tune[{cfg.data.corpus}]" + (f"[worker {first}]" if join else ""),
                            tags={"study": cfg.tune.study_name, "workers": workers, "join": join}) as run:
        if workers == 1:
            results = [{**run_worker(cfg, first, parallel=parallel, study=study), "pid": os.getpid(), "exit_code": 0}]
        else:
            results = _run_worker_processes(cfg, workers, config_path, run.info.run_id, study, first)
        c = _counts(study)
        wall = round(time.perf_counter() - t0, 2)
        if join:
            return {"joined": cfg.tune.study_name, "workers": results, "trials_by_state": c, "wall_s": wall}
        if not study_finished(study, cfg):
            bad = [r for r in results if r["exit_code"] != 0]
            tail = _log_tail(bad[-1]["log"]) if bad and "log" in bad[-1] else ""
            raise RuntimeError(f"tune: the study has {c['COMPLETE'] + c['PRUNED']} of {cfg.tune.n_trials} finished "
                               f"trials after all workers exited (exit codes {[r['exit_code'] for r in results]})"
                               + (f"; last worker log:\n{tail}" if tail else ""))
        return _finish(cfg, study, {"workers": results, "n_workers": workers, "wall_s": wall})


def finish_study(cfg: Config) -> dict[str, Any]:
    """After workers ran elsewhere (KFP's ParallelFor): check the study is complete, then write
    and log the report as `tune` does."""
    study = load_study(cfg)
    if not study_finished(study, cfg):
        c = _counts(study)
        raise RuntimeError(f"tune: the study {cfg.tune.study_name} has {c['COMPLETE'] + c['PRUNED']} of "
                           f"{cfg.tune.n_trials} finished trials after every worker task ended")
    with tracking.stage_run(cfg, "tune", run_name=f"tune[{cfg.data.corpus}][report]",
                            tags={"study": cfg.tune.study_name, "report": True}):
        return _finish(cfg, study, {})


def _finish(cfg: Config, study, extra: dict[str, Any]) -> dict[str, Any]:
    """Drop stale checkpoints and runs, write the report, log it to the active `tune` run."""
    _cleanup_checkpoints(cfg)
    _close_dead_runs(study)
    out = report_dir(cfg)
    summary = tune_report(cfg, study, extra=extra)
    tracking.log_metrics({"best_value": summary["best_value"], "n_complete": summary["trials_by_state"]["COMPLETE"],
                          "n_pruned": summary["pruned"], "n_failed": summary["trials_by_state"]["FAIL"],
                          "epochs_total": summary["epochs_total"], **({"wall_s": extra["wall_s"]} if "wall_s" in extra else {})})
    for name in ("best_params.json", "summary.json", "summary.md", "trials.csv", "tune_config.yaml"):
        tracking.log_artifact(out / name, "tune")
    for p in summary["plots"].values():
        if isinstance(p, str):
            tracking.log_artifact(p, "tune/plots")
    return summary


def _cleanup_checkpoints(cfg: Config) -> None:
    """After a complete study no trial will resume: drop checkpoints dead workers left behind."""
    root = report_dir(cfg) / "trials" / cfg.tune.study_name
    if root.is_dir():
        for ckpt in root.glob("*/ckpt"):
            shutil.rmtree(ckpt, ignore_errors=True)


def _close_dead_runs(study) -> None:
    """MLflow runs of trials whose worker died stay RUNNING; mark them (and their children) KILLED."""
    from optuna.trial import TrialState

    if not tracking.enabled():
        return
    ids = [t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    ids = [i for i in ids if i]
    if not ids:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for rid in ids:
            run = client.get_run(rid)
            children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{rid}'")
            for r in [run, *children]:
                if r.info.status == "RUNNING":
                    client.set_terminated(r.info.run_id, status="KILLED")
    except Exception as e:  # bookkeeping only: never fail a finished study over it
        log.warning("tune: could not close MLflow runs of dead trials: %s", e)


# ---------------------------------------------------------------------------- the report

def _trial_row(t) -> dict[str, Any]:
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retry_of = Retry.retried_trial_number(t)
    dur = t.duration.total_seconds() if t.duration is not None else None
    return {"number": t.number, "state": t.state.name, "value": t.value,
            **{k: t.params.get(k) for k in PARAMS},
            "epochs": len(t.intermediate_values), "best_epoch": t.user_attrs.get("best_epoch"),
            "retry_of": retry_of, "worker": t.user_attrs.get("worker"),
            "duration_s": None if dur is None else round(dur, 2), "fail_reason": t.user_attrs.get("fail_reason")}


def _save_plots(study, out: Path) -> dict[str, Any]:
    """Optuna's plots: plotly HTML when plotly is installed, else matplotlib PNG."""
    import optuna

    from psamf.io import atomic_path
    from psamf.reports import save_figure

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    plotly = optuna.visualization.is_available()
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if plotly:
                    fig = getattr(optuna.visualization, f"plot_{name}")(study)
                    path = out / f"{name}.html"
                    with atomic_path(path) as tmp:
                        fig.write_html(str(tmp), include_plotlyjs="cdn")
                else:
                    import matplotlib

                    matplotlib.use("Agg", force=False)
                    ax = getattr(optuna.visualization.matplotlib, f"plot_{name}")(study)
                    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                    path = save_figure(fig, out / f"{name}.png")
            files[name] = str(path)
        except Exception as e:  # e.g. importances need >= 2 complete trials with different values
            files[name] = {"skipped": str(e).splitlines()[0] if str(e) else type(e).__name__}
    return files


def tune_report(cfg: Config, study=None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write best_params.json, summary.json/.md, trials.csv and the plots from the study."""
    from optuna.trial import TrialState

    import pandas as pd

    from psamf.reports import markdown_table, provenance, write_csv

    if study is None:
        study = load_study(cfg)
    out = report_dir(cfg)
    trials = study.get_trials(deepcopy=False)
    rows = [_trial_row(t) for t in trials]
    by_state = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    best_params = {k: best.params[k] for k in PARAMS} if best else None
    av = next((t.user_attrs["av_simulated"] for t in trials if "av_simulated" in t.user_attrs), None)
    finished = by_state["COMPLETE"] + by_state["PRUNED"]
    summary: dict[str, Any] = {
        "stage": "tune", "corpus": cfg.data.corpus, "av_simulated": av, "profile": cfg.profile,
        "study_name": cfg.tune.study_name, "storage": redact(storage_url(cfg)), "direction": "minimize",
        "objective": "valid MAE at the best epoch (PSA-MF, ablation: %s)" % cfg.psamf.ablation,
        "n_trials": cfg.tune.n_trials, "n_trials_in_study": len(trials), "trials_by_state": by_state,
        "complete": study_finished(study, cfg), "epoch_budget": cfg.tune.epoch_budget,
        "best_value": best.value if best else None, "best_trial": best.number if best else None,
        "best_params": best_params, "pruned": by_state["PRUNED"],
        "epochs_total": sum(r["epochs"] for r in rows),
        "epochs_if_unpruned": finished * cfg.tune.epochs,
        "retried": [{"trial": r["number"], "retry_of": r["retry_of"]} for r in rows if r["retry_of"] is not None],
        "search_space": {"psamf.tau": ["log-uniform", cfg.tune.tau_min, cfg.tune.tau_max],
                         "psamf.split_layer": ["int", 1, encoder_depth(cfg.psamf.encoder) - 1],
                         "psamf.aux_lambda": ["uniform", cfg.tune.lambda_min, cfg.tune.lambda_max]},
        "sampler": {"name": "TPESampler", "seed": cfg.tune.seed, "n_startup_trials": cfg.tune.n_startup_trials},
        "pruner": {"name": cfg.tune.pruner, "startup_trials": cfg.tune.pruner_startup_trials,
                   "warmup_steps": cfg.tune.pruner_warmup_steps},
        "epochs_per_trial": cfg.tune.epochs, "text_encoder": cfg.psamf.encoder,
        "personality_encoder": cfg.psamf.personality_encoder,
        "heartbeat": {"interval_s": cfg.tune.heartbeat_interval, "grace_period_s": cfg.tune.grace_period,
                      "max_retry": cfg.tune.max_retry},
        "trials": rows, **(extra or {}),
    }
    summary["plots"] = _save_plots(study, out / "plots") if trials else {}
    files = {"summary": str(out / "summary.json"), "summary_md": str(out / "summary.md"),
             "trials_csv": str(out / "trials.csv")}
    if best_params is not None:
        write_json(out / "best_params.json", best_params)
        files["best_params"] = str(out / "best_params.json")
    summary["files"] = files
    write_csv(out / "trials.csv", pd.DataFrame(rows, columns=ROW_COLUMNS))

    md = [f"# Optuna study `{cfg.tune.study_name}` ({cfg.data.corpus})", "",
          provenance(cfg.data.corpus, bool(av)), "",
          f"Objective: {summary['objective']}, minimized. {finished}/{cfg.tune.n_trials} finished trials; "
          f"states: {', '.join(f'{k} {v}' for k, v in by_state.items() if v)}. "
          f"Epochs run: {summary['epochs_total']} (unpruned: {summary['epochs_if_unpruned']})"
          + (f" of a budget of {cfg.tune.epoch_budget}." if cfg.tune.epoch_budget else "."), ""]
    if best:
        md += [f"Best: trial {best.number}, valid MAE {best.value:.4f}, "
               + ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`" for k, v in best_params.items()),
               "", f"Train with it: `psamf train --best-params {out / 'best_params.json'}`", ""]
    md.append(markdown_table([{k: ("" if v is None else v) for k, v in r.items()} for r in rows], ["number", "state", "value", *PARAMS, "epochs", "retry_of", "duration_s"]))
    write_text(out / "summary.md", "\n".join(md))
    write_json(out / "summary.json", summary)
    return summary


def load_best_params(path: str | Path) -> dict[str, Any]:
    """A best_params.json (dotted config keys -> values), checked to be a flat mapping."""
    from psamf.io import read_json

    p = Path(path)
    data = read_json(p, "best-params file not found; run `psamf tune` first")
    if not isinstance(data, dict) or not all(isinstance(k, str) and "." in k for k in data):
        raise InputError(p, 'must be a JSON object of dotted config keys, e.g. {"psamf.tau": 0.1}')
    bad = [k for k, v in data.items() if isinstance(v, (dict, list))]
    if bad:
        raise InputError(p, f"values must be scalars ({', '.join(bad)})")
    return data


def best_params_overrides(path: str | Path) -> list[str]:
    """best_params.json as `--set`-style overrides (values JSON-encoded, which YAML reads back)."""
    import json

    return [f"{k}={json.dumps(v)}" for k, v in load_best_params(path).items()]


# ---------------------------------------------------------------------------- worker process

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psamf.tune", description="an Optuna worker for `psamf tune`")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="run trials of the existing study until it has tune.n_trials finished")
    w.add_argument("--config", required=True, help="a resolved config (tune_config.yaml) or params.yaml")
    w.add_argument("--profile", default=None)
    w.add_argument("--worker", type=int, default=0, help="worker index (offsets the sampler seed)")
    args = ap.parse_args(argv)
    from psamf.logs import configure

    configure("INFO")
    try:
        cfg = load_config(args.config, args.profile)
        result = run_worker(cfg, args.worker, parallel=True)
    except InputError as e:
        print(f"psamf: error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(result, sort_keys=False).strip())
    return 0


if __name__ == "__main__":  # pragma: no cover - the worker process
    sys.exit(main())
