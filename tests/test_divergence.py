"""A training run that goes non-finite outside a tune trial ends with one line naming the stage,
the epoch and the settings most likely at fault, exit 1, and leaves nothing half-written (a
tune trial still fails alone and the study goes on: test_tune)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from corpora import smoke_corpus
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def test_fit_names_the_stage_epoch_and_suspects_and_drops_its_checkpoints(tmp_path):
    from psamf.metrics import DivergedError, NonFiniteError
    from psamf.training import fit

    model = nn.Linear(2, 1)
    data = {"x": torch.randn(8, 2), "label": torch.randn(8)}
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's predictions are NaN
            raise NonFiniteError("preds: 8 of 8 predictions are non-finite (the run diverged)")
        return {"valid_mae": 1.0 / len(calls)}

    ckpt = tmp_path / "ckpt"
    with pytest.raises(DivergedError) as e:
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
            lambda m, b: nn.functional.l1_loss(m(b["x"]).squeeze(-1), b["label"]), evaluate,
            epochs=4, batch_size=4, patience=5, seed=0, ckpt_dir=ckpt, desc="train[psamf]",
            suspects={"train.lr": 0.5, "psamf.aux_lambda": 3.0})
    assert str(e.value) == ("train[psamf]: the run diverged at epoch 2 of 4 (preds: 8 of 8 predictions are "
                            "non-finite (the run diverged)); settings most likely at fault: train.lr=0.5, "
                            "psamf.aux_lambda=3")
    assert isinstance(e.value, NonFiniteError)  # a tune trial catches it as before
    assert not ckpt.exists()  # epoch 1's checkpoint would only resume into the same divergence

    def nan_loss(m, b):
        return m(b["x"]).sum() * float("nan")

    with pytest.raises(DivergedError, match=r"^personality: the run diverged at epoch 1 of 4 \(the training "
                                            r"loss is nan\); settings most likely at fault: personality.lr=1e\+09$"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), data, nan_loss, evaluate, epochs=4, batch_size=4,
            patience=5, seed=0, desc="personality", suspects={"personality.lr": 1e9})


def test_a_diverged_pretrain_is_one_line_exit_1_and_leaves_nothing(tmp_path):
    from psamf.data.prepared import load_prepared

    overrides = [f"data.raw_dir={tmp_path}/raw", f"data.prepared_dir={tmp_path}/prepared",
                 f"pretrain.out_dir={tmp_path}/models", f"text_features.cache_dir={tmp_path}/cache",
                 "synth.n_speakers=4", "data.loo_users=1", "data.min_user_segments=1"]
    cfg = smoke_corpus(overrides)
    user = load_prepared(cfg.data.prepared_path).loo_users(1)[0]
    args = [sys.executable, "-m", "psamf.cli.main", "pretrain", "--held-out", user, "--profile", "smoke",
            "--params", str(REPO / "params.yaml")]
    for o in [*overrides, "pretrain.lr=1e30", "pretrain.epochs=3"]:
        args += ["--set", o]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PSAMF_TRACKING": "off"})
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("psamf: error:")]
    assert lines == [f"psamf: error: pretrain[{user}]: the run diverged at epoch 1 of 3 (the training loss is nan); "
                     "settings most likely at fault: pretrain.lr=1e+30, pretrain.grad_clip=0.8"], run.stderr[-3000:]
    models = tmp_path / "models"
    left = [p for p in models.rglob("*")] if models.exists() else []
    assert not [p for p in left if p.is_file()], left  # no model.pt, metrics.json, checkpoint or temp file
