"""The whole pipeline, end to end on the smoke profile, through kfp.local (SubprocessRunner, the
README's main command on another profile): every stage runs, every stage's MLflow run nests under
the pipeline run its fingerprint names, and it ends with a champion; a second run on the same code,
data and params is served task by task from kfp.local's cache (as KFP's cache does on a cluster),
and a change of params runs again. tests/test_dvc_e2e.py does the same through `dvc repro`.

It runs in its own temp dir: nothing lands in the checkout.
"""
from __future__ import annotations

import pytest

from bench.pipeline import BIN, REPO
from tests.e2e import e2e_env, mlflow_runs, run_ok, task_lines

pytestmark = pytest.mark.slow


def test_kfp_local_runs_the_whole_pipeline_and_ends_with_a_champion(tmp_path):
    env = {**e2e_env(tmp_path), "PSAMF_PARAMS": str(REPO / "params.yaml")}
    first = run_ok([str(BIN / "psamf"), "pipeline", "run", "--profile", "smoke", "--root", str(tmp_path / "kfp")],
                 tmp_path, env)
    # A line per task on the terminal, kfp.local's full output in a log beside the task outputs.
    done = task_lines(first.stderr)
    assert len(done) >= 13 and all(how == "success" for _, how in done), first.stderr[-3000:]
    assert "executor_input" not in first.stdout + first.stderr
    assert "Executing task" in (tmp_path / "kfp" / "pipeline.log").read_text()

    client, runs = mlflow_runs(tmp_path)
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
    again = run_ok([str(BIN / "psamf"), "pipeline", "run", "--profile", "smoke", "--root", str(tmp_path / "kfp")],
                 tmp_path, env)
    lines = task_lines(again.stderr)
    # every task but the fingerprint is served (a task line of the first run can be garbled by a
    # task's own progress output, so its count is a lower bound, not the DAG's size)
    assert len(lines) >= len(done) and len(lines) >= 13, again.stderr[-3000:]
    assert [t for t, how in lines if how != "cached"] == ["fingerprint"], lines
    client, runs = mlflow_runs(tmp_path)
    assert len([r for r in runs if r.data.tags.get("stage") == "ingest"]) == 1  # nothing retrained
    assert len(client.search_model_versions("name = 'psamf-psamf'")) == 1
    second = [r for r in runs if r.data.tags.get("stage") == "pipeline" and r.info.run_id != parent]
    assert len(second) == 1 and second[0].info.status == "FINISHED"  # ended, though its last task was cached
    assert second[0].data.tags["cached_tasks"] == str(len(lines) - 1)

    # A change of params misses the cache: the tasks that read it run again.
    changed = run_ok([str(BIN / "psamf"), "pipeline", "run", "--profile", "smoke", "--set", "train.epochs=2",
                    "--root", str(tmp_path / "kfp")], tmp_path, env)
    ran = task_lines(changed.stderr)
    assert {"ingest", "train", "register"} <= {t for t, how in ran if how == "success"}, changed.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path)
    final = [r for r in runs if r.data.tags.get("stage") == "train" and not r.data.tags.get("trial")]
    assert len(final) == 2  # one final train per run that trained (tune trials are train runs too)
