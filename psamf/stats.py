"""Means with 95% confidence intervals over repeated draws (Student t, scipy)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """{mean, lo, hi, sd, n} with a t-interval; lo = hi = mean when n < 2; NaNs are ignored."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "sd": float("nan"), "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "lo": mean, "hi": mean, "sd": 0.0, "n": 1}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n}


def paired_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of a - b with its CI; `excludes_zero` says whether the CI is clear of 0."""
    d = mean_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), level)
    return {**d, "excludes_zero": bool(d["n"] >= 2 and (d["lo"] > 0 or d["hi"] < 0))}


def bootstrap_ci(preds: Sequence[float], labels: Sequence[float], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict[str, dict[str, float]]:
    """Percentile-bootstrap CIs over segments for MAE, Corr and Non0-Acc2 (psamf.metrics
    conventions), for scores with no repeated draws or seeds to take a t-interval over."""
    from psamf.metrics import regression_metrics

    p, t = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    point = regression_metrics(p, t)
    idx = np.random.default_rng(seed).integers(0, len(p), size=(n_boot, len(p)))
    P, T = p[idx], t[idx]
    mae = np.abs(P - T).mean(axis=1)
    pc, tc = P - P.mean(axis=1, keepdims=True), T - T.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant resample has no r: dropped below
        corr = (pc * tc).sum(axis=1) / np.sqrt((pc ** 2).sum(axis=1) * (tc ** 2).sum(axis=1))
        keep = T != 0
        acc2 = (((P > 0) == (T > 0)) & keep).sum(axis=1) / keep.sum(axis=1)
    q = [50 * (1 - level), 50 * (1 + level)]
    out = {}
    for name, draws in (("mae", mae), ("corr", corr), ("non0_acc2", acc2)):
        ok = draws[np.isfinite(draws)]
        lo, hi = np.percentile(ok, q) if len(ok) else (float("nan"), float("nan"))
        out[name] = {"mean": point[name], "lo": float(lo), "hi": float(hi), "n": int(len(p))}
    return out
