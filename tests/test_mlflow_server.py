"""The tracking server setup, for real: PostgreSQL backend store + S3 artifacts (moto) + `mlflow server`,
then train a tiny MulT, log it as pyfunc, register and promote it, serve `models:/<name>@champion`
with `mlflow models serve`, and score over HTTP. Also: no credential value leaks into any param,
tag or logged text artifact.

Slow-marked, but part of the normal suite; every server is stopped by pid even on failure.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from corpora import smoke_corpus

from servers import mlflow_server, model_server, moto_s3, postgres_server

REPO = Path(__file__).resolve().parents[1]
BUCKET = "psamf-artifacts"
TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".txt", ".py", ".md", ".csv", ".html", ""}

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(monkeypatch):
    """PostgreSQL + moto S3 + mlflow server, credentials only in the environment."""
    import mlflow

    secret = "psamf-secret-" + secrets.token_hex(12)
    key_id = "PSAMFKEY" + secrets.token_hex(6).upper()
    for k, v in {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                 "AWS_DEFAULT_REGION": "us-east-1", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    timings: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        t = time.perf_counter()
        pg = stack.enter_context(postgres_server("mlflow"))
        timings["postgres"] = time.perf_counter() - t
        endpoint = stack.enter_context(moto_s3(BUCKET))
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
        t = time.perf_counter()
        url = stack.enter_context(mlflow_server(pg, f"s3://{BUCKET}/mlflow"))
        timings["mlflow_server"] = time.perf_counter() - t
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        try:
            yield {"url": url, "secret": secret, "key_id": key_id, "s3": endpoint, "timings": timings, "pg": pg}
        finally:
            mlflow.set_tracking_uri(before)  # mlflow keeps a process-global URI; give the next test its own


def _leaks(text: str, needles: list[str]) -> list[str]:
    return [n for n in needles if n in text]


def _scan_dir(root: Path, needles: list[str]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name == "MLmodel") and p.stat().st_size < 2_000_000:
            if _leaks(p.read_text(errors="replace"), needles):
                found.append(str(p.relative_to(root)))
    return found


def test_server_stack_register_promote_serve(stack, tmp_path):
    import boto3
    import mlflow
    import requests

    from psamf.data.prepared import load_prepared
    from psamf.mult.pretrain import pretrain
    from psamf.registry.gate import register_stage
    from psamf.registry.serving import dataset_frame

    t0 = time.perf_counter()
    cfg = smoke_corpus([
        f"data.raw_dir={tmp_path}/raw", f"data.prepared_dir={tmp_path}/prepared",
        f"pretrain.out_dir={tmp_path}/models", f"text_features.cache_dir={tmp_path}/cache",
        "synth.n_speakers=4", "pretrain.epochs=1", "tracking.experiment=server-test"])
    ds = load_prepared(cfg.data.prepared_path)
    user = ds.loo_users(1)[0]
    pretrain(cfg, user)  # its run goes to the server (PostgreSQL)

    # log as pyfunc (artifacts -> S3 through the server), score, gate: the first model is champion
    result = register_stage(cfg, "mult", held_out=user)
    name = cfg.registry.mult_model
    assert result["promoted"] and result["verdict"] == "first" and result["aliases"] == ["champion"]
    again = register_stage(cfg, "mult", held_out=user, run_id=result["run_id"])
    assert again["duplicate"] and again["version"] == result["version"]
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert client.get_model_version_by_alias(name, "champion").version == result["version"]
    s3 = boto3.client("s3", endpoint_url=stack["s3"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(k.endswith("/MLmodel") for k in keys), keys  # the model really lives in S3
    t_register = time.perf_counter() - t0

    # serve the champion and score over HTTP, including an unseen speaker and a missing user_id
    idx = np.flatnonzero(ds.segments["speaker_id"].to_numpy() != user)[:2]
    rows = dataset_frame(ds, idx).to_dict(orient="records")
    rows.append({"text": "a speaker nobody has seen", "audio": rows[0]["audio"][:3], "visual": rows[0]["visual"],
                 "user_id": "never-seen-speaker"})
    rows.append({"text": "no user id at all", "audio": [], "visual": rows[1]["visual"][:1], "user_id": None})
    df = pd.DataFrame(rows)
    payload = {"dataframe_records": rows}  # None stays null (a DataFrame would make it NaN)
    t1 = time.perf_counter()
    with model_server(f"models:/{name}@champion") as serve_url:
        t_serve_start = time.perf_counter() - t1
        r = requests.post(f"{serve_url}/invocations", json=payload, timeout=60)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        bad = requests.post(f"{serve_url}/invocations", timeout=60, json={"dataframe_split": {
            "columns": ["text", "audio", "visual"], "data": [["x", [[1.0, 2.0]], [[1.0]]]]}})
        assert bad.status_code == 400, bad.text  # wrong frame width: the client's fault, said so
    assert len(preds) == len(df)
    values = [p["sentiment"] if isinstance(p, dict) else p for p in preds]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values), values
    local = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(df)["sentiment"].to_numpy()
    np.testing.assert_allclose(values, local, rtol=1e-4, atol=1e-5)  # served == in-process

    # no credential value anywhere: params, tags, run artifacts, logged models, version tags
    needles = [stack["secret"], stack["key_id"]]
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 2  # pretrain + register
    for run in runs:
        for k, v in {**run.data.params, **run.data.tags}.items():
            assert not _leaks(f"{k}={v}", needles), (run.info.run_id, k)
        if client.list_artifacts(run.info.run_id):
            d = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id))
            assert not _scan_dir(Path(d), needles)
    for lm in client.search_logged_models(experiment_ids=[exp.experiment_id]):
        for k, v in {**(lm.params or {}), **(lm.tags or {})}.items():
            assert not _leaks(f"{k}={v}", needles), (lm.model_id, k)
        d = mlflow.artifacts.download_artifacts(artifact_uri=lm.artifact_location, dst_path=str(tmp_path / lm.model_id))
        assert not _scan_dir(Path(d), needles), lm.model_id
    for mv in client.search_model_versions(f"name = '{name}'"):
        assert not _leaks(str(mv.tags), needles)
    timings = {**stack["timings"], "train_register": t_register, "serve_start": t_serve_start,
               "total_in_test": time.perf_counter() - t0}
    print("timings:", {k: round(v, 1) for k, v in timings.items()})


RACE = """
import json, os, sys, time
import mlflow
import psamf.registry.gate as registry
from psamf.config import load_config

