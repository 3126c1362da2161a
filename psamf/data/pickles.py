"""MMSA's and MulT's processed pickles as corpus formats (`data.format: mmsa | mult`), and the export.

Both are read through psamf.data.safe_pickle (ARRAY_GLOBALS) and end in the same prepared dataset
as the SDK corpora (psamf.data.prepared): speaker = video id, splits = the pickle's own
train/valid/test, text = the raw transcript (encoded later by the configured encoder), AV dims
from the file, -inf/NaN by data.nonfinite, sequences pooled/padded to data.seq_len.

**MMSA** (`aligned_50.pkl`, `unaligned_50.pkl`; SIMS `unaligned_39.pkl`), a dict with `train`,
`valid`, `test`, each a dict of:
    id                  [N] "<video>$_$<clip>" (clip: digits)
    raw_text            [N] str
    text                [N, L, 768] BERT features (or GloVe 300); not read, rows checked
    text_bert           optional [N, 3, L]: token ids / attention mask / segment ids
    audio, vision       [N, La, Da], [N, Lv, Dv]; audio may hold -inf
    audio_lengths, vision_lengths   optional [N] (the unaligned files): real steps, from the start
    regression_labels   [N] in [-3, 3] (SIMS [-1, 1])
    classification_labels, annotations   optional; not read, rows checked
    regression_labels_T/A/V   SIMS: unimodal labels, kept as label_T/A/V columns
    psamf_audio_len, psamf_vision_len, psamf_start, psamf_end   optional, written by `psamf data
        export` only (frame counts before pooling, segment times), so a round trip is exact
**MulT** (`mosi_data.pkl`, `mosi_data_noalign.pkl`, `mosei_senti_data(_noalign).pkl`), `train` /
`valid` / `test`, each with `vision`, `audio`, `text` (GloVe 300; not read), `labels` [N, 1, 1]
and `id` [N, k] of bytes: `"<video>_<clip>"` in column 0, or `[video, start, end]` (the aligned
file). Its raw text comes from MMSA's `label.csv` (video_id, clip_id, text, label, annotation,
mode; SIMS adds label_T/A/V), joined on (video, clip); clip ids compare as integers, so "0001"
joins 1. For the `[video, start, end]` form a segment's clip is its 1-based rank by start within
its video. Pickle rows with no label.csv row are excluded and named ("no label.csv row");
label.csv rows no pickle row has are listed as orphan transcripts (data.orphan_transcripts).

Without *_lengths, a sequence's real steps are what is left after trimming all-zero rows at both
ends (MulT pads at the start, MMSA's aligned files at the end); an all-zero sequence keeps its
whole padded length. Segments are ordered by (video, clip number), like the SDK path. Segment
ids are "<video>_<clip>". MMSA files carry no times: start = end = 0.
"""
from __future__ import annotations

import csv
import io
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from psamf.config import PICKLE_FORMATS, Config
from psamf.data.align import pool_or_pad
from psamf.data.layout import check_id
from psamf.data.prepared import FILE_TEXT, MODALITIES, SPLITS, PreparedDataset, stack_arrays
from psamf.data.safe_pickle import ARRAY_GLOBALS, restricted_load
from psamf.errors import InputError
from psamf.fingerprint import file_sha256
from psamf.io import atomic_path, read_text

log = logging.getLogger(__name__)

MMSA_FILES = ("unaligned_50.pkl", "aligned_50.pkl", "unaligned_39.pkl")
MULT_FILES = {"mosi": ("mosi_data_noalign.pkl", "mosi_data.pkl"),
              "mosei": ("mosei_senti_data_noalign.pkl", "mosei_senti_data.pkl"),
              "sims": ("sims_data_noalign.pkl", "sims_data.pkl")}
