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
from corpora import smoke_corpus

from psamf.config import load_config
from psamf.data.prepared import load_prepared
from psamf.mult.finetune import _finetune_copy, draw_split, finetune
from psamf.mult.loo import loo
from psamf.mult.pretrain import pretrain
from psamf.stats import mean_ci, paired_diff

REPO = Path(__file__).resolve().parents[1]


def smoke_overrides(root: Path) -> list[str]:
    return [f"data.raw_dir={root}/raw", f"data.prepared_dir={root}/prepared", f"pretrain.out_dir={root}/models",
            f"finetune.out_dir={root}/loo", f"text_features.cache_dir={root}/cache"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pmult")
    cfg = smoke_corpus(smoke_overrides(root))
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
    a, ta = draw_split(labels, 5, np.random.default_rng([0, 1]), stratified=False)
    b, _ = draw_split(labels, 5, np.random.default_rng([0, 1]), stratified=False)
    assert a.tolist() == b.tolist() and len(set(a)) == 5
    assert sorted(a.tolist() + ta.tolist()) == list(range(len(labels)))
    spans = 0
    for r in range(5):
        s, t = draw_split(labels, 5, np.random.default_rng([0, r]), stratified=True)
        assert len(s) == 5 and not set(s) & set(t)
        spans += labels[s].min() < 0 < labels[s].max()  # uniform draws here are mostly 2.0s
    assert spans >= 4


def test_stratified_bins_never_see_a_test_label():
    """The bins are cut over the support pool alone: changing the test segments' labels changes
    neither the support set nor the test set."""
    rng_labels = np.random.default_rng(7)
    labels = rng_labels.uniform(-3, 3, 60)
    s, t = draw_split(labels, 5, np.random.default_rng([0, 3]), stratified=True, support_pool=0.5)
    assert len(t) == 30 and not set(s) & set(t)
    moved = labels.copy()
    moved[t] = np.where(moved[t] > 0, -3.0, 3.0)  # extreme test labels would stretch the bins
    s2, t2 = draw_split(moved, 5, np.random.default_rng([0, 3]), stratified=True, support_pool=0.5)
    assert s2.tolist() == s.tolist() and t2.tolist() == t.tolist()


def test_fine_tuning_never_swaps_the_user_for_unknown(corpus):
    """With finetune.dropout on, the model trains in train mode; the adapter's UNKNOWN swap must
    still be off, or about unknown_p of the 5 support samples lose the user's own token."""
    import dataclasses

    import torch

    from psamf.models.user_adapter import UNKNOWN
    from psamf.mult.pretrain import load_pretrained, mult_inputs, take

    root, cfg = corpus
    user = load_prepared(cfg.data.prepared_path).loo_users(1)[0]
    pretrain(cfg, user)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, dropout=True, epochs=4),
                              user_adapter=dataclasses.replace(cfg.user_adapter, unknown_p=0.9))
    ds, tensors, _ = mult_inputs(cfg)
    base, vocab = load_pretrained(cfg, user, tensors)
    seen: list[torch.Tensor] = []
    original = type(base.user_adapter.user_embedding["text"]).forward

    def spy(self, ids):
        seen.append(ids.clone())
        return original(self, ids)

    idx = np.flatnonzero(ds.segments["speaker_id"].to_numpy() == user)[:5]
    import unittest.mock as mock
    with mock.patch.object(type(base.user_adapter.user_embedding["text"]), "forward", spy):
        _finetune_copy(base, vocab, user, cfg, take(tensors, idx), None, seed=0)
    assert seen and all((ids != UNKNOWN).all() for ids in seen)


# ---- training path ----------------------------------------------------------------------------

def _run_pretrain(root: Path, user: str, extra: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "psamf.cli.main", "pretrain", "--held-out", user, "--profile", "smoke"]
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


@pytest.fixture(scope="module")
def loo_run(corpus):
    """The whole smoke LOO once (pretrain + finetune per user, then the report)."""
    return loo(corpus[1])


