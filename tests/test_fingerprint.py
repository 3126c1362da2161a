"""The run fingerprint (code + data + params) as a pod computes it, and the skip it decides:
unchanged inputs skip; a change in any one of the three runs. Also the cgroup-aware CPU count."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fingerprint_in_a_pod(tmp_path: Path, env_extra: dict[str, str], params_yaml: str, source: str) -> str:
    """fingerprint_stage in a fresh interpreter whose cwd has no .git, no data.dvc, no params.yaml."""
    import json
    import os

    code = ("import json, sys; from psamf.stages import fingerprint_stage; "
            "print(json.dumps(fingerprint_stage('smoke', [], sys.stdin.read(), sys.argv[1], 'test')))")
    env = {**{k: v for k, v in os.environ.items() if k != "PSAMF_GIT_SHA"}, "PSAMF_TRACKING": "off", **env_extra}
    out = subprocess.run([sys.executable, "-c", code, source], input=params_yaml, cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_code_version_is_the_baked_sha_in_an_image(monkeypatch):
    from psamf import fingerprint

    fingerprint.code_version.cache_clear()
    monkeypatch.setenv(fingerprint.CODE_ENV, "0123abcd" * 5)
    try:
        assert fingerprint.code_version() == "0123abcd" * 5
    finally:
        fingerprint.code_version.cache_clear()


def test_code_version_without_git_or_env_hashes_the_sources(tmp_path, monkeypatch):
    """An image built without the build arg still changes its version when the code changes."""
    import shutil

    from psamf import fingerprint

    pkg = tmp_path / "psamf"
    shutil.copytree(fingerprint.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.delenv(fingerprint.CODE_ENV, raising=False)
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", pkg)
    fingerprint.code_version.cache_clear()
    try:
        a = fingerprint.code_version()
        assert a.startswith("src.")
        (pkg / "metrics.py").write_text((pkg / "metrics.py").read_text() + "\n# a change\n")
        fingerprint.code_version.cache_clear()
        assert fingerprint.code_version() != a
    finally:
        fingerprint.code_version.cache_clear()


def test_each_of_code_data_params_changes_the_fingerprint_and_nothing_else_does(tmp_path):
    params = (REPO / "params.yaml").read_text()
    base = _fingerprint_in_a_pod(tmp_path, {"PSAMF_GIT_SHA": "a" * 40}, params, "synthetic")
    same = _fingerprint_in_a_pod(tmp_path, {"PSAMF_GIT_SHA": "a" * 40}, params, "synthetic")
    assert base == same  # deterministic across processes: a scheduled run on unchanged inputs hits the cache
    code = _fingerprint_in_a_pod(tmp_path, {"PSAMF_GIT_SHA": "b" * 40}, params, "synthetic")
    data = _fingerprint_in_a_pod(tmp_path, {"PSAMF_GIT_SHA": "a" * 40}, params.replace("seed: 0", "seed: 1", 1),
                                 "synthetic")
    knob = _fingerprint_in_a_pod(tmp_path, {"PSAMF_GIT_SHA": "a" * 40}, params.replace("lr: 5.0e-5", "lr: 4.0e-5"),
                                 "synthetic")
    assert code["data_version"] == base["data_version"] and code["fingerprint"] != base["fingerprint"]
    assert data["data_version"] != base["data_version"] and data["fingerprint"] != base["fingerprint"]
    assert knob["data_version"] == base["data_version"] and knob["fingerprint"] != base["fingerprint"]


def test_dvc_source_version_is_the_directory_md5(tmp_path):
    from psamf.config import load_config
    from psamf.data.source import parse_source, source_version
    from psamf.errors import InputError

    cfg = load_config(REPO / "params.yaml", "smoke")
    md5 = "0" * 31 + "1"
    assert source_version(cfg, f"dvc:{md5}.dir@s3://b/p") == f"dvc:{md5}"
    assert parse_source(f"dvc:{md5}@s3://b/p").url == "s3://b/p"
    pointer = tmp_path / "data.dvc"
    pointer.write_text(f"outs:\n- md5: {md5}.dir\n  path: data/raw\n")
    assert parse_source("dvc", pointer).md5 == md5
    with pytest.raises(InputError, match="not an md5"):
        parse_source("dvc:xyz")
    with pytest.raises(InputError, match="synthetic, dvc"):
        parse_source("ftp://host/x")


def test_the_parent_run_spans_the_pipeline_and_tasks_find_it_by_fingerprint(smoke_cfg, monkeypatch, tmp_path):
    """The fingerprint task opens the parent run and leaves it running; the last task (or `psamf
    pipeline run`, when that task came from the cache) ends it, so its duration is the pipeline's.
    A retry of a failed run nests under the same parent; a completed fingerprint starts anew."""
    import time

    import mlflow

    from psamf import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/t.db")
    parent = tracking.pipeline_run(smoke_cfg, "f" * 16, "a")
    assert tracking.pipeline_run(smoke_cfg, "f" * 16, "b") == parent  # a task finds its run from the fingerprint
    client = mlflow.MlflowClient()
    assert client.get_run(parent).info.status == "RUNNING" and client.get_run(parent).info.end_time is None
    time.sleep(0.3)  # the pipeline's tasks
    tracking.end_pipeline_runs(smoke_cfg, "f" * 16, "FAILED")
    assert client.get_run(parent).info.status == "FAILED"
    assert tracking.pipeline_run(smoke_cfg, "f" * 16, "retry") == parent  # a retry nests under it again
    assert client.get_run(parent).info.status == "RUNNING"
    tracking.end_pipeline_runs(smoke_cfg, "f" * 16, "FINISHED", cached_tasks=3)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.info.end_time - run.info.start_time >= 300
    assert run.data.tags["completed"] == "true" and run.data.tags["cached_tasks"] == "3"
    assert tracking.pipeline_run(smoke_cfg, "f" * 16, "c") != parent  # a new run of a completed fingerprint
    assert run.data.tags["pipeline_fingerprint"] == "f" * 16


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),      # 1.5 CPUs: two threads, the second half-busy
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),     # no limit: the affinity mask decides
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
])
def test_cpu_count_honours_the_cgroup_limit(tmp_path, files, expected):
    import os

    from psamf.resources import cpu_count

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cores = len(os.sched_getaffinity(0))
    assert cpu_count(tmp_path) == (cores if expected is None else min(cores, expected))
