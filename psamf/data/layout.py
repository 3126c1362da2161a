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
from pathlib import Path

from psamf.errors import InputError
from psamf.io import atomic_path, read_json

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
    """segment id -> text. Missing file or column is an InputError naming it."""
    if not path.is_file():
        raise InputError(path, "file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for col in ("id", "text"):
            if col not in (reader.fieldnames or []):
                raise InputError(path, f"missing column '{col}'")
        return {row["id"]: (row["text"] or "").strip() for row in reader}


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
            if vid in seen:
                raise InputError(path, f"video {vid} is in both '{seen[vid]}' and '{split}'")
            seen[vid] = split
    return {s: list(folds[s]) for s in ("train", "valid", "test")}
