"""The whole pipeline, end to end on the smoke profile, through `dvc repro` in a throwaway copy of
the repo: the same stages as the kfp.local run (tests/test_kfp_e2e.py) run through the CLI, the LOO
metrics are where `dvc metrics show` finds them, and a second `dvc repro` does nothing.
"""
from __future__ import annotations

import sys

import pytest

from bench.pipeline import prepare_dvc_repo
from tests.e2e import e2e_env, run_ok

pytestmark = pytest.mark.slow


def test_dvc_repro_runs_every_stage_then_is_a_no_op(tmp_path):
    repo = tmp_path / "repo"
    env = e2e_env(tmp_path)
    # copy of the checkout on the smoke profile, smoke corpus built and `dvc add`ed
    prepare_dvc_repo(repo, "smoke", lambda cmd, cwd: run_ok(cmd, cwd, env))
    dvc = [sys.executable, "-m", "dvc"]

    first = run_ok([*dvc, "repro"], repo, env, timeout=1200)
    for stage in ("ingest", "validate", "personality", "pretrain@0", "finetune@1", "loo_report", "tune",
                  "train", "register"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    assert (repo / "reports/register/psamf.json").is_file()
    assert "Running stage 'report'" in first.stdout
    assert "PSA-MF" in (repo / "reports/personalization/personalization.html").read_text()
    metrics = run_ok([*dvc, "metrics", "show", "--json"], repo, env).stdout
    assert "fs_ua_kd.MAE" in metrics and "kd_mae_gain" in metrics
    import json
    plots = json.loads(run_ok([*dvc, "plots", "show", "--json"], repo, env).stdout)["data"]
    curves = plots["psamf_training_curves"][0]["content"]["data"]["values"]
    assert curves and {"epoch", "valid_mae"} <= set(curves[0])  # one point per epoch
    assert plots["tune_trials"][0]["content"]["data"]["values"]

    second = run_ok([*dvc, "repro"], repo, env)
    assert "Running stage" not in second.stdout, second.stdout
    assert "up to date" in second.stdout.lower()
    status = run_ok([*dvc, "status"], repo, env).stdout
    assert "up to date" in status.lower(), status
