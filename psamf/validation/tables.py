"""The three tables great-expectations validates, built from a PreparedDataset.

GX validates tables, not [N, T, D] arrays, so the prepared dataset is turned into:

``segments``   one row per segment: the SEGMENT_COLUMNS as stored, plus derived columns
               - ``row``: position in the table, which is also the row of every array;
               - ``id_video``/``id_index``: ``segment_id`` split as ``<video_id>_<n>``;
               - ``id_matches_video``: the id is exactly ``<this row's video_id>_<n>`` with n >= 1;
               - ``fold_split``: the split that ``manifest['folds']`` (``{split: [video ids]}``)
                 gives this row's video (None when the video is in no fold; ``a+b`` when it
                 is in several); ``split_matches_fold``: ``split == fold_split``;
               - ``video_end``: the end of the video's extent in seconds, taken from
                 ``manifest['video_end']`` (``{video_id: seconds}``, written by ingest from
                 the feature sequences). The arrays are pooled/padded to T steps and carry no
                 time axis, so the manifest is the only source; a video missing from it gets
                 None, and the not-null expectation on ``video_end`` fails, naming its segments;
               - ``end_overrun``: ``end - video_end`` (must be <= VIDEO_END_TOLERANCE_S).
               ``video_end`` lives here, not in the array summary, because the interval checks
               compare it with ``start``/``end`` and GX compares columns within one table.
``arrays``     one row per segment summarising the arrays: ``{m}_present`` (the modality's
               array, ``_len`` and ``_mask`` all exist with one row per segment, and the
               segment has at least one real step), ``{m}_len`` (true frame count),
               ``{m}_steps`` (T of the array), ``{m}_dim`` (D), ``{m}_real_steps`` (mask sum),
               ``{m}_mask_matches_len`` (real steps == min(len, T): padded when shorter,
               pooled when longer), ``{m}_nonfinite`` (NaN/+-inf left in the segment's
               frames, after ingest's non-finite policy), ``{m}_problem`` (what is wrong with
               the modality's arrays: missing or misshaped; '' when fine). A missing array
               gives 0 / False.
``loo_users``  the K = cfg.data.loo_users speakers with the most segments
               (``PreparedDataset.loo_users``): ``rank``, ``speaker_id``, ``n_segments``.

Building the tables never fails on bad data (missing columns, wrong shapes): every defect
must reach an expectation so the report names it.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from psamf.data.prepared import MODALITIES, SEGMENT_COLUMNS, PreparedDataset

VIDEO_END_TOLERANCE_S = 0.5  # a transcript interval may end a little after the last feature frame
SEGMENT_ID_RE = re.compile(r"^(?P<video>.+)_(?P<n>[1-9][0-9]*)$")
# MMSA/MulT pickles (manifest format mmsa | mult): <video>_<clip number>, which may be 0 or zero-padded
# (SIMS: video_0001_0001); a video may span splits (SIMS), so a row's split must be one of its video's.
PICKLE_SEGMENT_ID_RE = re.compile(r"^(?P<video>.+)_(?P<n>[0-9]+)$")
PICKLE_FORMATS = ("mmsa", "mult")
STRING_COLUMNS = ("segment_id", "video_id", "speaker_id", "split", "text")


def segments_table(ds: PreparedDataset) -> pd.DataFrame:
    seg = ds.segments.reset_index(drop=True).copy()
    # pandas 3 stores text as StringDtype, which GX's type check cannot name; as object
    # columns GX checks each value's Python type instead (and so catches a stray int id).
    for col in STRING_COLUMNS:
        if col in seg.columns:
            seg[col] = seg[col].astype(object)
    seg.insert(0, "row", np.arange(len(seg), dtype=np.int64))

    manifest = ds.manifest or {}
    pickled = manifest.get("format") in PICKLE_FORMATS
    id_re = PICKLE_SEGMENT_ID_RE if pickled else SEGMENT_ID_RE
    if "segment_id" in seg.columns:
        parts = [id_re.match(s) if isinstance(s, str) else None for s in seg["segment_id"]]
        seg["id_video"] = [m.group("video") if m else None for m in parts]
        seg["id_index"] = pd.array([int(m.group("n")) if m else None for m in parts], dtype="Int64")
        if "video_id" in seg.columns:
            seg["id_matches_video"] = [
                bool(m) and isinstance(v, str) and m.group("video") == v
                for m, v in zip(parts, seg["video_id"])
            ]

    if "video_id" in seg.columns:
        fold_of: dict[str, list[str]] = {}
        folds = manifest.get("folds")
        if isinstance(folds, dict):
            for split, vids in folds.items():
                for v in vids or []:
                    fold_of.setdefault(str(v), []).append(str(split))
        seg["fold_split"] = [
            "+".join(sorted(fold_of[v])) if isinstance(v, str) and v in fold_of else None
            for v in seg["video_id"]
        ]
        if "split" in seg.columns:
            seg["split_matches_fold"] = [
                isinstance(s, str) and (s == f or (pickled and isinstance(f, str) and s in f.split("+")))
                for s, f in zip(seg["split"], seg["fold_split"])
            ]
        ends = manifest.get("video_end")
        ends = ends if isinstance(ends, dict) else {}
        seg["video_end"] = pd.to_numeric(
            pd.Series([_num(ends.get(v)) if isinstance(v, str) else None for v in seg["video_id"]],
                      dtype=object), errors="coerce").astype(float)
        if "end" in seg.columns:
            end = pd.to_numeric(seg["end"], errors="coerce").astype(float)
            seg["end_overrun"] = end - seg["video_end"]
    return seg


def arrays_table(ds: PreparedDataset) -> pd.DataFrame:
    n = len(ds.segments)
    out: dict[str, Any] = {"row": np.arange(n, dtype=np.int64)}
    if "segment_id" in ds.segments.columns:
        out["segment_id"] = ds.segments["segment_id"].astype(object).to_numpy()
    for m in MODALITIES:
        arr = ds.arrays.get(m)
        lens = ds.arrays.get(f"{m}_len")
        mask = ds.arrays.get(f"{m}_mask")
        arr3 = isinstance(arr, np.ndarray) and arr.ndim == 3  # T and D are readable even if N is off
        arr_ok = arr3 and arr.shape[0] == n
        steps = arr.shape[1] if arr3 else 0
        lens_ok = isinstance(lens, np.ndarray) and lens.shape == (n,)
        mask_ok = arr3 and isinstance(mask, np.ndarray) and mask.shape == (n, steps)

        out[f"{m}_steps"] = np.full(n, steps, dtype=np.int64)
        out[f"{m}_dim"] = np.full(n, arr.shape[2] if arr3 else 0, dtype=np.int64)
        if arr_ok and arr.size and np.issubdtype(arr.dtype, np.number):
            bad = ~np.isfinite(arr.reshape(n, -1))
            out[f"{m}_nonfinite"] = bad.sum(axis=1).astype(np.int64)
        else:
            out[f"{m}_nonfinite"] = np.zeros(n, dtype=np.int64)
        length = np.nan_to_num(lens.astype(float), nan=0).astype(np.int64) if lens_ok else np.zeros(n, np.int64)
        out[f"{m}_len"] = length
        real = mask.astype(bool).sum(axis=1).astype(np.int64) if mask_ok else np.zeros(n, np.int64)
        out[f"{m}_real_steps"] = real
        out[f"{m}_present"] = (real > 0) & arr_ok & lens_ok & mask_ok
        out[f"{m}_problem"] = _array_problem(ds.arrays, m, n, steps, arr_ok, lens_ok, mask_ok)
        out[f"{m}_mask_matches_len"] = real == np.minimum(length, steps)
    return pd.DataFrame(out)


def _array_problem(arrays: dict[str, Any], m: str, n: int, steps: int,
                   arr_ok: bool, lens_ok: bool, mask_ok: bool) -> str:
    """'' when the modality's arrays are well-shaped, else what is wrong with them."""
    mask = arrays.get(f"{m}_mask")
    if steps == 0:  # no T to compare with: only say the mask is wrong if it is wrong on its own
        mask_ok = isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.shape[0] == n
    wanted = {m: (arr_ok, f"[N={n}, T, D]"), f"{m}_len": (lens_ok, f"[N={n}]"),
              f"{m}_mask": (mask_ok, f"[N={n}, T={steps}]" if steps else f"[N={n}, T]")}
    problems = []
    for name, (ok, shape) in wanted.items():
        if ok:
            continue
        a = arrays.get(name)
        got = "missing" if a is None else f"shape {list(np.shape(a))}"
        problems.append(f"{name} {got}, want {shape}")
    return "; ".join(problems)


def loo_users_table(ds: PreparedDataset, k: int) -> pd.DataFrame:
    if "speaker_id" not in ds.segments.columns or k <= 0:
        return pd.DataFrame({"rank": pd.Series(dtype=np.int64), "speaker_id": pd.Series(dtype=object),
                             "n_segments": pd.Series(dtype=np.int64)})
    counts = ds.speaker_counts()
    users = ds.loo_users(k)
    return pd.DataFrame({
        "rank": np.arange(1, len(users) + 1, dtype=np.int64),
        "speaker_id": pd.Series(users, dtype=object),
        "n_segments": np.array([int(counts[u]) for u in users], dtype=np.int64),
    })


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


__all__ = ["SEGMENT_COLUMNS", "VIDEO_END_TOLERANCE_S", "segments_table", "arrays_table", "loo_users_table"]
