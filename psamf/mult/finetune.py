"""Personalized MulT, step 2: per-user few-shot fine-tuning over R seeded support draws.

    finetune(cfg, user)  R draws of a k-shot support set from the user's segments; the rest is the
                         user's test set. Per draw:
                           baseline  the pretrained model as is (user unseen -> UNKNOWN token)
                           fs_ua     fine-tuned, lr_base for MulT, lr_adapter for the adapter
                           fs_ua_kd  same, loss (1-λ)·L1(ŷ, y_old) + λ·L1(ŷ, y),
                                     y_old from the frozen pretrained model

The paper blamed its mixed results on biased 5-shot draws; repeating the draw R times and
reporting per-user means with 95% CIs is how we answer that.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from psamf import tracking
from psamf.config import Config
from psamf.errors import InputError
from psamf.io import write_json
from psamf.metrics import DivergedError, NonFiniteError, regression_metrics
from psamf.models.mult import MulT
from psamf.models.user_adapter import UserVocab
from psamf.mult import VARIANTS
from psamf.mult.pretrain import check_user, forward, load_pretrained, mult_inputs, take
from psamf.stats import bootstrap_ci, mean_ci, paired_diff
from psamf.training import Batch, predict


def draw_split(labels: np.ndarray, k: int, rng: np.random.Generator, stratified: bool,
               support_pool: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(support, test): indices (into labels) of a k-shot support set and of the test set.

    uniform: k segments at random; the test set is all the others.
    stratified: first a support pool, `support_pool` of the segments at random (at least k, and
    at least one left over); its label range [min, max] is cut into k equal-width bins and one
    sample is taken from each non-empty bin (topped up at random from the pool), so the support
    set spans the range instead of piling up where labels are dense. Only the pool's labels
    are looked at, and the test set is the segments outside the pool: the binning never sees a
    test label, and the leftovers of the pool (whose labels steered the choice) are not scored.
    """
    n = len(labels)
    if not stratified:
        support = np.sort(rng.choice(n, size=k, replace=False))
        return support, np.setdiff1d(np.arange(n), support)
    n_pool = min(max(k, int(round(support_pool * n))), n - 1)
    pool = rng.permutation(n)[:n_pool]
    pl = labels[pool]
    edges = np.linspace(pl.min(), pl.max(), k + 1)
    bin_of = np.clip(np.searchsorted(edges, pl, side="right") - 1, 0, k - 1)
    chosen = [int(rng.choice(np.flatnonzero(bin_of == b))) for b in range(k) if (bin_of == b).any()]
    rest = np.setdiff1d(np.arange(n_pool), chosen)
    chosen += rng.choice(rest, size=k - len(chosen), replace=False).tolist()
    return np.sort(pool[chosen]), np.setdiff1d(np.arange(n), pool)


def _finetune_copy(base: MulT, vocab: UserVocab, user: str, cfg: Config, support: Batch,
                   teacher_pred: torch.Tensor | None, seed: int) -> tuple[MulT, int]:
    """Fine-tune a copy of `base` on the support set; KD when teacher_pred is given."""
    fc = cfg.finetune
    model = copy.deepcopy(base)
    v = UserVocab.from_list(vocab.to_list())
    row = v.add(user)
    if model.user_adapter is not None:
        model.user_adapter.grow(len(v))
        # The UNKNOWN swap is pretraining's device for a cold-start row; with finetune.dropout on
        # it would replace the user's own token on about unknown_p of the k support samples.
        model.user_adapter.unknown_p = 0.0
    batch = dict(support, user=torch.full((len(support["label"]),), row, dtype=torch.long))
    opt = torch.optim.Adam(model.param_groups(fc.lr_base, fc.lr_adapter), fused=True)
    torch.manual_seed(seed)
    # Dropout off by default: with 5 samples in one full batch, dropout noise dominates the
    # gradient and Adam (which normalizes step size) turns it into a random walk of every
    # weight; measured on the demo corpus it cost 0.06-0.19 MAE. `finetune.dropout` restores it.
    model.train(fc.dropout)
    for _ in range(fc.epochs):  # 5 samples: one full batch per step, a fixed number of steps
        opt.zero_grad(set_to_none=True)
        pred = forward(model, batch)
        loss = nn.functional.l1_loss(pred, batch["label"])
        if teacher_pred is not None:
            loss = (1 - fc.kd_lambda) * nn.functional.l1_loss(pred, teacher_pred) + fc.kd_lambda * loss
        loss.backward()
        opt.step()
    return model.eval(), row


