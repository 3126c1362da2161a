"""A failed pipeline run (kfp.local: `psamf pipeline run`, `psamf demo`) says why in one line: the
failing task's name and its own error, exit 2 for bad input and 1 for a stage that failed on its
own terms, with kfp.local's full output kept in <root>/pipeline.log.

Each bad --source fails in the DAG's first tasks (fingerprint, fetch-data), so a run takes seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "psamf-corpora"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A loopback S3 (moto) whose bucket holds, under other-corpus/, a MOSI directory only."""
    pytest.importorskip("moto.server", reason="moto[server] not installed: no local S3 server")
    from servers import moto_s3

    keys = {"AWS_ACCESS_KEY_ID": "PSAMFTESTKEY", "AWS_SECRET_ACCESS_KEY": "psamf-test-secret-456",
            "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        with moto_s3(BUCKET) as endpoint:
            import boto3

            boto3.client("s3", endpoint_url=endpoint).put_object(
                Bucket=BUCKET, Key="other-corpus/mosi/CMU_MOSI_Opinion_Labels.csd", Body=b"not this corpus")
            yield {**keys, "AWS_ENDPOINT_URL": endpoint}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pipeline_run(tmp_path: Path, source: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PSAMF_"))}
    env = {**base, "PSAMF_TRACKING": "off", "PSAMF_PARAMS": str(REPO / "params.yaml"), "PYTHONPATH": str(REPO),
           "AWS_CONFIG_FILE": str(home / "c"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "k"),
           "NO_PROXY": "127.0.0.1,localhost", "DVC_NO_ANALYTICS": "1", **env}
    return subprocess.run([sys.executable, "-m", "psamf.cli.main", "pipeline", "run", "--profile", "smoke",
                           "--source", source, "--root", str(tmp_path / "kfp"), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case, source, task, error", [
    ("dvc", "dvc:not-an-md5", "fingerprint", "data_source: 'dvc:not-an-md5': not an md5 of a DVC directory"),
    ("no-bucket", "s3://no-such-bucket/corpora", "fingerprint",
     "data_source: s3://no-such-bucket/corpora: NoSuchBucket: The specified bucket does not exist"),
    ("other-corpus", f"s3://{BUCKET}/other-corpus", "fetch-data",
     f"data_source: s3://{BUCKET}/other-corpus holds ['mosi'], not data.corpus='synthetic'"),
])
def test_a_bad_source_ends_with_the_failing_task_and_its_own_error(case, source, task, error, s3, tmp_path):
    run = _pipeline_run(tmp_path, source, s3 if case != "dvc" else {})
    log = tmp_path / "kfp" / "pipeline.log"
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert run.stderr.splitlines()[-1] == f"psamf: error: pipeline task {task} failed: {error} (full log: {log})", \
        run.stderr[-3000:]
    assert sum(ln.startswith("psamf: error:") for ln in run.stderr.splitlines()) == 1
    assert "Traceback" not in run.stderr and "RuntimeError" not in run.stderr, run.stderr[-3000:]
    assert len(run.stderr.splitlines()) <= 10, run.stderr  # a line per task try, then the one error
    text = log.read_text()
    assert "Traceback" in text and error in text  # the full story stays in the log
    assert s3["AWS_SECRET_ACCESS_KEY"] not in run.stderr + text


def test_the_exit_code_follows_the_failing_tasks_error(tmp_path, monkeypatch):
    """2 for bad input, 1 for failed validation or a diverged run (as the stage commands), 1 for
    anything else; with no record (a task that died first), the log's last error line."""
    from psamf.cli.kfp import task_failure
    from psamf.errors import InputError, ValidationFailed
    from psamf.metrics import DivergedError
    from psamf.stages import TASK_ERRORS_ENV, task

    errors = tmp_path / "errors"
    errors.mkdir()
    monkeypatch.setenv(TASK_ERRORS_ENV, str(errors))
    kfp_error = RuntimeError("Pipeline \x1b[95m'psamf-training'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m. "
                             "Inner task failed: \x1b[96m'validate'\x1b[0m inside \x1b[96m'psamf-train-and-register'"
                             "\x1b[0m.")
    for exc, code, line in [
        (InputError("x.csv", "bad row"), 2, "x.csv: bad row"),
        (ValidationFailed("validation failed: labels in [-3, 3]"), 1, "validation failed: labels in [-3, 3]"),
        (DivergedError("train[psamf]", "at epoch 2 of 5", "nan", {"train.lr": 1.0}), 1,
         "train[psamf]: the run diverged at epoch 2 of 5 (nan); settings most likely at fault: train.lr=1"),
        (KeyError("boom"), 1, "KeyError: 'boom'"),
    ]:
        for p in errors.iterdir():
            p.unlink()

        @task("validate")
        def stage():
            raise exc

        with pytest.raises(type(exc)):
            stage()
        failed = task_failure(kfp_error, errors, tmp_path / "pipeline.log")
        assert (failed.task, failed.exit_code) == ("validate", code)
        assert str(failed) == f"pipeline task validate failed: {line} (full log: {tmp_path / 'pipeline.log'})"
    for p in errors.iterdir():
        p.unlink()
    (tmp_path / "pipeline.log").write_text("    Traceback (most recent call last):\n    ...\n"
                                           "    ModuleNotFoundError: No module named 'psamf'\n")
    failed = task_failure(kfp_error, errors, tmp_path / "pipeline.log")
    assert (failed.exit_code, failed.message.split(" (full")[0]) == (1, "ModuleNotFoundError: No module named 'psamf'")
    assert task_failure(RuntimeError("something else"), errors, None) is None


def test_every_stage_names_a_task_of_the_dag():
    import inspect

    import yaml

    from psamf import stages
    from psamf.cli.kfp import compile_pipeline

    named = {f.task_name for _, f in inspect.getmembers(stages, inspect.isfunction) if hasattr(f, "task_name")}
    assert len(named) == 13  # tune-study is gone: the first tune worker creates the study
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        spec = yaml.safe_load_all(compile_pipeline(Path(d) / "p.yaml").read_text()).__next__()
    tasks = set()
    for comp in [spec["root"], *spec["components"].values()]:
        tasks |= set(comp.get("dag", {}).get("tasks", {}))
    assert named <= tasks, named - tasks
