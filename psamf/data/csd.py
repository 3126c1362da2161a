"""CMU Multimodal SDK computational sequences (.csd, HDF5): read and write.

Layout, as in the SDK's own files (e.g. CMU_MOSI_Opinion_Labels.csd):

    /<root name>/data/<video_id>/features   (n, d) float32
    /<root name>/data/<video_id>/intervals  (n, 2) float32, start/end seconds
    /<root name>/metadata/<key>             (1,) variable-length string holding a JSON value

The writer is deterministic (no HDF5 timestamps), so the same sequence gives the
same bytes; the synthetic corpus relies on that.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from psamf.errors import InputError
from psamf.io import atomic_path

# The metadata keys the SDK writes; the writer fills the ones a caller leaves out.
SDK_METADATA_KEYS = (
    "alignment compatible",
    "computational sequence description",
    "computational sequence version",
    "contact",
    "creator",
    "dataset bib citation",
    "dataset name",
    "dataset version",
    "dimension names",
    "featureset bib citation",
    "md5",
    "root name",
    "uuid",
)


@dataclass
class ComputationalSequence:
    """One feature stream over many videos: {video_id: (features (n, d), intervals (n, 2))}."""

    root_name: str
    data: dict[str, tuple[np.ndarray, np.ndarray]]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        first = next(iter(self.data.values()), None)
        return int(first[0].shape[1]) if first is not None else 0

    def video_ids(self) -> list[str]:
        return sorted(self.data)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value  # some third-party CSDs store bare strings
    return value


DEFAULT_MAX_BYTES = 4 << 30  # data.max_csd_mb: what one file may declare in all, decoded


NUMBER_KINDS, TEXT_KINDS = "fiu", "SO"  # TEXT: the SDK's timestamped words (bytes)


def _checked(path: Path, where: str, ds: Any, budget: list[int], kinds: str = NUMBER_KINDS) -> None:
    """Refuse a dataset by its declared dtype and shape, before reading a byte of it: a small
    (compressed, or lying) file can declare terabytes, which would raise MemoryError or get
    the process OOM-killed instead of a message."""
    if not isinstance(ds, h5py.Dataset):
        raise InputError(path, f"{where} is not a dataset")
    if ds.dtype.kind not in kinds:
        raise InputError(path, f"{where} has dtype {ds.dtype}, not {'a number' if kinds == NUMBER_KINDS else 'text'}")
    if len(ds.shape) != 2:
        raise InputError(path, f"{where} must be 2-d, it declares shape {ds.shape}")
    size = int(np.prod(ds.shape, dtype=np.float64)) * max(4, ds.dtype.itemsize)  # numbers read as float32
    budget[0] -= size
    if budget[0] < 0:
        raise InputError(path, f"{where} declares shape {ds.shape}: over the cap of what one file may hold "
                               f"(data.max_csd_mb)")


def read_csd(path: str | Path, videos: set[str] | None = None,
             max_bytes: int = DEFAULT_MAX_BYTES, text: bool = False) -> ComputationalSequence:
    """Read a .csd file; any problem becomes one InputError naming the file and the group.
    Video ids must be safe ids (they name files later); declared sizes are capped by `max_bytes`.
    `text`: features are words (the SDK's TimestampedWords), read as an (n, 1) array of str."""
    from psamf.data.layout import check_id

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(path, f"not a readable HDF5 file (truncated or corrupt?): {str(e).splitlines()[0]}") from None
    with f:
        roots = list(f.keys())
        if len(roots) != 1:
            raise InputError(path, f"expected exactly one root group, found {len(roots)}: {roots[:5]}")
        root = f[roots[0]]
        if not isinstance(root, h5py.Group) or "data" not in root or "metadata" not in root:
            raise InputError(path, f"root group '{roots[0]}' must hold 'data' and 'metadata' groups")
        metadata: dict[str, Any] = {}
        for key, ds in root["metadata"].items():
            try:
                raw = ds[()]
                metadata[key] = _decode(raw[0] if getattr(raw, "shape", ()) else raw)
            except (OSError, IndexError) as e:
                raise InputError(path, f"metadata/{key} unreadable: {e}") from None
        data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        budget = [max_bytes]
        for vid, grp in root["data"].items():
            if videos is not None and vid not in videos:
                continue
            where = f"data/{vid}"
            check_id(vid, "video id", f"{path}: {where}")
            if not isinstance(grp, h5py.Group) or "features" not in grp or "intervals" not in grp:
                raise InputError(path, f"{where} must hold 'features' and 'intervals' datasets")
            _checked(path, f"{where}/features", grp["features"], budget, TEXT_KINDS if text else NUMBER_KINDS)
            _checked(path, f"{where}/intervals", grp["intervals"], budget)
            n_feats, n_ivals = grp["features"].shape[0], grp["intervals"].shape[0]
            if n_feats != n_ivals:
                raise InputError(path, f"{where}: {n_feats} feature rows but {n_ivals} intervals")
            try:
                feats = _words(grp["features"][()]) if text else np.asarray(grp["features"][()], dtype=np.float32)
                ivals = np.asarray(grp["intervals"][()], dtype=np.float32)
            except UnicodeDecodeError as e:
                raise InputError(path, f"{where}/features: a word is not UTF-8 ({e.reason} at byte {e.start})") from None
            except (OSError, ValueError, TypeError) as e:
                raise InputError(path, f"{where} unreadable (truncated or corrupt?): {str(e).splitlines()[0]}") from None
            if feats.ndim != 2 or ivals.ndim != 2 or ivals.shape[1] != 2:
                raise InputError(path, f"{where}: features must be (n, d) and intervals (n, 2), got {feats.shape} and {ivals.shape}")
            if feats.shape[0] != ivals.shape[0]:
                raise InputError(path, f"{where}: {feats.shape[0]} feature rows but {ivals.shape[0]} intervals")
            data[vid] = (feats, ivals)
        root_name = metadata.get("root name") or roots[0]
        return ComputationalSequence(root_name=str(root_name), data=data, metadata=metadata)


def _words(raw: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda w: w.decode("utf-8") if isinstance(w, bytes) else str(w), otypes=[object])(raw)


def _features(feats: Any) -> np.ndarray:
    """float32, or for words UTF-8 byte strings as the SDK's TimestampedWords stores them."""
    arr = np.asarray(feats)
    if arr.dtype.kind in "US" or (arr.dtype.kind == "O" and all(isinstance(w, (str, bytes)) for w in arr.flat)):
        return np.array([[w.encode("utf-8") if isinstance(w, str) else bytes(w) for w in row] for row in arr],
                        dtype=bytes).reshape(arr.shape)
    return np.asarray(arr, np.float32)


def write_csd(path: str | Path, seq: ComputationalSequence) -> Path:
    """Write `seq` atomically in the SDK layout. Byte-identical for identical input.
    Features of str/bytes (timestamped words) are written as fixed-length UTF-8 bytes."""
    path = Path(path)
    meta = {k: None for k in SDK_METADATA_KEYS}
    meta.update({"alignment compatible": True, "computational sequence version": 1.0})
    meta.update(seq.metadata)
    meta["root name"] = seq.root_name
    str_dt = h5py.string_dtype(encoding="utf-8")
    with atomic_path(path) as tmp:
        # track_times=False everywhere: HDF5 otherwise stamps object headers with the clock.
        with h5py.File(tmp, "w", track_order=False) as f:
            root = f.create_group(seq.root_name, track_order=False)
            data = root.create_group("data")
            for vid in sorted(seq.data):
                feats, ivals = seq.data[vid]
                g = data.create_group(vid)
                g.create_dataset("features", data=_features(feats), compression="gzip",
                                 track_times=False)
                g.create_dataset("intervals", data=np.asarray(ivals, np.float32), compression="gzip",
                                 track_times=False)
            md = root.create_group("metadata")
            for key in sorted(meta):
                value = meta[key]
                # The SDK stores every value as JSON text ('"CMU-MOSI"', '1.0', 'true', 'null').
                text = json.dumps(value)
                md.create_dataset(key, data=np.array([text], dtype=object), dtype=str_dt, track_times=False)
    return path
