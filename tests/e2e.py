"""Helpers of the end-to-end tests (tests/test_kfp_e2e.py, tests/test_dvc_e2e.py)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from bench.pipeline import env_for


def e2e_env(tmp: Path) -> dict[str, str]:
    return {**env_for(tmp), "PSAMF_TRACKING": "on"}


def run_ok(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def task_lines(stderr: str) -> list[tuple[str, str]]:
    """Every `[ 3] train          cached      0.0 s` line -> ("train", "cached"), found anywhere in
    the output: a task process's own stderr (progress bars) can share a line with ours."""
    import re

    return re.findall(r"\[\s*\d+\] (\S+)\s+(success|failed|cached)\s+[\d.]+ s", stderr)


def mlflow_runs(tmp: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlruns.db")
    exp = client.get_experiment_by_name("psamf")
    return client, client.search_runs([exp.experiment_id], max_results=1000)
