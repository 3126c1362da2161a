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


def normalize_by_group(x: np.ndarray, mask: np.ndarray, groups, eps: float = 1e-6) -> np.ndarray:
    """Z-score each feature dim within each group (a speaker), over the group's real steps.

    x [N, T, D] pooled frames, mask [N, T] real steps, groups [N] a label per segment.
    Padded steps stay 0. A dim that is constant within a group maps to 0 (not NaN).

    Why (speaker normalization, standard for paralinguistic features): COVAREP/FACET carry
    a strong per-speaker signature (voice, face, recording), and MOSI's folds are speaker-
    disjoint, so a model can fit the training speakers' signatures to their label means and
    that does not transfer. Normalizing within the speaker removes the signature and keeps
    how a segment differs from the speaker's own baseline. It needs only unlabeled frames of
    the same speaker, at training and at serving time alike.
    """
    x = np.asarray(x, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    groups = np.asarray(groups)
    if not (x.ndim == 3 and mask.shape == x.shape[:2] and groups.shape == (len(x),)):
        raise ValueError(f"shapes do not match: x {x.shape}, mask {mask.shape}, groups {groups.shape}")
    out = np.zeros_like(x)
    _, code = np.unique(groups, return_inverse=True)      # integer codes: no string-comparison quirks
    for g in range(code.max() + 1 if len(code) else 0):
        rows = np.flatnonzero(code == g)
        m = mask[rows]
        frames = x[rows][m]                                  # [n_real, D]
        if len(frames) == 0:
            continue
        mu = frames.mean(0, dtype=np.float64)
        sd = frames.std(0, dtype=np.float64)
        z = ((x[rows] - mu) / np.where(sd > eps, sd, np.inf)).astype(np.float32)
        out[rows] = np.where(m[..., None], z, 0.0)
    return out


def av_inputs(x: np.ndarray, mask: np.ndarray, groups, av_norm: str) -> np.ndarray:
    """One modality's frames [N,T,D] as PSA-MF sees them (psamf.av_norm): per-group z-scored
    under "speaker" (normalize_by_group), else as ingested. Training groups by speaker_id and
    serving by user_id, both through here, so the two cannot drift apart. av_norm is one of
    psamf.av_norm's config.CHOICES, checked when the config was built."""
    if av_norm == "none":
        return np.ascontiguousarray(x, dtype=np.float32)
    return normalize_by_group(x, mask, groups)
