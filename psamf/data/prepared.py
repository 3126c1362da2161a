"""The prepared dataset: what `psamf data ingest` writes and every later stage reads.

On disk, `<prepared_dir>/<corpus>/`:
    segments.parquet  one row per segment, columns SEGMENT_COLUMNS (+ EMOTION_COLUMNS for MOSEI,
                      UNIMODAL_COLUMNS for SIMS; kept for analysis, read by no model)
    arrays.npz        audio [N,T,Da], visual [N,T,Dv] float32; *_len [N] true frame counts
                      before pooling/padding; *_mask [N,T] bool (True = a real step)
    manifest.json     corpus, format (sdk | mmsa | mult; absent = sdk), av_simulated, seq_len, dims, counts, excluded segments,
                      non-finite policy and counts, source file hashes

Row i of the table is row i of every array.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from psamf.data.layout import LABEL_COLUMNS
from psamf.errors import InputError
from psamf.io import atomic_dir

SEGMENT_COLUMNS = ["segment_id", "video_id", "speaker_id", "split", "label", "text", "start", "end"]
EMOTION_COLUMNS = [f"emo_{e}" for e in LABEL_COLUMNS["mosei"][1:]]
UNIMODAL_COLUMNS = ["label_T", "label_A", "label_V"]  # SIMS's unimodal labels (pickle formats); read by no model
EXTRA_COLUMNS = EMOTION_COLUMNS + UNIMODAL_COLUMNS
MODALITIES = ("audio", "visual")
# A pickle corpus's own text features (MMSA's BERT or MulT's GloVe `text`), pooled/padded to T like
# the AV arrays, with FILE_TEXT + "_mask"; `text_features.encoder: file` feeds them to MulT.
FILE_TEXT = "text_file"
SPLITS = ("train", "valid", "test")


@dataclass
class PreparedDataset:
    segments: pd.DataFrame
    arrays: dict[str, np.ndarray]  # audio, visual, audio_len, visual_len, audio_mask, visual_mask
    manifest: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.segments)

    @property
    def av_simulated(self) -> bool:
        return bool(self.manifest.get("av_simulated", False))

    def subset(self, mask: np.ndarray | pd.Series) -> "PreparedDataset":
        """Rows where `mask` is true, table and arrays together."""
        idx = np.flatnonzero(np.asarray(mask))
        return PreparedDataset(
            segments=self.segments.iloc[idx].reset_index(drop=True),
            arrays={k: v[idx] for k, v in self.arrays.items()},
            manifest=dict(self.manifest),
        )

    def split(self, name: str) -> "PreparedDataset":
        return self.subset(self.segments["split"].to_numpy() == name)

    def speaker_counts(self) -> pd.Series:
        """Segments per speaker, most first; ties broken by speaker id so the order is stable."""
        counts = self.segments.groupby("speaker_id").size()
        order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return pd.Series(dict(order), name="segments")

    def loo_users(self, k: int) -> list[str]:
        """The K speakers with the most segments: the leave-one-out (report) users."""
        return list(self.speaker_counts().index[:k])

    def selection_users(self, k_report: int, k: int) -> list[str]:
        """The next k speakers by segment count after the k_report report speakers: they choose
        fine-tuning settings, so the report speakers are scored on settings they never chose."""
        return list(self.speaker_counts().index[k_report:k_report + k])


def stack_arrays(per_mod: dict[str, list]) -> dict[str, np.ndarray]:
    """Per-segment lists (`<m>`: frames [T, D], `<m>_len`, `<m>_mask` [T]) -> the prepared arrays."""
    arrays: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        arrays[m] = np.stack(per_mod[m]).astype(np.float32)
        arrays[f"{m}_len"] = np.asarray(per_mod[f"{m}_len"], dtype=np.int64)
        arrays[f"{m}_mask"] = np.stack(per_mod[f"{m}_mask"])
    return arrays


def save_prepared(ds: PreparedDataset, out_dir: str | Path) -> Path:
    """Write atomically: the directory appears complete or not at all."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        extra = [c for c in EXTRA_COLUMNS if c in ds.segments.columns]
        ds.segments[SEGMENT_COLUMNS + extra].to_parquet(tmp / "segments.parquet", index=False)
        np.savez(tmp / "arrays.npz", **ds.arrays)
        (tmp / "manifest.json").write_text(json.dumps(ds.manifest, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_prepared(path: str | Path) -> PreparedDataset:
    path = Path(path)
    for name in ("segments.parquet", "arrays.npz", "manifest.json"):
        if not (path / name).is_file():
            raise InputError(path / name, "missing; run `psamf data ingest` first")
    try:
        segments = pd.read_parquet(path / "segments.parquet")
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(path / "segments.parquet", f"unreadable: {str(e).splitlines()[0]}") from None
    missing = [c for c in SEGMENT_COLUMNS if c not in segments.columns]
    if missing:
        raise InputError(path / "segments.parquet", f"missing column(s) {', '.join(missing)}")
    try:
        with np.load(path / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise InputError(path / "arrays.npz", f"unreadable: {str(e).splitlines()[0]}") from None
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except ValueError as e:
        raise InputError(path / "manifest.json", f"not valid JSON: {e}") from None
    return PreparedDataset(segments=segments, arrays=arrays, manifest=manifest)
