"""The search itself: storage, study, search space, the objective and the trial budget.

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
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from psamf import tracking
from psamf.config import Config
from psamf.errors import InputError
from psamf.locks import dialect, sqlite_file, with_driver
from psamf.metrics import NonFiniteError
from psamf.redact import redact

STORAGE_ENV = "PSAMF_OPTUNA_STORAGE"
PARAMS = ("psamf.tau", "psamf.split_layer", "psamf.aux_lambda")
SQLITE_BUSY_TIMEOUT_S = 60
SCHEMA_RETRIES = 4


# ---------------------------------------------------------------------------- storage and study

def storage_url(cfg: Config) -> str:
    """`$PSAMF_OPTUNA_STORAGE`, else tune.storage (PostgreSQL through psycopg 3: locks.with_driver)."""
    return with_driver(os.environ.get(STORAGE_ENV) or cfg.tune.storage)


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
    """tune.pruner (one of its config.CHOICES, checked at load) as an Optuna pruner."""
    import optuna

    tc = cfg.tune
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=tc.pruner_startup_trials,
                                                          n_warmup_steps=tc.pruner_warmup_steps),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, tc.epochs)),
            "none": optuna.pruners.NopPruner}[tc.pruner]()


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
    from psamf.psa_mf.train import dir_identity
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


def _claim_trial_dir(trial, cfg: Config) -> tuple[Path, int | None]:
    """The trial's dir and the trial it retries (None for a fresh one). A retry
    (RetryHeartbeatStaleTrialCallback) inherits the dead trial's user attrs, so its trial_key
    names the original trial's dir, whose last checkpoint it resumes from."""
    inherited = trial.user_attrs.get("trial_key")
    key = trial.number if inherited is None else int(inherited)
    out = trial_dir(cfg, key)
    if inherited is None:
        shutil.rmtree(out, ignore_errors=True)  # a fresh trial never resumes someone else's run
    for name, value in {"trial_key": key, "worker": _worker_id(), "worker_pid": os.getpid(),
                        "out_dir": str(out)}.items():
        trial.set_user_attr(name, value)
    return out, None if inherited is None else key


def _train_trial(trial, cfg_t: Config, out: Path, shared: dict[str, Any] | None = None) -> tuple[float, Exception | None]:
    """Train inside the trial's MLflow run: (valid MAE, the TrialPruned or NonFiniteError to raise
    once that run is closed), logging valid MAE per epoch and the trial's state."""
    import optuna

    from psamf.psa_mf.train import train_psamf

    rec = _RecordingTrial(trial)
    value, stop, state = math.nan, None, "FAIL"
    try:
        report = train_psamf(cfg_t, trial=rec, out_dir=out, shared=shared)
        value = float(report["valid"]["mae"])
        trial.set_user_attr("best_epoch", report["best_epoch"])
        trial.set_user_attr("av_simulated", bool(report["av_simulated"]))
        state = "COMPLETE" if math.isfinite(value) else "FAIL"
    except optuna.TrialPruned as e:
        stop, state = e, "PRUNED"
    except NonFiniteError as e:  # a diverged trial: FAIL with its reason
        stop = e
        trial.set_user_attr("fail_reason", str(e))
        tracking.set_tags({"fail_reason": str(e)})
    finally:
        for step, v in rec.reports:  # here, not in report(): train_psamf's own run is active there
            tracking.log_metrics({"valid_mae": v}, step=step)
        tracking.set_tags({"state": state})
    if stop is None:
        tracking.log_metrics({"value": value})
    return value, stop


class Objective:
    """One trial: suggest τ/N/λ, train PSA-MF for tune.epochs, return the best valid MAE.

    A diverged trial raises NonFiniteError (its reason in the `fail_reason` user attr): run it
    with study.optimize(catch=(NonFiniteError,)) so that Optuna marks it FAIL and goes on."""

    def __init__(self, cfg: Config, depth: int, on_start: Callable[[], None] | None = None):
        self.cfg, self.depth, self.on_start = cfg, depth, on_start
        self.shared: dict[str, Any] = {}  # what this worker's trials have in common (train_psamf's `shared`)

    def __call__(self, trial) -> float:
        if self.on_start is not None:  # the trial exists now: let other workers ask for theirs
            self.on_start()
        cfg = self.cfg
        params = suggest(trial, cfg, self.depth)
        out, retry_of = _claim_trial_dir(trial, cfg)
        cfg_t = trial_config(cfg, params, out)
        tags = {"trial": trial.number, "worker": _worker_id(), "study": cfg.tune.study_name,
                "retry_of": "" if retry_of is None else retry_of}
        try:
            with tracking.stage_run(cfg_t, "tune-trial", run_name=f"trial-{trial.number}", tags=tags) as run:
                if run.info.run_id:
                    trial.set_user_attr("mlflow_run_id", run.info.run_id)
                value, stop = _train_trial(trial, cfg_t, out, self.shared)
        finally:
            _cleanup_trial_dir(out, cfg.tune.keep_trial_models)
        if stop is not None:  # raised only now, so the MLflow run ends FINISHED, its state in a tag
            raise stop
        return value  # a nan value: Optuna marks the trial FAIL and the worker goes on


# ---------------------------------------------------------------------------- trial counts and the epoch budget

def trial_counts(study) -> dict[str, int]:
    """The study's trials by state name, every TrialState present."""
    from optuna.trial import TrialState

    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    return {s.name: counts[s.name] for s in TrialState}


def epochs_spent(study, cfg: Config, *, running: bool = True) -> int:
    """Training epochs the study has used: finished trials' reported epochs (a retry reports only
    those it ran), plus (running=True) tune.epochs for each running trial, which may still use them all."""
    from optuna.trial import TrialState

    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    spent = sum(len(t.intermediate_values) for t in finished)
    if running:
        spent += cfg.tune.epochs * len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    return spent


def budget_allows_trial(study, cfg: Config, *, running: bool = True) -> bool:
    """tune.epoch_budget: a trial may start only if all its tune.epochs fit in what is left.
    running=False ignores running trials' reservations (they may end early, freeing epochs)."""
    budget = cfg.tune.epoch_budget
    return budget is None or epochs_spent(study, cfg, running=running) + cfg.tune.epochs <= budget


def study_finished(study, cfg: Config) -> bool:
    """tune.n_trials finished trials, or an epoch budget with no room left and nothing running."""
    c = trial_counts(study)
    if c["COMPLETE"] + c["PRUNED"] >= cfg.tune.n_trials:
        return True
    return c["RUNNING"] == 0 and not budget_allows_trial(study, cfg, running=False)
