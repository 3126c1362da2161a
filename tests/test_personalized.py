"""Personalized MulT stages on the smoke profile: the real training path, on CPU, in seconds."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from psamf.config import load_config
from psamf.data.ingest import ingest
from psamf.data.prepared import load_prepared
from psamf.data.synth import write_synthetic_corpus
from psamf.personalized import draw_support, finetune, loo, pretrain
from psamf.stats import mean_ci, paired_diff

REPO = Path(__file__).resolve().parents[1]


def smoke_overrides(root: Path) -> list[str]:
    return [f"data.raw_dir={root}/raw", f"data.prepared_dir={root}/prepared", f"pretrain.out_dir={root}/models",
            f"finetune.out_dir={root}/loo", f"text_features.cache_dir={root}/cache"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pmult")
    cfg = load_config(REPO / "params.yaml", "smoke", smoke_overrides(root))
    write_synthetic_corpus(cfg)
    ingest(cfg)
    return root, cfg


# ---- statistics ------------------------------------------------------------------------------

def test_mean_ci_matches_the_t_interval():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # sd = 1.5811, t(0.975, 4) = 2.7764 -> half width 1.9632
    assert ci["mean"] == 3.0 and ci["n"] == 5
    assert ci["lo"] == pytest.approx(3 - 1.9632, abs=1e-3) and ci["hi"] == pytest.approx(3 + 1.9632, abs=1e-3)
    one = mean_ci([0.7])
    assert one["lo"] == one["hi"] == 0.7
    d = paired_diff([1.0, 1.1, 0.9, 1.05], [0.5, 0.55, 0.45, 0.5])
    assert d["excludes_zero"] and d["lo"] > 0
    assert not paired_diff([1.0, 0.0, 1.0], [0.0, 1.0, 0.0])["excludes_zero"]


def test_support_draws_are_seeded_and_stratified_spans_the_range():
    labels = np.r_[np.full(40, 2.0), np.linspace(-3, 3, 10)]
    a = draw_support(labels, 5, np.random.default_rng([0, 1]), stratified=False)
    b = draw_support(labels, 5, np.random.default_rng([0, 1]), stratified=False)
    assert a.tolist() == b.tolist() and len(set(a)) == 5
    for r in range(5):
        s = draw_support(labels, 5, np.random.default_rng([0, r]), stratified=True)
        assert labels[s].min() < 0 < labels[s].max()  # uniform draws here are mostly 2.0s


# ---- training path ----------------------------------------------------------------------------

def _run_pretrain(root: Path, user: str, extra: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "psamf.cli", "pretrain", "--held-out", user, "--profile", "smoke"]
    for o in smoke_overrides(root) + extra:
        args += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(corpus, tmp_path):
    root, cfg = corpus
    user = load_prepared(cfg.data.prepared_path).loo_users(1)[0]
    extra = ["pretrain.epochs=5", "pretrain.patience=10"]
    # Uninterrupted reference, in its own model dir.
    ref = _run_pretrain(root, user, extra + [f"pretrain.out_dir={tmp_path}/ref"])
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    # Interrupted run: SIGKILL once the first epoch's checkpoint is on disk.
    killed_dir = tmp_path / "killed"
    proc = _run_pretrain(root, user, extra + [f"pretrain.out_dir={killed_dir}"])
    last = killed_dir / "synthetic" / user / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "synthetic" / user / "metrics.json").exists()
    again = _run_pretrain(root, user, extra + [f"pretrain.out_dir={killed_dir}"])
    assert again.wait(timeout=300) == 0, again.stderr.read()
    resumed = json.loads((killed_dir / "synthetic" / user / "metrics.json").read_text())
    reference = json.loads((tmp_path / "ref" / "synthetic" / user / "metrics.json").read_text())
    assert resumed["resumed_from_epoch"] >= 1
    assert resumed["history"] == reference["history"]  # bit-exact losses and metrics, every epoch
    assert resumed["best_valid_mae"] == reference["best_valid_mae"]


def test_kd_lambda_weights_the_label_loss(corpus):
    """λ=1 drops the distillation term, so FS-UA-KD must equal FS-UA exactly; the default
    λ=0.6 must not."""
    root, cfg = corpus
    user = load_prepared(cfg.data.prepared_path).loo_users(1)[0]
    pretrain(cfg, user)
    reports = {lam: finetune(load_config(REPO / "params.yaml", "smoke",
                                         smoke_overrides(root) + [f"finetune.kd_lambda={lam}"]), user, write=False)
               for lam in (1.0, 0.6)}
    for d in reports[1.0]["per_draw"]:
        assert d["fs_ua_kd"]["mae"] == pytest.approx(d["fs_ua"]["mae"], abs=1e-9)
    assert any(abs(d["fs_ua_kd"]["mae"] - d["fs_ua"]["mae"]) > 1e-6 for d in reports[0.6]["per_draw"])
    # Different draws pick different support sets.
    draws = reports[0.6]["per_draw"]
    assert len({tuple(d["support"]) for d in draws}) == len(draws)


def test_smoke_loo_writes_the_paper_tables(corpus):
    root, cfg = corpus
    summary = loo(cfg)
    assert len(summary["users"]) == cfg.data.loo_users
    assert set(summary["averages"]) == {"baseline", "fs_ua", "fs_ua_kd"}
    md = Path(summary["files"]["markdown"]).read_text()
    for needle in ("## FS-UA-KD", "**Average**", "Corpus: `synthetic`", "non0_acc2", summary["users"][0]):
        assert needle in md
    png = Path(summary["files"]["chart"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import pandas as pd
    table = pd.read_csv(summary["files"]["csv"])
    assert len(table) == 3 * cfg.data.loo_users
    assert (table["MAE_lo"] <= table["MAE"]).all() and (table["MAE"] <= table["MAE_hi"]).all()


def test_a_skipped_slot_is_one_marker_in_cli_and_kfp_that_the_report_passes_over(corpus, tmp_path, monkeypatch):
    """A rank slot at or beyond data.loo_users: the CLI (so dvc) and the KFP stages write the same
    marker, and loo_report, given it among the users' reports (dvc's glob, KFP's Collected), skips it."""
    import torch

    from psamf.orchestration import finetune_stage, pretrain_stage
    from psamf.personalized import is_skipped_slot, loo_report

    root, cfg = corpus
    rank = cfg.data.loo_users  # the first slot beyond K
    marker = {"skipped": True, "rank": rank, "loo_users": cfg.data.loo_users}
    args = [sys.executable, "-m", "psamf.cli", "finetune", "--rank", str(rank), "--profile", "smoke",
            "--params", str(REPO / "params.yaml")]
    for o in smoke_overrides(root) + [f"finetune.out_dir={tmp_path}/cli"]:
        args += ["--set", o]
    subprocess.run(args, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    cli = tmp_path / "cli" / "synthetic" / f"rank{rank}-skipped.json"
    assert json.loads(cli.read_text()) == marker

    monkeypatch.setenv("PSAMF_LOOP_THREADS", str(torch.get_num_threads()))  # leave this process's threads be
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "prepared").symlink_to(root / "prepared")
    (dataset / "cache").symlink_to(root / "cache")
    params = (REPO / "params.yaml").read_text()
    assert pretrain_stage("smoke", [], params, "", str(dataset), rank, str(tmp_path / "model")) is None
    assert json.loads((tmp_path / "model" / "synthetic" / f"rank{rank}-skipped.json").read_text()) == marker
    assert finetune_stage("smoke", [], params, "", str(dataset), rank, str(tmp_path / "model"),
                          str(tmp_path / "kfp.json")) is None
    assert json.loads((tmp_path / "kfp.json").read_text()) == marker and is_skipped_slot(marker)

    done = root / "loo" / "synthetic" / "loo_summary.json"  # test_smoke_loo_writes_the_paper_tables's
    users = json.loads(done.read_text())["users"] if done.is_file() else loo(cfg)["users"]
    files = [tmp_path / "kfp.json", *(root / "loo" / "synthetic" / f"{u}.json" for u in users), cli]
    assert loo_report(cfg, report_files=files, out_dir=tmp_path / "report")["users"] == users