mae, delay, barrier, me, name, exp = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
decide = registry.decide
def slow_decide(*args, **kwargs):  # widen the window between reading @champion and moving it
    d = decide(*args, **kwargs)
    time.sleep(delay)
    return d
registry.decide = slow_decide
run = mlflow.MlflowClient().create_run(exp).info.run_id
open(os.path.join(barrier, me), "w").close()
while len(os.listdir(barrier)) < 2:
    time.sleep(0.01)
r = registry.register(load_config(None, "smoke"), run, f"runs:/{run}/model", {"mae": mae, "non0_acc2": 0.8},
                      "synthetic:1:x:av_simulated=false", name)
print(json.dumps({"version": r["version"], "verdict": r["verdict"]}))
"""


def test_two_concurrent_registrations_never_leave_the_worse_model_champion(stack, tmp_path):
    """Two processes register at once against the real server (PostgreSQL + S3). Both would read
    the same old champion; the worse one holds its decision longer, so without the gate's lock it
    would move @champion last. The lock (a PostgreSQL advisory lock, PSAMF_REGISTRY_LOCK_URL)
    makes the second decide against the first's result."""
    import subprocess
    import sys

    import mlflow

    from psamf.config import load_config
    from psamf.registry.gate import register

    name = "race-model"
    client = mlflow.MlflowClient(stack["url"])  # not the process-global URI an earlier test may have set
    exp = client.create_experiment("race")
    run = client.create_run(exp).info.run_id
    first = register(load_config(None, "smoke"), run, f"runs:/{run}/model", {"mae": 0.90, "non0_acc2": 0.8},
                     "synthetic:1:x:av_simulated=false", name)
    assert first["verdict"] == "first"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PSAMF_REGISTRY_LOCK_URL": stack["pg"]}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(mae), str(delay), str(barrier), who, name, exp],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mae, delay, who in ((0.70, 0.0, "better"), (0.80, 2.0, "worse"))]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    better, worse = (json.loads(o[0].strip().splitlines()[-1]) for o in outs)
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == better["version"], (better, worse)
    assert float(champion.tags["gate.mae"]) == 0.70
    assert len(client.search_model_versions(f"name = '{name}'")) == 3
