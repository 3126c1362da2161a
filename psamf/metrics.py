"""Sentiment regression metrics in every convention the papers we compare with use.

Papers that report "Acc2" and "F1" on CMU-MOSI do not mean the same thing by them
(DESIGN.md, "Metric conventions"), so we log all of them under distinct keys and let
reports print `CONVENTIONS` next to the numbers:

- mae, corr                 mean |p - t|; Pearson r (nan when either side is constant).
- acc7, acc5                round(clip(p, +-3 | +-2)) == round(clip(t, ...)) over all samples.
- has0_acc2, has0_f1        MMSA: t >= 0 vs p >= 0 over all samples (t == 0 counts positive).
- non0_acc2, non0_f1        MMSA, the usual headline: drop t == 0, then t > 0 vs p > 0.
- mult_acc2, mult_f1        MulT repo: the non0 subset, but f1_score(preds, truth): the
                            predictions are passed as y_true, so the "weighted" average
                            weights by predicted-class support instead of true-class support.

Rounding at .5: we use np.round, which rounds half to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2,
-0.5 -> -0). This is what both MMSA and the MulT repo do, so our Acc7/Acc5 match theirs
bit for bit; "round half away from zero" would disagree on exact-.5 values, and MOSI labels
are averages of annotator scores that do land on .5 (e.g. 0.5, -1.5, 2.5).

Note on the MulT repo: `eval_mosi`'s own default is exclude_zero=False, but its train.py calls
it with exclude_zero=True, so the published MulT numbers drop t == 0 samples: the Non0 subset.
`mult_*` computes that subset with the repo's F1 argument swap, the part that changes published
F1 numbers.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error

from psamf.errors import StageFailed

CONVENTIONS: dict[str, str] = {
    "mae": "mean |p - t| over all samples",
    "corr": "Pearson r between p and t over all samples (nan if either is constant)",
    "acc7": "round(clip(p,-3,3)) == round(clip(t,-3,3)), all samples; np.round (half to even)",
    "acc5": "round(clip(p,-2,2)) == round(clip(t,-2,2)), all samples; np.round (half to even)",
    "has0_acc2": "MMSA Has0: accuracy of p >= 0 vs t >= 0 over all samples (t = 0 is positive)",
    "has0_f1": "MMSA Has0: weighted F1 of p >= 0 vs t >= 0, f1_score(y_true=t, y_pred=p)",
    "non0_acc2": "MMSA Non0 (headline): accuracy of p > 0 vs t > 0 over samples with t != 0",
    "non0_f1": "MMSA Non0: weighted F1 of p > 0 vs t > 0 over t != 0, f1_score(y_true=t, y_pred=p)",
    "mult_acc2": "MulT repo: accuracy of p > 0 vs t > 0 over samples with t != 0 (= non0_acc2)",
    "mult_f1": "MulT repo: weighted F1 over t != 0 with arguments swapped, f1_score(y_true=p, y_pred=t)",
}

METRIC_KEYS = tuple(CONVENTIONS)


class NonFiniteError(ValueError):
    """A model produced NaN/inf predictions (a diverged run): a result, not a bug to crash on."""


class DivergedError(NonFiniteError, StageFailed):
    """A training run went non-finite outside a tune trial (a trial catches NonFiniteError and
    fails alone): one line naming the stage, when, and the settings most likely at fault, which
    the CLI prints before it exits 1."""

    def __init__(self, stage: str, when: str, reason: str, suspects: dict[str, Any]):
        self.stage, self.when, self.reason, self.suspects = stage, when, reason, dict(suspects)
        at_fault = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in suspects.items())
        super().__init__(f"{stage}: the run diverged {when} ({reason})"
                         + (f"; settings most likely at fault: {at_fault}" if at_fault else ""))


def check_finite_preds(x, name: str = "preds") -> None:
    """Raise NonFiniteError when predictions hold NaN/inf (any shape): the run diverged."""
    a = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name}: {int(np.sum(~np.isfinite(a)))} of {a.size} predictions are non-finite")


def _as_1d(x, name: str) -> np.ndarray:
    # Accept numpy, lists and torch tensors (anything with .detach) without importing torch here.
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        bad = int(np.sum(~np.isfinite(a)))
        if name == "preds":
            raise NonFiniteError(f"{name}: {bad} of {a.size} predictions are non-finite (the run diverged)")
        raise ValueError(f"{name} has {bad} non-finite value(s)")
    return a


def multiclass_acc(preds: np.ndarray, labels: np.ndarray, bound: float) -> float:
    """Acc over the 2*bound+1 integer classes: clip to [-bound, bound], then np.round."""
    p = np.round(np.clip(preds, -bound, bound))
    t = np.round(np.clip(labels, -bound, bound))
    return float(np.mean(p == t))


def pearson_r(preds: np.ndarray, labels: np.ndarray) -> float:
    """Pearson r; nan (not a crash, not a RuntimeWarning) when either side has zero variance."""
    if len(preds) < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return float("nan")
    return float(np.corrcoef(preds, labels)[0, 1])


def _weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # zero_division=0: a class that is never predicted gets F1 0 instead of a warning; with
    # average='weighted' a class absent from y_true has weight 0 anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on single-class inputs; the value is still defined
        return float(f1_score(y_true, y_pred, average="weighted", zero_division=0))


def regression_metrics(preds, labels) -> dict[str, float]:
    """All metrics in CONVENTIONS for sentiment scores in [-3, 3]; values are fractions, not %."""
    p = _as_1d(preds, "preds")
    t = _as_1d(labels, "labels")
    if p.shape != t.shape:
        raise ValueError(f"preds has {p.size} values but labels has {t.size}")
    if p.size == 0:
        raise ValueError("no samples to score")

    out: dict[str, float] = {
        "mae": float(mean_absolute_error(t, p)),
        "corr": pearson_r(p, t),
        "acc7": multiclass_acc(p, t, 3.0),
        "acc5": multiclass_acc(p, t, 2.0),
    }

    # Has0 (MMSA): zero-labelled samples are kept and count as positive.
    has0_t, has0_p = t >= 0, p >= 0
    out["has0_acc2"] = float(accuracy_score(has0_t, has0_p))
    out["has0_f1"] = _weighted_f1(has0_t, has0_p)

    # Non0 (MMSA) and MulT repo: zero-labelled samples are neutral, so they are dropped.
    keep = t != 0
    if keep.any():
        non0_t, non0_p = t[keep] > 0, p[keep] > 0
        out["non0_acc2"] = float(accuracy_score(non0_t, non0_p))
        out["non0_f1"] = _weighted_f1(non0_t, non0_p)
        out["mult_acc2"] = out["non0_acc2"]
        out["mult_f1"] = _weighted_f1(non0_p, non0_t)  # the MulT repo's argument order, on purpose
    else:  # every label is exactly 0: nothing left to score in these conventions
        for k in ("non0_acc2", "non0_f1", "mult_acc2", "mult_f1"):
            out[k] = float("nan")
    return {k: out[k] for k in METRIC_KEYS}
