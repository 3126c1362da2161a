"""An MLflow outage during training costs no epoch and fails no stage: the tracking server is
stopped (by pid) while pretrain runs and started again on the same port; training goes on,
every epoch's checkpoint is written before its metrics are sent, and the held-back metrics
reach MLflow once it is back."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from corpora import smoke_corpus

from servers import _mlflow_cmd, _wait_http, free_port, stop_process

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _server(port: int, root: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / f"server-{time.monotonic_ns()}.log", "wb")
    proc = subprocess.Popen([*_mlflow_cmd(), "server", "--workers", "1", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "art"),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, cwd=root)
    _wait_http(f"http://127.0.0.1:{port}/health", proc, 90, Path(log.name))
    return proc


def test_pretrain_survives_a_tracking_outage_and_logs_every_epoch_once_back(tmp_path):
    import mlflow

    from psamf.data.prepared import load_prepared

    sets = [f"data.raw_dir={tmp_path}/raw", f"data.prepared_dir={tmp_path}/prepared",
            f"text_features.cache_dir={tmp_path}/cache", f"pretrain.out_dir={tmp_path}/models",
            "pretrain.epochs=30", "pretrain.patience=50", "tracking.experiment=outage"]
    cfg = smoke_corpus(sets)
    user = load_prepared(cfg.data.prepared_path).loo_users(1)[0]

    port = free_port()
    server = _server(port, tmp_path)
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "psamf.cli.main", "pretrain", "--held-out", user, "--profile", "smoke"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1", "PSAMF_TRACKING_PATIENCE_S": "120"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        last = tmp_path / "models" / "synthetic" / user / "last.pt"
        deadline = time.time() + 300
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "pretrain finished before the outage began"
        import torch

        os.killpg(server.pid, signal.SIGKILL)  # the outage, at once: epochs go on without MLflow
        server.wait()
        at_stop = torch.load(last, weights_only=False)["epoch"]
        time.sleep(8)
        during = torch.load(last, weights_only=False)["epoch"]
        server = _server(port, tmp_path)  # back, same address, same store
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_process(server)
        server = _server(port, tmp_path)
    try:
        assert proc.returncode == 0, err[-3000:]
        assert during > at_stop, (at_stop, during)  # training did not wait for MLflow
        assert "MLflow unreachable" in err  # it noticed, and said so, and went on
        client = mlflow.MlflowClient(url)
        exp = client.get_experiment_by_name("outage")
        (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'pretrain'")
        import json

        report = json.loads((tmp_path / "models" / "synthetic" / user / "metrics.json").read_text())
        history = client.get_metric_history(run.info.run_id, "valid_mae")
        assert sorted(m.step for m in history) == list(range(len(report["history"]))) == list(range(30))
        by_step = {m.step: m.value for m in history}
        assert [by_step[h["epoch"]] for h in report["history"]] == pytest.approx([h["valid_mae"] for h in report["history"]])
        assert run.info.status == "FINISHED"
    finally:
        stop_process(server)
