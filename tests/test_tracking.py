"""Tracking: nested runs, tags, params and per-epoch metrics land in the MLflow store."""
from __future__ import annotations

from psamf import tracking


def test_stage_runs_nest_and_carry_tags_params_and_steps(smoke_cfg, monkeypatch, tmp_path):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/t.db")
    monkeypatch.setenv("PSAMF_ARTIFACT_ROOT", str(tmp_path / "art"))
    report = tmp_path / "r.md"
    report.write_text("# report\n")
    with tracking.stage_run(smoke_cfg, "loo", tags={"av_simulated": True}) as parent:
        with tracking.stage_run(smoke_cfg, "pretrain", "pretrain[u1]", {"loo_user": "u1"}) as child:
            cb = tracking.epoch_logger()
            for epoch, mae in enumerate([1.0, 0.8, 0.7]):
                cb(epoch, {"valid_mae": mae, "bad": float("nan")})
        tracking.log_artifact(report, "reports")
    client = mlflow.MlflowClient()
    c = client.get_run(child.info.run_id)
    assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
    for tag in ("corpus", "profile", "git_commit", "data_hash", "stage"):
        assert tag in c.data.tags
    assert c.data.tags["stage"] == "pretrain" and c.data.tags["loo_user"] == "u1"
    assert c.data.params["mult.d_model"] == str(smoke_cfg.mult.d_model)
    hist = client.get_metric_history(child.info.run_id, "valid_mae")
    assert [(m.step, m.value) for m in hist] == [(0, 1.0), (1, 0.8), (2, 0.7)]
    assert "bad" not in c.data.metrics  # NaN is dropped, not logged as a broken point
    p = client.get_run(parent.info.run_id)
    assert p.data.tags["av_simulated"] == "true"
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "reports")] == ["reports/r.md"]
    assert (tmp_path / "art").exists()


def test_parent_run_from_environment(smoke_cfg, monkeypatch, tmp_path):
    """A stage run in its own process (DVC/KFP) nests under $PSAMF_PARENT_RUN_ID."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/t.db")
    with tracking.stage_run(smoke_cfg, "pipeline") as parent:
        pid = parent.info.run_id
    monkeypatch.setenv(tracking.PARENT_ENV, pid)
    with tracking.stage_run(smoke_cfg, "ingest") as child:
        pass
    assert mlflow.MlflowClient().get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == pid


def test_tracking_off_is_a_no_op(smoke_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("PSAMF_TRACKING", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/t.db")
    with tracking.stage_run(smoke_cfg, "x"):
        tracking.log_metrics({"a": 1.0})
    assert not (tmp_path / "t.db").exists()


def test_training_stages_log_system_metrics_and_the_env_turns_them_off(smoke_cfg, monkeypatch, tmp_path):
    import time

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/t.db")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with tracking.stage_run(smoke_cfg, "train") as trained:
        time.sleep(1.5)
    with tracking.stage_run(smoke_cfg, "ingest") as ingested:  # not a training stage
        time.sleep(0.5)
    monkeypatch.setenv(tracking.SYSTEM_METRICS_ENV, "false")
    with tracking.stage_run(smoke_cfg, "pretrain") as off:
        time.sleep(0.5)
    client = mlflow.MlflowClient()
    system = lambda run: [k for k in client.get_run(run.info.run_id).data.metrics if k.startswith("system/")]  # noqa: E731
    assert "system/cpu_utilization_percentage" in system(trained)
    assert system(ingested) == [] and system(off) == []


def test_the_experiment_opens_on_training_runs_and_training_runs_log_their_input(smoke_cfg, monkeypatch, tmp_path):
    """MLflow 3's UI picks an experiment's view from the tag mlflow.experimentKind (none: the GenAI
    traces view); a training run's Dataset column is its logged input, the prepared data."""
    import mlflow

    from psamf.data.ingest import ingest
    from psamf.data.synth import write_synthetic_corpus

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/t.db")
    monkeypatch.setenv(tracking.SYSTEM_METRICS_ENV, "false")
    monkeypatch.setenv("PSAMF_TRACKING", "off")
    write_synthetic_corpus(smoke_cfg)
    ingest(smoke_cfg)
    monkeypatch.delenv("PSAMF_TRACKING")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/t.db")
    client = mlflow.MlflowClient()
    client.create_experiment(smoke_cfg.tracking.experiment)  # one made before psamf set the kind gets it too
    with tracking.stage_run(smoke_cfg, "train") as trained:
        pass
    with tracking.stage_run(smoke_cfg, "ingest") as ingested:
        pass
    exp = client.get_experiment_by_name(smoke_cfg.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (inp,) = client.get_run(trained.info.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "synthetic-prepared"
    assert inp.dataset.digest == tracking.prepared_digest(smoke_cfg.data.prepared_path)
    assert [t.value for t in inp.tags if t.key == "mlflow.data.context"] == ["training"]
    assert client.get_run(ingested.info.run_id).inputs.dataset_inputs == []
