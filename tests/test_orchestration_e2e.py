"""The whole pipeline, end to end on the smoke profile, through both orchestrators:

- kfp.local (SubprocessRunner, the README's main command on another profile): every stage runs,
  every stage's MLflow run nests under the pipeline run its fingerprint names, and it ends with
  a champion; a second run on the same code, data and params is served task by task from
  kfp.local's cache (as KFP's cache does on a cluster), and a change of params runs again.
- `dvc repro` in a throwaway copy of the repo: the same stages run through the CLI, the LOO
  metrics are where `dvc metrics show` finds them, and a second `dvc repro` does nothing.

Each runs in its own temp dir: nothing lands in the checkout.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.pipeline import BIN, REPO, env_for, prepare_dvc_repo

pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict[str, str]:
    return {**env_for(tmp), "PSAMF_TRACKING": "on"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _tasks(stderr: str) -> list[tuple[str, str]]:
    """Every `[ 3] train          cached      0.0 s` line -> ("train", "cached"), found anywhere in
    the output: a task process's own stderr (progress bars) can share a line with ours."""
    import re

    return re.findall(r"\[\s*\d+\] (\S+)\s+(success|failed|cached)\s+[\d.]+ s", stderr)


def _runs(tmp: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlruns.db")
    exp = client.get_experiment_by_name("psamf")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_kfp_local_runs_the_whole_pipeline_and_ends_with_a_champion(tmp_path):
    env = {**_env(tmp_path), "PSAMF_PARAMS": str(REPO / "params.yaml")}
    first = _run([str(BIN / "psamf"), "pipeline", "run", "--profile", "smoke", "--root", str(tmp_path / "kfp")],
                 tmp_path, env)
    # A line per task on the terminal, kfp.local's full output in a log beside the task outputs.
    done = _tasks(first.stderr)
    assert len(done) >= 13 and all(how == "success" for _, how in done), first.stderr[-3000:]
    assert "executor_input" not in first.stdout + first.stderr
    assert "Executing task" in (tmp_path / "kfp" / "pipeline.log").read_text()

    client, runs = _runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1, [r.data.tags for r in parents]
    parent = parents[0].info.run_id
    assert client.get_run(parent).data.tags["completed"] == "true"  # the report task, the last, marked it done
    stages = {}
    for r in runs:
        stages.setdefault(r.data.tags.get("stage"), []).append(r)
    for stage, n in {"ingest": 1, "validate": 1, "personality": 1, "pretrain": 2, "finetune": 2, "loo": 1,
                     "tune": 2, "register": 1, "report": 1}.items():  # tune: the worker's run and the report's
        got = stages.get(stage, [])
        assert len(got) == n, (stage, len(got))
        assert all(r.data.tags.get("mlflow.parentRunId") == parent for r in got), stage  # nested in the pipeline
    trials = stages.get("tune-trial", [])
    worker = [r.info.run_id for r in stages["tune"] if r.data.tags.get("join") == "true"]
    assert len(trials) == 2 and {t.data.tags["mlflow.parentRunId"] for t in trials} == set(worker)
    # the LOO report went to MLflow: averages + tables + chart
    loo = stages["loo"][0]
    assert "fs_ua_kd_MAE" in loo.data.metrics
    arts = {a.path for a in client.list_artifacts(loo.info.run_id, "loo_report")}
    assert {"loo_report/loo_chart.png", "loo_report/loo_table.csv"} <= arts

    assert "plotly" in next((tmp_path / "kfp").glob("*/tune-report/plots")).read_text()  # KFP HTML output
    # The personalization report: on the parent run, and a KFP HTML output whose page names every LOO user.
    assert "personalization/personalization.html" in {a.path for a in client.list_artifacts(parent, "personalization")}
    pages = list((tmp_path / "kfp").glob("*/report/page"))
    assert len(pages) == 1, pages
    page = pages[0].read_text()
    import json
    users = json.loads((pages[0].parent / "files" / "personalization.json").read_text())["users"]
    assert len(users) == 2 and all(u in page for u in users)  # smoke: data.loo_users = 2
    assert "FS-UA-KD" in page and "PSA-MF" in page and "Cold start" in page

    champ = client.get_model_version_by_alias("psamf-psamf", "champion")
    assert str(champ.version) == "1" and champ.tags["gate.verdict"] == "first"

    # The parent run spans the pipeline: opened by the first task, ended after the last.
    p = client.get_run(parent).info
    assert p.status == "FINISHED" and p.start_time <= min(r.info.start_time for r in runs if r.info.run_id != parent)
    assert p.end_time >= max(r.info.end_time for r in runs if r.info.run_id != parent and r.info.end_time)

    # The same code, data and params again: kfp.local's cache serves every task but the fingerprint.
    again = _run([str(BIN / "psamf"), "pipeline", "run", "--profile", "smoke", "--root", str(tmp_path / "kfp")],
                 tmp_path, env)
    lines = _tasks(again.stderr)
    # every task but the fingerprint is served (a task line of the first run can be garbled by a
    # task's own progress output, so its count is a lower bound, not the DAG's size)
    assert len(lines) >= len(done) and len(lines) >= 13, again.stderr[-3000:]
    assert [t for t, how in lines if how != "cached"] == ["fingerprint"], lines
    client, runs = _runs(tmp_path)
    assert len([r for r in runs if r.data.tags.get("stage") == "ingest"]) == 1  # nothing retrained
    assert len(client.search_model_versions("name = 'psamf-psamf'")) == 1
    second = [r for r in runs if r.data.tags.get("stage") == "pipeline" and r.info.run_id != parent]
    assert len(second) == 1 and second[0].info.status == "FINISHED"  # ended, though its last task was cached
    assert second[0].data.tags["cached_tasks"] == str(len(lines) - 1)

    # A change of params misses the cache: the tasks that read it run again.
    changed = _run([str(BIN / "psamf"), "pipeline", "run", "--profile", "smoke", "--set", "train.epochs=2",
                    "--root", str(tmp_path / "kfp")], tmp_path, env)
    ran = _tasks(changed.stderr)
    assert {"ingest", "train", "register"} <= {t for t, how in ran if how == "success"}, changed.stderr[-3000:]
    client, runs = _runs(tmp_path)
    final = [r for r in runs if r.data.tags.get("stage") == "train" and not r.data.tags.get("trial")]
    assert len(final) == 2  # one final train per run that trained (tune trials are train runs too)


def test_dvc_repro_runs_every_stage_then_is_a_no_op(tmp_path):
    repo = tmp_path / "repo"
    env = _env(tmp_path)
    # copy of the checkout on the smoke profile, smoke corpus built and `dvc add`ed
    prepare_dvc_repo(repo, "smoke", lambda cmd, cwd: _run(cmd, cwd, env))
    dvc = [sys.executable, "-m", "dvc"]

    first = _run([*dvc, "repro"], repo, env, timeout=1200)
    for stage in ("ingest", "validate", "personality", "pretrain@0", "finetune@1", "loo_report", "tune",
                  "train", "register"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    assert (repo / "reports/register/psamf.json").is_file()
    assert "Running stage 'report'" in first.stdout
    assert "PSA-MF" in (repo / "reports/personalization/personalization.html").read_text()
    metrics = _run([*dvc, "metrics", "show", "--json"], repo, env).stdout
    assert "fs_ua_kd.MAE" in metrics and "kd_mae_gain" in metrics
    import json
    plots = json.loads(_run([*dvc, "plots", "show", "--json"], repo, env).stdout)["data"]
    curves = plots["psamf_training_curves"][0]["content"]["data"]["values"]
    assert curves and {"epoch", "valid_mae"} <= set(curves[0])  # one point per epoch
    assert plots["tune_trials"][0]["content"]["data"]["values"]

    second = _run([*dvc, "repro"], repo, env)
    assert "Running stage" not in second.stdout, second.stdout
    assert "up to date" in second.stdout.lower()
    status = _run([*dvc, "status"], repo, env).stdout
    assert "up to date" in status.lower(), status
