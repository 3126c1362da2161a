"""Checkpoints that outlive the task (psamf.checkpoints): a retried pod resumes.

The retry test runs pretrain the way the KFP component does (psamf.stages.pretrain_stage,
in its own process), with the checkpoint store in S3 (moto on loopback). It SIGKILLs the task
once the first epoch's checkpoint is in the bucket, then reruns it as a KFP retry would: a
new process with a new, empty output directory. The retry must resume from S3 and end with
exactly the metrics of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "psamf-ckpt"


@pytest.fixture
def s3(tmp_path, monkeypatch):
    pytest.importorskip("moto.server", reason="moto[server] not installed: no local S3 server")
    from servers import moto_s3

    for k, v in {"AWS_ACCESS_KEY_ID": "PSAMFCKPT", "AWS_SECRET_ACCESS_KEY": "psamf-ckpt-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "nocfg"),
                 "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "nocreds")}.items():
        monkeypatch.setenv(k, v)
    with moto_s3(BUCKET) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        import boto3
        client = boto3.client("s3", endpoint_url=endpoint)
        for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):  # moto keeps state per process
            client.delete_object(Bucket=BUCKET, Key=o["Key"])
        yield client


@pytest.mark.parametrize("backend", ["dir", "s3"])
def test_store_push_pull_discard(backend, tmp_path, request):
    from psamf.checkpoints import CheckpointStore

    uri = str(tmp_path / "durable") if backend == "dir" else f"s3://{BUCKET}/ckpt"
    if backend == "s3":
        request.getfixturevalue("s3")
    store = CheckpointStore(uri, "pretrain", "abc123")
    a = tmp_path / "pod-a"
    a.mkdir()
    (a / "last.pt").write_bytes(b"epoch-1")
    (a / "best.pt").write_bytes(b"best-0")
    assert not store.pull(tmp_path / "empty")  # nothing stored yet
    store.push(a / "last.pt")
    store.push(a / "best.pt")
    b = tmp_path / "pod-b"
    assert store.pull(b)
    assert (b / "last.pt").read_bytes() == b"epoch-1" and (b / "best.pt").read_bytes() == b"best-0"
    (b / "last.pt").write_bytes(b"local-is-newer")
    assert not store.pull(b) and (b / "last.pt").read_bytes() == b"local-is-newer"  # local wins
    assert not CheckpointStore(uri, "pretrain", "other").pull(tmp_path / "pod-c")  # other settings, other key
    store.discard()
    assert not store.pull(tmp_path / "pod-d")


def _pretrain_task(dataset: Path, model: Path, overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    code = ("import json, sys; from psamf.stages import pretrain_stage; "
            "pretrain_stage('smoke', json.loads(sys.argv[1]), '', '', sys.argv[2], 0, sys.argv[3])")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(overrides), str(dataset), str(model)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(model: Path) -> dict:
    found = list(model.rglob("metrics.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


@pytest.mark.slow
def test_a_killed_pretrain_task_retried_in_a_new_pod_resumes_from_s3_bit_identically(s3, tmp_path):
    from psamf import stages as o

    params = (REPO / "params.yaml").read_text()
    fp = o.fingerprint_stage("smoke", [], params, "synthetic")
    o.fetch_stage("smoke", [], params, fp["fingerprint"], "synthetic", fp["data_version"], str(tmp_path / "raw"))
    os.environ["PSAMF_TRACKING"] = "off"
    try:
        o.ingest_stage("smoke", [], params, "", str(tmp_path / "raw"), str(tmp_path / "dataset"))
    finally:
        os.environ.pop("PSAMF_TRACKING")
    overrides = ["pretrain.epochs=6", "pretrain.patience=10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PSAMF_TRACKING": "off"}
    env.pop("PSAMF_CHECKPOINT_URI", None)

    ref = _pretrain_task(tmp_path / "dataset", tmp_path / "ref", overrides, env)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    env_s3 = {**env, "PSAMF_CHECKPOINT_URI": f"s3://{BUCKET}/ckpt"}
    first = _pretrain_task(tmp_path / "dataset", tmp_path / "pod-1", overrides, env_s3)
    deadline = time.time() + 300
    keys: list[str] = []
    while first.poll() is None and time.time() < deadline:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ckpt/pretrain/").get("Contents", [])]
        if any(k.endswith("/last.pt") for k in keys):
            break
        time.sleep(0.02)
    assert first.poll() is None, "the task finished before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not list((tmp_path / "pod-1").rglob("metrics.json"))

    retry = _pretrain_task(tmp_path / "dataset", tmp_path / "pod-2", overrides, env_s3)  # a new, empty pod
    assert retry.wait(timeout=300) == 0, retry.stderr.read()
    resumed, reference = _metrics(tmp_path / "pod-2"), _metrics(tmp_path / "ref")
    assert resumed["resumed_from_epoch"] >= 1
    assert resumed["history"] == reference["history"]  # bit-identical, every epoch
    assert resumed["best_valid_mae"] == reference["best_valid_mae"]
    left = s3.list_objects_v2(Bucket=BUCKET, Prefix="ckpt/pretrain/").get("KeyCount", 0)
    assert left == 0  # a finished run drops its durable checkpoint


def test_pretrain_checkpoint_key_changes_with_the_data(tmp_path):
    """Re-ingested features with the same segment count must not resume the old weights."""
    import torch

    from psamf.training import tensor_digest

    a = {"audio": torch.zeros(4, 3), "label": torch.arange(4.0)}
    b = {"audio": torch.zeros(4, 3), "label": torch.arange(4.0)}
    assert tensor_digest(a) == tensor_digest(b)
    b["audio"][2, 1] = 1e-6
    assert tensor_digest(a) != tensor_digest(b)


def test_only_a_missing_key_means_no_checkpoint_a_missing_bucket_stops(s3, tmp_path):
    """A store that does not answer as a store (here: no such bucket on a real S3 server) is a
    fault, not an empty store: the run must not silently start from zero."""
    from psamf.checkpoints import CheckpointStore
    from psamf.errors import InputError

    assert not CheckpointStore(f"s3://{BUCKET}/ckpt", "train", "k").pull(tmp_path / "a")  # missing key: start afresh
    with pytest.raises(InputError) as e:
        CheckpointStore("s3://no-such-bucket/ckpt", "train", "k").pull(tmp_path / "b")
    msg = str(e.value)
    assert msg.startswith("checkpoint store s3://no-such-bucket/ckpt: ") and "404 NoSuchBucket" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("status,code", [(403, "AccessDenied"), (500, "InternalError"), (503, "SlowDown")])
def test_a_store_error_stops_the_stage_with_one_line_naming_store_and_status(s3, tmp_path, monkeypatch,
                                                                             status, code):
    from botocore.exceptions import ClientError

    import psamf.data.source as source
    from psamf.checkpoints import CheckpointStore
    from psamf.errors import InputError

    real = source.s3_client

    def failing_client():
        client = real()

        def refuse(*a, **k):
            raise ClientError({"Error": {"Code": code, "Message": f"{code} from the store"},
                               "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
        monkeypatch.setattr(client, "get_object", refuse)
        monkeypatch.setattr(client, "download_file", refuse)
        return client

    monkeypatch.setattr(source, "s3_client", failing_client)
    store = CheckpointStore(f"s3://{BUCKET}/ckpt", "pretrain", "abc")
    with pytest.raises(InputError) as e:
        store.pull(tmp_path / "pod")
    msg = str(e.value)
    assert msg.startswith(f"checkpoint store s3://{BUCKET}/ckpt: ") and f"HTTP {status} {code}" in msg, msg
    assert "\n" not in msg and not (tmp_path / "pod" / "last.pt").exists()

