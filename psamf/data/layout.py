"""Where a corpus keeps its files, in the CMU Multimodal SDK's own naming.

Both corpora use the same roles, so ingest reads them the same way:

    <dir>/<PREFIX>_Opinion_Labels.csd      segment labels; row i of a video = segment <video>_<i+1>
    <dir>/<PREFIX>_COVAREP.csd              acoustic frames (74-d)
    <dir>/<PREFIX>_Visual_Facet_41.csd      visual frames (35-d)
    <dir>/transcripts.csv                   id,text,label,mode
    <dir>/standard_folds.json               {"train": [video ids], "valid": [...], "test": [...]}
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from psamf.errors import InputError
from psamf.io import atomic_path, read_json, read_text

PREFIX = {"mosi": "CMU_MOSI", "synthetic": "PSAMF_SYNTH"}
ROLES = {"labels": "Opinion_Labels", "audio": "COVAREP", "visual": "Visual_Facet_41"}
# Marks a CSD written by psamf's simulator; ingest carries it into every report.
SIMULATED_KEY = "psamf simulated"


def csd_name(corpus: str, role: str) -> str:
    return f"{PREFIX[corpus]}_{ROLES[role]}.csd"


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