def test_smoke_loo_writes_the_paper_tables(corpus, loo_run):
    root, cfg = corpus
    summary = loo_run
    assert len(summary["users"]) == cfg.data.loo_users
    assert set(summary["averages"]) == {"baseline", "fs_ua", "fs_ua_kd"}
    md = Path(summary["files"]["markdown"]).read_text()
    for needle in ("## FS-UA-KD", "**Average**", "Corpus: `synthetic`", "non0_acc2", summary["users"][0]):
        assert needle in md
    png = Path(summary["files"]["chart"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(summary["files"]["html"]).read_text()  # the KFP UI's view: tables and the chart in one file
    assert page.count("<table>") == 3 and "data:image/png;base64," in page
    assert all(u in page for u in summary["users"])
    import pandas as pd
    table = pd.read_csv(summary["files"]["csv"])
    assert len(table) == 3 * cfg.data.loo_users
    assert (table["MAE_lo"] <= table["MAE"]).all() and (table["MAE"] <= table["MAE_hi"]).all()


def test_personalization_report_has_every_user_and_model_and_explains_each_nan(corpus, loo_run, tmp_path):
    """The report on the smoke LOO, with a PSA-MF predictions table from a stand-in predictor."""
    from html.parser import HTMLParser

    import pandas as pd

    from psamf.reports.personalization import MODELS, build

    root, cfg = corpus
    summary = loo_run
    ds = load_prepared(cfg.data.prepared_path)
    seg = ds.segments
    rng = np.random.default_rng(0)
    preds = seg[["segment_id", "speaker_id", "split", "label"]].assign(
        pred=seg["label"] + rng.normal(0, 0.5, len(seg)))
    # As train writes it: held-out splits only. The first LOO user is made held out with constant
    # predictions: its PSA-MF Corr is NaN and must say why.
    preds.loc[preds.speaker_id == summary["users"][0], ["split", "pred"]] = ["test", 0.5]
    preds = preds[preds.split != "train"]
    (tmp_path / "model").mkdir()
    preds.to_csv(tmp_path / "model" / "predictions.csv", index=False)

    rep = build(Path(summary["files"]["csv"]).with_name("loo_summary.json"), tmp_path / "model",
                tmp_path / "report")
    page = Path(rep["files"]["html"]).read_text()

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.cells, self.imgs, self._in = [], 0, False

        def handle_starttag(self, tag, attrs):
            self._in = tag == "td"
            self.imgs += tag == "img" and dict(attrs)["src"].startswith("data:image/png;base64,")

        def handle_data(self, data):
            if self._in:
                self.cells.append(data)

    p = Cells()
    p.feed(page)
    assert p.imgs == 2  # forest plot and per-user chart, embedded
    for u in summary["users"]:
        assert u in p.cells
    for label in MODELS.values():
        assert label in p.cells
    rows = rep["rows"]
    assert len(rows) == len(MODELS) * len(summary["users"])
    for r in rows:
        for m in ("MAE", "Corr", "Non0-Acc2"):
            assert r[m] is not None or r["note"], f"{r['user']}/{r['model']}: {m} is NaN with no explanation"
    first = next(r for r in rows if r["user"] == summary["users"][0] and r["model"] == "psamf")
    assert first["Corr"] is None and "constant" in first["note"]
    # A held-out user's PSA-MF score matches its rows of the predictions table; a user PSA-MF
    # trained on has none, and the row says so.
    for r in (r for r in rows if r["model"] == "psamf" and r["user"] != summary["users"][0]):
        sub = preds[preds.speaker_id == r["user"]]
        if sub.empty:
            assert r["MAE"] is None and "training fold" in r["note"]
        else:
            assert abs(r["MAE"] - (sub.pred - sub.label).abs().mean()) < 1e-9
            assert r["MAE_lo"] <= r["MAE"] <= r["MAE_hi"]
            assert (r["psamf_split"] == "valid") == ("best epoch" in r["note"])
    held_out_users = set(preds.speaker_id) & set(summary["users"])
    assert rep["users_scored"] == {**{m: len(summary["users"]) for m in MODELS}, "psamf": len(held_out_users)}
    kd = {k["user"]: k for k in rep["kd_gain"]}
    assert set(kd) == set(summary["users"])
    assert Path(rep["files"]["forest"]).read_bytes()[:4] == b"\x89PNG"
    assert "SIMULATED" in page or "synthetic" in page  # the data caveat is stated
    assert pd.read_csv(rep["files"]["csv"])["best"].sum() == len(summary["users"])


def test_report_without_a_psamf_model_says_so_per_row(loo_run, tmp_path):
    from psamf.reports.personalization import build

    summary = loo_run
    loo_json = Path(summary["files"]["csv"]).with_name("loo_summary.json")
    rep = build(loo_json, tmp_path / "nothing-here", tmp_path / "report")
    psamf_rows = [r for r in rep["rows"] if r["model"] == "psamf"]
    assert psamf_rows and all(r["MAE"] is None and "psamf train" in r["note"] for r in psamf_rows)
    cold = [r for r in rep["rows"] if r["model"] == "cold_start"]
    assert all(r["MAE"] is not None and r["MAE_lo"] <= r["MAE"] <= r["MAE_hi"] for r in cold)


def test_a_skipped_slot_is_one_marker_in_cli_and_kfp_that_the_report_passes_over(corpus, tmp_path, monkeypatch):
    """A rank slot at or beyond data.loo_users: the CLI (so dvc) and the KFP stages write the same
    marker, and loo_report, given it among the users' reports (dvc's glob, KFP's Collected), skips it."""
    import torch

    from psamf.stages import finetune_stage, pretrain_stage
    from psamf.mult.loo import is_skipped_slot, loo_report

    root, cfg = corpus
    rank = cfg.data.loo_users  # the first slot beyond K
    marker = {"skipped": True, "rank": rank, "loo_users": cfg.data.loo_users}
    args = [sys.executable, "-m", "psamf.cli.main", "finetune", "--rank", str(rank), "--profile", "smoke",
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


def test_select_chooses_the_knobs_on_selection_speakers_only(corpus, monkeypatch, tmp_path):
    """`psamf loo --select`: the knobs are scored on the selection speakers; the report speakers
    are neither scored nor in the selection's pretraining data. best_params.json feeds `loo`."""
    import json

    import torch

    import psamf.mult.select as sel
    from psamf.config import best_params_overrides
    from psamf.mult.select import select_finetune

    root, cfg = corpus
    ds = load_prepared(cfg.data.prepared_path)
    report_users = ds.loo_users(cfg.data.loo_users)
    scored: list[str] = []
    real = sel.finetune_draws

    def spy(c, user, inputs=None):
        scored.append(user)
        return real(c, user, inputs)

    monkeypatch.setattr(sel, "finetune_draws", spy)
    cfg = load_config(REPO / "params.yaml", "smoke", smoke_overrides(root) + [f"finetune.out_dir={tmp_path}/loo"])
    summary = select_finetune(cfg)
    users = summary["selection_users"]
    assert len(users) == cfg.data.selection_users and not set(users) & set(report_users)
    assert set(scored) == set(users) and len(scored) == len(users) * cfg.finetune.select_trials
    for u in users:  # each selection model was pretrained without the report speakers
        state = torch.load(Path(cfg.pretrain.out_dir) / "select" / cfg.data.corpus / u / "model.pt", weights_only=False)
        assert not set(state["users"]) & set(report_users + [u])
    best = json.loads(Path(summary["files"]["best_params"]).read_text())
    assert set(best) == {"finetune.epochs", "finetune.dropout", "finetune.kd_lambda", "finetune.lr_base",
                         "finetune.lr_adapter", "finetune.stratified"}
    chosen = load_config(REPO / "params.yaml", "smoke", best_params_overrides(summary["files"]["best_params"]))
    assert chosen.finetune.epochs == best["finetune.epochs"] and chosen.finetune.kd_lambda == best["finetune.kd_lambda"]
    trials = (Path(summary["files"]["trials"])).read_text().splitlines()
    assert len(trials) == 1 + cfg.finetune.select_trials


def test_the_personalization_page_renders_in_a_real_browser_without_console_messages(corpus, loo_run, tmp_path):
    """Headless Chromium (Debian's, which `make test` installs) opens the report page: every LOO user
    is in the rendered DOM, the page logs no console message (no script error, no resource it
    failed to load), and a screenshot is kept under the test's tmp dir."""
    import shutil
    import subprocess

    from psamf.reports.personalization import build

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium; `make test` installs it)")
    root, cfg = corpus
    summary = loo_run
    seg = load_prepared(cfg.data.prepared_path).segments
    preds = seg[["segment_id", "speaker_id", "split", "label"]].assign(pred=seg["label"] * 0.8)
    (tmp_path / "model").mkdir()
    preds[preds.split != "train"].to_csv(tmp_path / "model" / "predictions.csv", index=False)
    rep = build(Path(summary["files"]["csv"]).with_name("loo_summary.json"), tmp_path / "model", tmp_path / "report")
    url = Path(rep["files"]["html"]).resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", "--window-size=1400,2000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert all(u in dom.stdout for u in summary["users"]) and "<img" in dom.stdout
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    shot = tmp_path / "personalization.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=180, check=True)
    assert shot.read_bytes()[:4] == b"\x89PNG"
    print(f"screenshot: {shot}")

