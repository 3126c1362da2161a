"""Where a corpus keeps its files, in the CMU Multimodal SDK's own naming.

Every corpus uses the same roles, so ingest reads them the same way:

    <dir>/<PREFIX>_Opinion_Labels.csd      segment labels; row i of a video = segment <video>_<i+1>
    <dir>/<PREFIX>_COVAREP.csd              acoustic frames (74-d)
    <dir>/<PREFIX>_Visual_Facet_41.csd      visual frames (35-d)
    <dir>/transcripts.csv                   id,text,label,mode
    <dir>/standard_folds.json               {"train": [video ids], "valid": [...], "test": [...]}

CMU-MOSEI's SDK download names some of these differently (FILE_NAMES):

    CMU_MOSEI_Labels.csd (or CMU_MOSEI_Opinion_Labels.csd)   7 columns: LABEL_COLUMNS["mosei"]
    CMU_MOSEI_VisualFacet42.csd                               FACET 4.2, 35-d
    CMU_MOSEI_TimestampedWords.csd                            one word per interval (bytes, "sp" =
                                                              silence); the text when there is no
                                                              transcripts.csv (see words_to_texts)
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from psamf.errors import InputError
from psamf.io import atomic_path, read_json, read_text

PREFIX = {"mosi": "CMU_MOSI", "mosei": "CMU_MOSEI", "synthetic": "PSAMF_SYNTH"}
ROLES = {"labels": "Opinion_Labels", "audio": "COVAREP", "visual": "Visual_Facet_41", "words": "TimestampedWords"}
# Names that differ from <PREFIX>_<ROLE>.csd, the SDK's own first (what psamf writes and prefers).
FILE_NAMES = {("mosei", "labels"): ("CMU_MOSEI_Labels.csd", "CMU_MOSEI_Opinion_Labels.csd"),
              ("mosei", "visual"): ("CMU_MOSEI_VisualFacet42.csd",)}
# Columns of a labels CSD; MOSEI's emotions are kept in the prepared data, models read only sentiment.
LABEL_COLUMNS = {"mosi": ("sentiment",), "synthetic": ("sentiment",),
                 "mosei": ("sentiment", "happy", "sad", "anger", "surprise", "disgust", "fear")}
SILENCE = "sp"  # the SDK's timestamped-words token for a pause
# Marks a CSD written by psamf's simulator; ingest carries it into every report.
SIMULATED_KEY = "psamf simulated"


def csd_names(corpus: str, role: str) -> tuple[str, ...]:
    return FILE_NAMES.get((corpus, role), (f"{PREFIX[corpus]}_{ROLES[role]}.csd",))


def csd_name(corpus: str, role: str) -> str:
    return csd_names(corpus, role)[0]


def find_csd(directory: Path, corpus: str, role: str) -> Path:
    """The first of the role's names present in `directory`; InputError naming every name if none is."""
    names = csd_names(corpus, role)
    for name in names:
        if (directory / name).is_file():
            return directory / name
    if len(names) == 1:
        raise InputError(directory / names[0], "file not found")
    raise InputError(directory, f"no {role} CSD: neither {' nor '.join(names)} is here")


def write_transcripts(path: Path, rows: list[tuple[str, str, float, str]]) -> None:
    """rows: (segment id, text, label, mode) with mode train/dev/test, as in MOSI's file."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "text", "label", "mode"])
        for seg, text, label, mode in rows:
            w.writerow([seg, text, f"{label:g}", mode])


def read_transcripts(path: Path) -> dict[str, str]:
    """segment id -> text. A missing file or column, bytes that are not UTF-8, a malformed id or
    an id given twice (agreeing or not) is an InputError naming the file and the line."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    for col in ("id", "text"):
        if col not in (reader.fieldnames or []):
            raise InputError(path, f"missing column '{col}'")
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        for row in reader:
            seg = check_id(row["id"], "segment id", f"{path}: line {reader.line_num}")
            if seg in out:
                raise InputError(path, f"segment {seg} appears twice (lines {first_line[seg]} and {reader.line_num})")
            out[seg] = (row["text"] or "").strip()
            first_line[seg] = reader.line_num
    except csv.Error as e:
        raise InputError(path, f"line {reader.line_num}: not valid CSV ({e})") from None
    return out


def words_to_texts(words: dict[str, tuple[np.ndarray, np.ndarray]],
                   segments: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, str]:
    """segment id -> text, from the SDK's timestamped words (MOSEI ships no transcripts.csv).

    A word belongs to the segment whose [start, end) holds its interval's midpoint, so a word on
    a boundary lands in one segment only; "sp" (silence) is dropped. `segments` is the labels'
    {video: (features, intervals)}, `words` the words CSD's {video: (words (n, 1), intervals)}."""
    out: dict[str, str] = {}
    for vid, (_, ivals) in segments.items():
        if vid not in words:
            continue
        tokens, w_ivals = words[vid]
        mid = (w_ivals[:, 0] + w_ivals[:, 1]) / 2
        for i, (start, end) in enumerate(ivals):
            keep = np.flatnonzero((mid >= start) & (mid < end))
            text = " ".join(t for t in (str(tokens[j, 0]).strip() for j in keep) if t and t != SILENCE)
            if text:
                out[f"{vid}_{i + 1}"] = text
    return out


# A video or segment id becomes part of file and directory names (models/pretrain/<user>/...).
_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")  # YouTube ids may start with _ or -


def check_id(value: object, kind: str, where: str | Path) -> str:
    """`value` if it is a safe id (letters, digits, '_', '-', '.'; 1-128 chars; no '..'), else an
    InputError naming where it came from: ids are used in file names, so none may escape a dir."""
    if not isinstance(value, str) or not _ID.fullmatch(value) or ".." in value:
        shown = repr(value)[:60]
        raise InputError(where, f"{kind} {shown} is not a safe id (letters, digits, _ - . only, 1-128 chars, not starting with '.', no '..')")
    return value


def read_folds(path: Path) -> dict[str, list[str]]:
    folds = read_json(path)
    if "dev" in folds and "valid" not in folds:  # some SDK dumps say dev
        folds["valid"] = folds.pop("dev")
    for split in ("train", "valid", "test"):
        if not isinstance(folds.get(split), list):
            raise InputError(path, f"missing fold '{split}' (a list of video ids)")
    seen: dict[str, str] = {}
    for split in ("train", "valid", "test"):
        for vid in folds[split]:
            check_id(vid, "video id", f"{path}: fold '{split}'")
            if vid in seen:
                where = f"twice in '{split}'" if seen[vid] == split else f"in both '{seen[vid]}' and '{split}'"
                raise InputError(path, f"video {vid} is {where}")
            seen[vid] = split
    return {s: list(folds[s]) for s in ("train", "valid", "test")}
