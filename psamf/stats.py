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
