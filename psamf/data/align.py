"""Cut a video's frame sequence to a segment interval, then pool or pad to T steps."""
from __future__ import annotations

import numpy as np


def frames_in(intervals: np.ndarray, start: float, end: float) -> np.ndarray:
    """Indices of frames overlapping [start, end]; a zero-length interval takes the frame under it."""
    fs, fe = intervals[:, 0], intervals[:, 1]
    if end > start:
        return np.flatnonzero((fs < end) & (fe > start))
    return np.flatnonzero((fs <= start) & (fe > start))


def pool_or_pad(x: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) -> (T, D) and a (T,) mask of real steps.

    Longer sequences are average-pooled into T contiguous bins (every frame counts once,
    unlike strided sampling); shorter ones are zero-padded at the end.
    """
    n, d = x.shape
    out = np.zeros((T, d), dtype=np.float32)
    mask = np.zeros(T, dtype=bool)
    if n == 0:
        return out, mask
    if n <= T:
        out[:n] = x
        mask[:n] = True
        return out, mask
    edges = np.linspace(0, n, T + 1).astype(int)
    sums = np.add.reduceat(x.astype(np.float64), edges[:-1], axis=0)
    out[:] = sums / np.diff(edges)[:, None]
    mask[:] = True
    return out, mask