def finetune(cfg: Config, user: str, write: bool = True, report_path: str | Path | None = None) -> dict[str, Any]:
    """baseline / FS-UA / FS-UA-KD on R seeded support draws for one held-out user.

    One `finetune` MLflow run spans the work (its duration is the stage's compute): per-draw
    metrics with step = draw, the means, and the report JSON, written to `report_path` (default
    <finetune.out_dir>/<corpus>/<user>.json; nothing is written with write=False)."""
    fc = cfg.finetune
    with tracking.stage_run(cfg, "finetune", f"finetune[{user}]", {"loo_user": user}):
        report = finetune_draws(cfg, user)
        tracking.set_tags({"av_simulated": report["av_simulated"], "text_features": report["text_features"]})
        for r, d in enumerate(report["per_draw"]):
            tracking.log_metrics({f"{v}_{k}": d[v][k] for v in VARIANTS for k in ("mae", "non0_acc2")}, step=r)
        tracking.log_metrics({f"{v}_{k}_mean": report["summary"][v][k]["mean"] for v in VARIANTS
                              for k in report["summary"][v]})
        tracking.log_metrics({f"{k}_mean": d["mean"] for k, d in report["paired"].items()})
        tracking.log_metrics({f"cold_start_{k}": d["mean"] for k, d in report["cold_start"].items()})
        if write or report_path is not None:
            path = write_json(report_path or Path(fc.out_dir) / cfg.data.corpus / f"{user}.json", report)
            tracking.log_artifact(path, "loo")
    return report


def finetune_draws(cfg: Config, user: str, inputs=None) -> dict[str, Any]:
    """The R draws for one user, untracked (finetune's body); `inputs`: mult_inputs(cfg), when
    the caller has them already (loo --select scores many settings on the same data)."""
    fc = cfg.finetune
    ds, tensors, source = inputs or mult_inputs(cfg)
    check_user(ds, user)
    base, vocab = load_pretrained(cfg, user, tensors)
    idx = np.flatnonzero(ds.segments["speaker_id"].to_numpy() == user)
    if len(idx) <= fc.k_shot:
        raise InputError("--user", f"speaker {user!r} has {len(idx)} segments; need more than k_shot={fc.k_shot}")
    labels = tensors["label"][idx].numpy()
    draws: list[dict[str, Any]] = []
    unknown = torch.zeros(len(idx), dtype=torch.long)
    with torch.no_grad():
        teacher_all = torch.from_numpy(predict(base, take(tensors, idx, unknown), forward))
    for r in tqdm(range(fc.draws), desc=f"finetune[{user}]", unit="draw", leave=False):
        rng = np.random.default_rng([fc.seed, r])
        s, t = draw_split(labels, fc.k_shot, rng, fc.stratified, fc.support_pool)
        support = take(tensors, idx[s])
        preds = {"baseline": teacher_all[t].numpy()}
        for variant, kd in (("fs_ua", None), ("fs_ua_kd", teacher_all[s])):
            model, row = _finetune_copy(base, vocab, user, cfg, support, kd, seed=fc.seed * 1000 + r)
            test = take(tensors, idx[t], torch.full((len(t),), row, dtype=torch.long))
            preds[variant] = predict(model, test, forward)
        y = labels[t]
        try:
            scored = {v: regression_metrics(preds[v], y) for v in VARIANTS}
        except NonFiniteError as e:
            raise DivergedError(f"finetune[{user}]", f"on support draw {r + 1} of {fc.draws}", str(e),
                                {"finetune.lr_base": fc.lr_base, "finetune.lr_adapter": fc.lr_adapter,
                                 "finetune.kd_lambda": fc.kd_lambda, "finetune.epochs": fc.epochs}) from None
        draws.append({"draw": r, "support": ds.segments["segment_id"].iloc[idx[s]].tolist(),
                      "n_test": len(t), **scored})
    summary = {v: {k: mean_ci([d[v][k] for d in draws]) for k in draws[0][v]} for v in VARIANTS}
    paired = {f"{v}_vs_baseline_mae": paired_diff([d["baseline"]["mae"] for d in draws], [d[v]["mae"] for d in draws])
              for v in ("fs_ua", "fs_ua_kd")}
    # Cold start: what the user gets before giving any labels (the unknown-user row on all of
    # their segments); one prediction per segment, so its CI is a bootstrap over segments.
    cold_start = bootstrap_ci(teacher_all.numpy(), labels, seed=fc.seed)
    return {"user": user, "corpus": cfg.data.corpus, "av_simulated": ds.av_simulated, "text_features": source,
            "k_shot": fc.k_shot, "draws": fc.draws, "stratified": fc.stratified, "kd_lambda": fc.kd_lambda,
            "n_segments": int(len(idx)), "summary": summary, "paired": paired, "cold_start": cold_start,
            "per_draw": draws}