LABEL_CSV = "label.csv"
LABEL_RANGES = {"sims": (-1.0, 1.0)}
DEFAULT_LABEL_RANGE = (-3.0, 3.0)
UNIMODAL = ("T", "A", "V")           # SIMS: regression_labels_T/A/V, label.csv label_T/A/V
UNIMODAL_COLUMNS = [f"label_{m}" for m in UNIMODAL]
FILE_KEY = {"audio": "audio", "visual": "vision"}   # prepared modality -> pickle key
MMSA_ID = re.compile(r"^(?P<video>.+)\$_\$(?P<clip>[0-9]+)$")
MULT_ID = re.compile(r"^(?P<video>.+)_(?P<clip>[0-9]+)$")


def label_range(corpus: str) -> tuple[float, float]:
    return LABEL_RANGES.get(corpus, DEFAULT_LABEL_RANGE)


# ---------------------------------------------------------------------------- locating files

def pickle_file(cfg: Config) -> Path:
    """data.pickle_file in data.pickle_path, else the one known name present there."""
    d, fmt = cfg.data.pickle_path, cfg.data.format
    if cfg.data.pickle_file:
        return d / cfg.data.pickle_file
    names = MMSA_FILES if fmt == "mmsa" else MULT_FILES.get(cfg.data.corpus, ())
    found = [d / n for n in names if (d / n).is_file()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(d, f"no {fmt} pickle here (looked for {', '.join(names) or 'nothing'}); "
                            "set data.pickle_dir / data.pickle_file")
    raise InputError(d, f"several {fmt} pickles here ({', '.join(p.name for p in found)}); "
                        "say which in data.pickle_file")


def label_csv_file(cfg: Config) -> Path:
    d = cfg.data.pickle_path
    for name in (LABEL_CSV, f"{cfg.data.corpus.upper()}-label.csv"):
        if (d / name).is_file():
            return d / name
    raise InputError(d / LABEL_CSV, f"file not found (a MulT pickle takes its text from MMSA's label.csv; "
                                    f"{cfg.data.corpus.upper()}-label.csv is accepted too)")


# ---------------------------------------------------------------------------- reading

@dataclass
class Split:
    """One split, as read: row i of every field is one segment."""
    videos: list[str]
    clips: list[str]
    labels: np.ndarray
    av: dict[str, np.ndarray]                       # audio, visual: [N, L, D]
    lengths: dict[str, np.ndarray | None]           # real steps from the start, or None
    texts: list[str] | None = None                  # None for MulT (label.csv gives them)
    unimodal: dict[str, np.ndarray] = field(default_factory=dict)
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # psamf_*_len
    start: np.ndarray | None = None
    end: np.ndarray | None = None
    text_feats: np.ndarray | None = None             # the file's own `text` features [N, L, D], if any


class _Where:
    def __init__(self, path: Path):
        self.path = path

    def err(self, split: str, key: str, what: str, row: int | None = None) -> InputError:
        at = f"split '{split}', key '{key}'" + (f", row {row}" if row is not None else "")
        return InputError(self.path, f"{at}: {what}")


def _load(path: Path, cfg: Config, fmt: str) -> dict[str, dict[str, Any]]:
    obj = restricted_load(path, ARRAY_GLOBALS, cfg.data.max_pickle_mb << 20)
    if not isinstance(obj, dict):
        raise InputError(path, f"not an {fmt} pickle: top level is a {type(obj).__name__}, not a dict of splits")
    w = _Where(path)
    for split in SPLITS:
        if split not in obj:
            raise InputError(path, f"missing split '{split}' (an {fmt} pickle has train, valid, test)")
        if not isinstance(obj[split], dict):
            raise w.err(split, "-", f"is a {type(obj[split]).__name__}, not a dict of keys")
    for split in SPLITS:
        keys = obj[split]
        if fmt == "mmsa" and "regression_labels" not in keys and "labels" in keys:
            raise InputError(path, f"split '{split}' has 'labels' and no 'regression_labels': this is a MulT "
                                   "pickle, not an MMSA one (set data.format=mult)")
        if fmt == "mult" and "labels" not in keys and ("regression_labels" in keys or "raw_text" in keys):
            raise InputError(path, f"split '{split}' has 'regression_labels'/'raw_text' and no 'labels': this is "
                                   "an MMSA pickle, not a MulT one (set data.format=mmsa)")
    return obj


def _require(w: _Where, split: str, d: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        if k not in d:
            raise w.err(split, k, "missing")


def _rows(w: _Where, split: str, d: dict, key: str, n: int, ref: str) -> Any:
    v = d[key]
    try:
        got = len(v)
    except TypeError:
        raise w.err(split, key, f"is a {type(v).__name__}, not one entry per row") from None
    if got != n:
        raise w.err(split, key, f"has {got} rows, '{ref}' has {n}")
    return v


def _sequence(w: _Where, split: str, d: dict, key: str, n: int, ref: str) -> np.ndarray:
    arr = _rows(w, split, d, key, n, ref)
    if not isinstance(arr, np.ndarray) or arr.ndim != 3 or arr.dtype.kind not in "biuf":
        shape = getattr(arr, "shape", None)
        raise w.err(split, key, f"must be a numeric [N, L, D] array, got {type(arr).__name__} {shape}")
    return arr


def _numbers(w: _Where, split: str, d: dict, key: str, n: int, ref: str) -> np.ndarray:
    v = _rows(w, split, d, key, n, ref)
    try:
        arr = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise w.err(split, key, "must hold numbers") from None
    if arr.size != n:
        raise w.err(split, key, f"must hold one number per row, has shape {arr.shape}")
    return arr.reshape(n)


def _in_range(w: _Where, split: str, key: str, values: np.ndarray, lo: float, hi: float, ids: list[str]) -> None:
    bad = np.flatnonzero(~((values >= lo) & (values <= hi)))  # NaN fails too
    if len(bad):
        i = int(bad[0])
        raise w.err(split, key, f"label {float(values[i])!r} of {ids[i]} is outside [{lo:g}, {hi:g}]", i)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, (str, np.str_)):
        return str(value)
    return None


def _lengths(w: _Where, split: str, d: dict, key: str, n: int, padded: int, ref: str) -> np.ndarray | None:
    if key not in d:
        return None
    lens = _numbers(w, split, d, key, n, ref)
    for i, x in enumerate(lens):
        if not (np.isfinite(x) and x == int(x) and x >= 0):
            raise w.err(split, key, f"length {x!r} is not a whole number >= 0", i)
        if x > padded:
            raise w.err(split, key, f"length {int(x)} is longer than the padded length {padded}", i)
    return lens.astype(np.int64)


def _check_text_bert(w: _Where, split: str, d: dict, n: int) -> None:
    if "text_bert" not in d:
        return
    tb = _rows(w, split, d, "text_bert", n, "id")
    if not isinstance(tb, np.ndarray) or tb.ndim != 3 or tb.shape[1] != 3 or tb.dtype.kind not in "biuf":
        raise w.err(split, "text_bert", f"must be a numeric [N, 3, L] array, got {getattr(tb, 'shape', None)}")
    ids, mask = tb[:, 0], tb[:, 1]
    bad = ~np.isin(mask, (0, 1)) | ((mask == 1) != (ids != 0))
    rows = np.flatnonzero(bad.any(axis=1))
    if len(rows):
        i = int(rows[0])
        j = int(np.flatnonzero(bad[i])[0])
        raise w.err(split, "text_bert", f"the mask disagrees with the token ids at position {j} (id {ids[i, j]:g}, "
                                        f"mask {mask[i, j]:g}): the mask must be 1 exactly where an id is not padding (0)", i)


def _frames_and_times(w: _Where, split: str, d: dict, n: int, out: Split) -> None:
    for m in MODALITIES:
        key = f"psamf_{FILE_KEY[m]}_len"
        if key in d:
            v = _numbers(w, split, d, key, n, "id")
            lens = out.lengths[m]
            for i, x in enumerate(v):
                if not (np.isfinite(x) and x == int(x) and x >= 0) or (lens is not None and x < lens[i]):
                    raise w.err(split, key, f"frame count {x!r} is not a whole number >= {FILE_KEY[m]}_lengths", i)
            out.frames[m] = v.astype(np.int64)
    if "psamf_start" in d or "psamf_end" in d:
        _require(w, split, d, ("psamf_start", "psamf_end"))
        out.start = _numbers(w, split, d, "psamf_start", n, "id")
        out.end = _numbers(w, split, d, "psamf_end", n, "id")


def read_mmsa(path: Path, cfg: Config) -> dict[str, Split]:
    obj = _load(path, cfg, "mmsa")
    w = _Where(path)
    lo, hi = label_range(cfg.data.corpus)
    out: dict[str, Split] = {}
    for split in SPLITS:
        d = obj[split]
        _require(w, split, d, ("id", "raw_text", "audio", "vision", "regression_labels"))
        ids = d["id"]
        try:
            n = len(ids)
        except TypeError:
            raise w.err(split, "id", f"is a {type(ids).__name__}, not one id per row") from None
        videos, clips, shown = [], [], []
        for i in range(n):
            s = _text(ids[i])
            m = MMSA_ID.match(s) if s is not None else None
            if m is None:
                raise w.err(split, "id", f"id {str(ids[i])[:60]!r} does not parse as '<video>$_$<clip>' "
                                         "(clip: digits)", i)
            videos.append(check_id(m.group("video"), "video id", f"{path}: split '{split}', key 'id', row {i}"))
            clips.append(m.group("clip"))
            shown.append(s)
        texts_raw = _rows(w, split, d, "raw_text", n, "id")
        texts = []
        for i in range(n):
            t = _text(texts_raw[i])
            if t is None:
                raise w.err(split, "raw_text", f"is a {type(texts_raw[i]).__name__}, not text", i)
            texts.append(t.strip())
        for key in ("text", "classification_labels", "annotations"):
            if key in d:
                _rows(w, split, d, key, n, "id")
        _check_text_bert(w, split, d, n)
        file_text = d.get("text")
        av = {m: _sequence(w, split, d, FILE_KEY[m], n, "id") for m in MODALITIES}
        lengths = {m: _lengths(w, split, d, f"{FILE_KEY[m]}_lengths", n, av[m].shape[1], "id") for m in MODALITIES}
        labels = _numbers(w, split, d, "regression_labels", n, "id")
        _in_range(w, split, "regression_labels", labels, lo, hi, shown)
        sp = Split(videos, clips, labels, av, lengths, texts)
        if isinstance(file_text, np.ndarray) and file_text.ndim == 3 and file_text.dtype.kind == "f":
            sp.text_feats = file_text
        for u in UNIMODAL:
            key = f"regression_labels_{u}"
            if key in d:
                v = _numbers(w, split, d, key, n, "id")
                _in_range(w, split, key, v, lo, hi, shown)
                sp.unimodal[f"label_{u}"] = v
        _frames_and_times(w, split, d, n, sp)
        out[split] = sp
    return out


def _float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def read_mult(path: Path, cfg: Config) -> dict[str, Split]:
    obj = _load(path, cfg, "mult")
    w = _Where(path)
    lo, hi = label_range(cfg.data.corpus)
    out: dict[str, Split] = {}
    timed: list[tuple[str, int, str, float, float]] = []  # [video, start, end] rows: (split, row, video, start, end)
    for split in SPLITS:
        d = obj[split]
        _require(w, split, d, ("id", "labels", "audio", "vision", "text"))
        ids = d["id"]
        if not isinstance(ids, np.ndarray) or ids.ndim not in (1, 2) or len(ids) == 0 and ids.ndim != 2:
            raise w.err(split, "id", f"must be an [N, k] array of bytes, got {type(ids).__name__} "
                                     f"{getattr(ids, 'shape', None)}")
        n = len(ids)
        rows = ids.reshape(n, -1)
        videos, clips, shown = [], [], []
        starts, ends = np.zeros(n), np.zeros(n)
        for i in range(n):
            cols = [_text(x) for x in rows[i]]
            if any(c is None for c in cols):
                raise w.err(split, "id", f"id {rows[i].tolist()!r} is not text (bytes or str)", i)
            times = [_float(c) for c in cols[1:3]] if len(cols) >= 3 else [None]
            if len(cols) >= 3 and None not in times and MULT_ID.match(cols[0]) is None:
                video, clip = cols[0], ""
                starts[i], ends[i] = times
                timed.append((split, i, video, float(times[0]), float(times[1])))
                shown.append(f"{video}[{times[0]:g}, {times[1]:g}]")
            else:
                m = MULT_ID.match(cols[0])
                if m is None:
                    raise w.err(split, "id", f"id {cols[0][:60]!r} does not parse as '<video>_<clip>' "
                                             "(clip: digits) or [video, start, end]", i)
                video, clip = m.group("video"), m.group("clip")
                shown.append(cols[0])
            videos.append(check_id(video, "video id", f"{path}: split '{split}', key 'id', row {i}"))
            clips.append(clip)
        av = {m: _sequence(w, split, d, FILE_KEY[m], n, "id") for m in MODALITIES}
        text = _rows(w, split, d, "text", n, "id")
        if not isinstance(text, np.ndarray) or text.ndim != 3:
            raise w.err(split, "text", f"must be an [N, L, D] array, got {getattr(text, 'shape', None)}")
        labels = _numbers(w, split, d, "labels", n, "id")
        _in_range(w, split, "labels", labels, lo, hi, shown)
        sp = Split(videos, clips, labels, av, {m: None for m in MODALITIES}, text_feats=text)
        if any(not c for c in clips):
            sp.start, sp.end = starts, ends
        out[split] = sp
    # [video, start, end] ids: the clip is the segment's rank by start within its video (1-based).
    by_video: dict[str, list[tuple[float, float, str, int]]] = {}
    seen: dict[tuple[str, float, float], tuple[str, int]] = {}
    for split, i, video, s, e in timed:
        if (video, s, e) in seen:  # two rows for one [video, start, end] would get two clip numbers
            first = seen[(video, s, e)]
            raise w.err(split, "id", f"id [{video}, {s:g}, {e:g}] repeats (first at split '{first[0]}', "
                                     f"row {first[1]})", i)
        seen[(video, s, e)] = (split, i)
        by_video.setdefault(video, []).append((s, e, split, i))
    for video, segs in by_video.items():
        for rank, (_, _, split, i) in enumerate(sorted(segs, key=lambda t: (t[0], t[1]))):
            out[split].clips[i] = str(rank + 1)
    return out


def read_label_csv(path: Path, corpus: str) -> tuple[dict[tuple[str, int], dict[str, Any]], dict[tuple[str, int], str]]:
    """(video, clip number) -> {text, label_T/A/V}; and -> "<video>_<clip>" as the file spells it.
    Duplicate (video, clip) rows, missing columns and malformed ids are InputErrors naming the line."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    cols = reader.fieldnames or []
    for col in ("video_id", "clip_id", "text"):
        if col not in cols:
            raise InputError(path, f"missing column '{col}' (MMSA's label.csv: video_id, clip_id, text, label, "
                                   "annotation, mode)")
    lo, hi = label_range(corpus)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    names: dict[tuple[str, int], str] = {}
    first: dict[tuple[str, int], int] = {}
    try:
        for row in reader:
            line = reader.line_num
            video = check_id((row["video_id"] or "").strip(), "video id", f"{path}: line {line}")
            clip = (row["clip_id"] or "").strip()
            if not clip.isdigit():
                raise InputError(path, f"line {line}: clip_id {clip[:40]!r} is not a number")
            key = (video, int(clip))
            if key in rows:
                raise InputError(path, f"line {line}: (video {video}, clip {clip}) is also on line {first[key]}")
            entry: dict[str, Any] = {"text": (row["text"] or "").strip()}
            for u in UNIMODAL:
                col = f"label_{u}"
                if col in cols and (row.get(col) or "").strip():
                    v = _float(row[col].strip())
                    if v is None or not (lo <= v <= hi):
                        raise InputError(path, f"line {line}: {col} {row[col]!r} is outside [{lo:g}, {hi:g}]")
                    entry[col] = v
            rows[key], names[key], first[key] = entry, f"{video}_{clip}", line
    except csv.Error as e:
        raise InputError(path, f"line {reader.line_num}: not valid CSV ({e})") from None
    return rows, names


# ---------------------------------------------------------------------------- to the prepared dataset

def _real_steps(x: np.ndarray, length: int | None) -> np.ndarray:
    """The real steps of one padded sequence [L, D]: the first `length`, or the rows left after
    trimming all-zero rows at both ends (an all-zero sequence keeps all of them)."""
    if length is not None:
        return x[:length]
    nz = np.flatnonzero(np.any(x != 0, axis=1))
    if len(nz) == 0:
        return x
    return x[nz[0]:nz[-1] + 1]


def build_from_pickle(cfg: Config) -> tuple[PreparedDataset, dict[str, Any]]:
    """Read the configured pickle (and label.csv for MulT) into a prepared dataset, in memory."""
    fmt, corpus, T = cfg.data.format, cfg.data.corpus, cfg.data.seq_len
    if fmt not in PICKLE_FORMATS:
        raise InputError("data.format", f"{fmt!r} is not a pickle format ({' | '.join(PICKLE_FORMATS)})")
    path = pickle_file(cfg)
    sources = {"pickle": path}
    splits = read_mmsa(path, cfg) if fmt == "mmsa" else read_mult(path, cfg)
    dims = {m: int(splits["train"].av[m].shape[2]) for m in MODALITIES}
    for split in SPLITS:
        for m in MODALITIES:
            got = int(splits[split].av[m].shape[2])
            if got != dims[m]:
                raise _Where(path).err(split, FILE_KEY[m], f"is {got}-d, split 'train' has {dims[m]}-d")

    csv_rows: dict[tuple[str, int], dict[str, Any]] = {}
    csv_names: dict[tuple[str, int], str] = {}
    if fmt == "mult":
        sources["label_csv"] = label_csv_file(cfg)
        csv_rows, csv_names = read_label_csv(sources["label_csv"], corpus)

    seen: dict[str, tuple[str, int]] = {}
    order: list[tuple[str, int, str, int]] = []  # (video, clip number, split, row): the SDK path's order
    for split in SPLITS:
        sp = splits[split]
        for i, (video, clip) in enumerate(zip(sp.videos, sp.clips)):
            seg = f"{video}_{clip}"
            key_id = "id"
            if seg in seen:
                s0, i0 = seen[seg]
                raise _Where(path).err(split, key_id, f"segment {seg} repeats (first at split '{s0}', row {i0})", i)
            seen[seg] = (split, i)
            order.append((video, int(clip), split, i))
    order.sort()

    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    per_mod: dict[str, list] = {f"{m}{k}": [] for m in MODALITIES for k in ("", "_len", "_mask")}
    file_text: list[tuple[np.ndarray, np.ndarray]] | None = (
        [] if all(splits[s].text_feats is not None for s in SPLITS) else None)
    nonfinite = {m: 0 for m in MODALITIES}
    folds: dict[str, set[str]] = {s: set() for s in SPLITS}
    video_end: dict[str, float] = {}
    labelled_splits = {s: 0 for s in SPLITS}
    joined: set[tuple[str, int]] = set()
    for video, clip_n, split, i in order:
        sp = splits[split]
        seg = f"{video}_{sp.clips[i]}"
        labelled_splits[split] += 1
        folds[split].add(video)
        start = float(sp.start[i]) if sp.start is not None else 0.0
        end = float(sp.end[i]) if sp.end is not None else 0.0
        video_end[video] = max(video_end.get(video, 0.0), end)
        unimodal = {c: float(v[i]) for c, v in sp.unimodal.items()}
        if fmt == "mult":
            entry = csv_rows.get((video, clip_n))
            if entry is None:
                excluded.append({"segment_id": seg, "reason": f"no {sources['label_csv'].name} row"})
                continue
            joined.add((video, clip_n))
            text = entry["text"]
            unimodal.update({c: entry[c] for c in UNIMODAL_COLUMNS if c in entry})
        else:
            text = sp.texts[i]
        if not text:
            excluded.append({"segment_id": seg, "reason": "no transcript"})
            continue
        for m in MODALITIES:
            lens = sp.lengths[m]
            x = _real_steps(sp.av[m][i], int(lens[i]) if lens is not None else None).astype(np.float32)
            bad = ~np.isfinite(x)
            if bad.any():
                if cfg.data.nonfinite == "error":
                    raise _Where(path).err(split, FILE_KEY[m], f"segment {seg}: {int(bad.sum())} non-finite values "
                                                               "(data.nonfinite=error)", i)
                nonfinite[m] += int(bad.sum())
                x = np.where(bad, 0.0, x)
            pooled, mask = pool_or_pad(x, T)
            per_mod[m].append(pooled)
            per_mod[f"{m}_len"].append(int(sp.frames[m][i]) if m in sp.frames else len(x))
            per_mod[f"{m}_mask"].append(mask)
        if file_text is not None:  # the file's own text features, for `text_features.encoder: file`
            x = _real_steps(np.nan_to_num(sp.text_feats[i].astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0),
                            None)
            file_text.append(pool_or_pad(x, T))
        rows.append({"segment_id": seg, "video_id": video, "speaker_id": video, "split": split,
                     "label": float(sp.labels[i]), "text": text, "start": start, "end": end, **unimodal})
    if not rows:
        raise InputError(path, "no labelled segment with a transcript")
    orphans = sorted(csv_names[k] for k in set(csv_rows) - joined)
    if orphans and cfg.data.orphan_transcripts == "error":
        raise InputError(sources["label_csv"], f"{len(orphans)} row(s) for segments the pickle does not have, "
                                               f"e.g. {orphans[0]} (data.orphan_transcripts=error)")
    segments = pd.DataFrame(rows)
    arrays = stack_arrays(per_mod)
    if file_text is not None:
        arrays[FILE_TEXT] = np.stack([f for f, _ in file_text]).astype(np.float32)
        arrays[FILE_TEXT + "_mask"] = np.stack([m for _, m in file_text])
    manifest = {
        "corpus": corpus,
        "format": fmt,
        "av_simulated": False,
        "seq_len": T,
        "dims": dims,
        "n_labelled": sum(labelled_splits.values()),
        "labelled_splits": labelled_splits,
        "n_prepared": len(segments),
        "splits": {s: int((segments["split"] == s).sum()) for s in SPLITS},
        "excluded": excluded,
        "orphan_transcripts": orphans,
        "unfolded_videos": [],
        "unlabelled_fold_videos": [],
        "videos_in_several_splits": sorted(v for v in video_end if sum(v in folds[s] for s in SPLITS) > 1),
        "nonfinite": {"policy": cfg.data.nonfinite, **nonfinite},
        "folds": {s: sorted(folds[s]) for s in SPLITS},
        "video_end": video_end,
        "sources": {role: {"path": str(p), "sha256": file_sha256(p)} for role, p in sources.items()},
    }
    return PreparedDataset(segments, arrays, manifest), manifest


# ---------------------------------------------------------------------------- export

def token_ids(encoder: str, texts: list[str], L: int) -> np.ndarray:
    """[N, 3, L] float32: the encoder tokenizer's input ids, attention mask and token type ids
    (MMSA's text_bert; MMSA reads it as float32 and casts back)."""
    from psamf.models.encoders import load_tokenizer

    tok = load_tokenizer(encoder)
    enc = tok(texts, padding="max_length", truncation=True, max_length=L, return_tensors="np",
              return_token_type_ids=True)
    return np.stack([enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]], axis=1).astype(np.float32)


def annotation(label: float) -> str:
    return "Positive" if label > 0 else "Negative" if label < 0 else "Neutral"


def export_mmsa(cfg: Config, out: str | Path) -> dict[str, Any]:
    """Write the prepared corpus of data.corpus as an MMSA pickle MMSA's MMDataLoader reads unchanged.

    Per split: id "<video>$_$<clip>", raw_text, text = the text_features encoder's token states
    [N, T, H] (what `psamf loo` feeds MulT), text_bert [N, 3, T] = its tokenizer's ids/mask/segment ids,
    audio / vision [N, T, D] as prepared (pooled/padded, finite), audio_lengths / vision_lengths =
    the real steps (so use it as aligned or unaligned), regression_labels, annotations, SIMS's
    regression_labels_T/A/V when the corpus has them, and psamf's own psamf_* keys (frame counts
    before pooling, segment times: MMSA ignores them) so that ingesting it back is exact."""
    from psamf.data.prepared import load_prepared
    from psamf.data.text_features import text_features

    out = Path(out)
    ds = load_prepared(cfg.data.prepared_path)
    seg = ds.segments
    for sid, vid in zip(seg["segment_id"], seg["video_id"]):
        clip = sid[len(vid) + 1:] if sid.startswith(f"{vid}_") else ""
        if not clip.isdigit():
            raise InputError(cfg.data.prepared_path / "segments.parquet",
                             f"segment {sid} is not '<video_id>_<number>': MMSA's id needs a clip number")
    T = int(ds.arrays["audio"].shape[1])
    text, _, text_source = text_features(cfg, ds)
    bert = token_ids(cfg.text_features.encoder, seg["text"].tolist(), text.shape[1])
    data: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        idx = np.flatnonzero(seg["split"].to_numpy() == split)
        s = seg.iloc[idx]
        d: dict[str, Any] = {
            "id": np.array([f"{v}$_${sid[len(v) + 1:]}" for sid, v in zip(s["segment_id"], s["video_id"])], dtype=object),
            "raw_text": np.array(s["text"].tolist(), dtype=object),
            "text": text[idx].astype(np.float32),
            "text_bert": bert[idx],
            "audio": ds.arrays["audio"][idx].astype(np.float32),
            "vision": ds.arrays["visual"][idx].astype(np.float32),
            "audio_lengths": ds.arrays["audio_mask"][idx].sum(axis=1).astype(np.int64),
            "vision_lengths": ds.arrays["visual_mask"][idx].sum(axis=1).astype(np.int64),
            "regression_labels": s["label"].to_numpy(dtype=np.float64),
            "annotations": np.array([annotation(y) for y in s["label"]], dtype=object),
            "psamf_audio_len": ds.arrays["audio_len"][idx].astype(np.int64),
            "psamf_vision_len": ds.arrays["visual_len"][idx].astype(np.int64),
            "psamf_start": s["start"].to_numpy(dtype=np.float64),
            "psamf_end": s["end"].to_numpy(dtype=np.float64),
        }
        for u in UNIMODAL:
            if f"label_{u}" in s.columns:
                d[f"regression_labels_{u}"] = s[f"label_{u}"].to_numpy(dtype=np.float64)
        data[split] = d
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return {"corpus": cfg.data.corpus, "format": "mmsa", "out": str(out), "seq_len": T,
            "splits": {s: int(len(data[s]["id"])) for s in SPLITS},
            "dims": {"text": int(text.shape[2]), "audio": int(ds.arrays["audio"].shape[2]),
                     "vision": int(ds.arrays["visual"].shape[2])},
            "text_features": text_source, "av_simulated": ds.av_simulated}
