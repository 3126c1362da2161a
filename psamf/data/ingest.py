"""`psamf data ingest`: SDK corpus -> prepared dataset (segments table + aligned arrays).

Reads the labels CSD (one row per labelled segment), transcripts and folds, cuts the
COVAREP and FACET sequences to each segment's interval, applies the explicit policy for
non-finite frames (COVAREP has -inf), and pools/pads to T steps. Segments with no
transcript are reported and excluded by name, never dropped silently.

CMU-MOSEI (`data.corpus: mosei`, files in `data.mosei_dir`): sentiment is label column 0; the six
emotion columns become `emo_<name>` columns of the segments table, which no model reads. Without
a transcripts.csv the text comes from the SDK's TimestampedWords (layout.words_to_texts). The
SDK's folds leave some labelled videos out and name two unlabelled ones: for MOSEI both are
listed in the manifest (`unfolded_videos`, `unlabelled_fold_videos`); a fold video that no
input file has is an error for every corpus.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from psamf.config import CORPORA, PICKLE_FORMATS, REAL_CORPORA, Config
from psamf.data.align import frames_in, pool_or_pad
from psamf.data.csd import ComputationalSequence, read_csd
from psamf.data.layout import (LABEL_COLUMNS, SIMULATED_KEY, csd_name, find_csd, read_folds, read_transcripts,
                               words_to_texts)
from psamf.data.prepared import MODALITIES, PreparedDataset, save_prepared, stack_arrays
from psamf.errors import InputError
from psamf.fingerprint import file_sha256

log = logging.getLogger(__name__)


@dataclass
class CorpusSources:
    labels: Path
    audio: Path
    visual: Path
    transcripts: Path  # transcripts.csv, or MOSEI's TimestampedWords CSD when there is none
    folds: Path


# Labelled videos in no fold: an error, except where the SDK's own folds leave some out (MOSEI's 66).
UNFOLDED_OK = ("mosei",)


def corpus_sources(cfg: Config) -> CorpusSources:
    """Where each input lives. For a real corpus, AV CSDs in its SDK dir win over simulated ones."""
    corpus = cfg.data.corpus
    if corpus == "synthetic":
        d = cfg.data.raw_path
        return CorpusSources(*(d / csd_name(corpus, r) for r in ("labels", "audio", "visual")),
                             d / "transcripts.csv", d / "standard_folds.json")
    if corpus not in REAL_CORPORA:
        if corpus in CORPORA:
            raise InputError("data.corpus", f"{corpus} has no SDK download: read it from MMSA's or MulT's pickle "
                                            f"(data.format: {' | '.join(PICKLE_FORMATS)})")
        raise InputError("data.corpus", f"unknown corpus {corpus!r} ({' | '.join(CORPORA)})")
    sdk, sim = cfg.data.sdk_path, cfg.data.raw_path
    labels = find_csd(sdk, corpus, "labels")
    av = {role: _av_path(sdk, sim, corpus, role) for role in ("audio", "visual")}
    return CorpusSources(labels, av["audio"], av["visual"], _text_path(sdk, corpus), sdk / "standard_folds.json")


def _av_path(sdk: Path, sim: Path, corpus: str, role: str) -> Path:
    name = csd_name(corpus, role)
    for path in (sdk / name, sim / name):
        if path.is_file():
            return path
    raise InputError(sdk / name, f"no {role} CSD here or in {sim}; run `psamf data simulate-av --corpus {corpus}` "
                                 "or put the SDK's file there")


def _text_path(sdk: Path, corpus: str) -> Path:
    csv_path = sdk / "transcripts.csv"
    if corpus != "mosei" or csv_path.is_file():
        return csv_path
    words = sdk / csd_name(corpus, "words")
    if not words.is_file():
        raise InputError(sdk, f"no text: neither transcripts.csv nor {words.name} is here")
    return words


def _read_texts(src: CorpusSources, labels: ComputationalSequence, cap: int) -> dict[str, str]:
    if src.transcripts.suffix != ".csd":
        return read_transcripts(src.transcripts)
    words = read_csd(src.transcripts, set(labels.data), cap, text=True)
    return words_to_texts(words.data, labels.data)


def _check_label_columns(labels: ComputationalSequence, path: Path, corpus: str) -> None:
    want = LABEL_COLUMNS[corpus]
    for vid, (feats, _) in labels.data.items():
        if feats.shape[1] != len(want):
            raise InputError(path, f"data/{vid}/features has {feats.shape[1]} column(s); {corpus} labels have "
                                   f"{len(want)} ({', '.join(want)})")


def _unlabelled_fold_videos(folds: dict[str, list[str]], path: Path, labels: ComputationalSequence,
                            streams: dict[str, ComputationalSequence]) -> list[str]:
    """Fold videos without labels (MOSEI's folds name two); one that no input file has is an error."""
    out = []
    for split, vids in folds.items():
        for vid in vids:
            if vid in labels.data:
                continue
            if not any(vid in seq.data for seq in streams.values()):
                raise InputError(path, f"fold '{split}': video {vid} is in no input file (labels, audio, visual)")
            out.append(vid)
    return sorted(out)


def _check_dim(seq: ComputationalSequence, path: Path, want: int) -> None:
    if seq.dim != want:
        raise InputError(path, f"features are {seq.dim}-d, config expects {want} (data.*_dim)")


def build_prepared(cfg: Config, src: CorpusSources) -> tuple[PreparedDataset, dict[str, Any]]:
    """Everything ingest computes, in memory; `ingest` adds the atomic write."""
    T = cfg.data.seq_len
    cap = cfg.data.max_csd_mb << 20
    corpus = cfg.data.corpus
    labels = read_csd(src.labels, max_bytes=cap)
    _check_label_columns(labels, src.labels, corpus)
    emotions = LABEL_COLUMNS[corpus][1:]
    folds = read_folds(src.folds)
    split_of = {v: s for s, vs in folds.items() for v in vs}
    unfolded = sorted(set(labels.data) - set(split_of)) if corpus in UNFOLDED_OK else []
    for vid in unfolded:
        del labels.data[vid]
    videos = set(labels.data) | set(split_of)
    streams = {"audio": read_csd(src.audio, videos, cap), "visual": read_csd(src.visual, videos, cap)}
    unlabelled = _unlabelled_fold_videos(folds, src.folds, labels, streams)
    transcripts = _read_texts(src, labels, cap)
    # Transcript rows for segments no label names: a wrong file, or ids that drifted.
    labelled = {f"{v}_{i + 1}" for v, (f, _) in labels.data.items() for i in range(len(f))}
    orphans = sorted(set(transcripts) - labelled)
    if orphans and cfg.data.orphan_transcripts == "error":
        raise InputError(src.transcripts, f"{len(orphans)} row(s) for segments with no label, e.g. {orphans[0]} "
                                          "(data.orphan_transcripts=error)")
    _check_dim(streams["audio"], src.audio, cfg.data.audio_dim)
    _check_dim(streams["visual"], src.visual, cfg.data.visual_dim)

    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    per_mod: dict[str, list] = {f"{m}{k}": [] for m in MODALITIES for k in ("", "_len", "_mask")}
    nonfinite = {m: 0 for m in MODALITIES}
    video_end: dict[str, float] = {}
    labelled_splits = {s: 0 for s in ("train", "valid", "test")}
    for vid in tqdm(sorted(labels.data), desc="ingest", unit="video", leave=False):
        feats, ivals = labels.data[vid]
        if vid not in split_of:
            raise InputError(src.folds, f"video {vid} has labels but is in no fold")
        for m in MODALITIES:
            if vid not in streams[m].data:
                raise InputError(getattr(src, m), f"video {vid} is missing (labels have it)")
        video_end[vid] = float(max(streams[m].data[vid][1][:, 1].max() for m in MODALITIES))
        for i in range(len(feats)):
            labelled_splits[split_of[vid]] += 1
            seg = f"{vid}_{i + 1}"
            start, end = float(ivals[i, 0]), float(ivals[i, 1])
            text = transcripts.get(seg, "")
            if not text:
                excluded.append({"segment_id": seg, "reason": "no transcript"})
                continue
            for m in MODALITIES:
                m_feats, m_ivals = streams[m].data[vid]
                x = m_feats[frames_in(m_ivals, start, end)]
                bad = ~np.isfinite(x)
                if bad.any():
                    if cfg.data.nonfinite == "error":
                        raise InputError(getattr(src, m), f"segment {seg}: {int(bad.sum())} non-finite values "
                                                          "(data.nonfinite=error)")
                    nonfinite[m] += int(bad.sum())
                    x = np.where(bad, 0.0, x)
                pooled, mask = pool_or_pad(x, T)
                per_mod[m].append(pooled)
                per_mod[f"{m}_len"].append(len(x))
                per_mod[f"{m}_mask"].append(mask)
            rows.append({"segment_id": seg, "video_id": vid, "speaker_id": vid, "split": split_of[vid],
                         "label": float(feats[i, 0]), "text": text, "start": start, "end": end,
                         **{f"emo_{e}": float(feats[i, j + 1]) for j, e in enumerate(emotions)}})
    if not rows:
        raise InputError(src.labels, "no labelled segment with a transcript")
    segments = pd.DataFrame(rows)
    arrays = stack_arrays(per_mod)
    av_simulated = any(bool(streams[m].metadata.get(SIMULATED_KEY)) for m in MODALITIES)
    manifest = {
        "corpus": cfg.data.corpus,
        "format": "sdk",
        "av_simulated": av_simulated,
        "seq_len": T,
        "dims": {"audio": cfg.data.audio_dim, "visual": cfg.data.visual_dim},
        "n_labelled": sum(labelled_splits.values()),
        "labelled_splits": labelled_splits,
        "n_prepared": len(segments),
        "splits": {s: int((segments["split"] == s).sum()) for s in ("train", "valid", "test")},
        "excluded": excluded,
        "orphan_transcripts": orphans,
        "unfolded_videos": unfolded,
        "unlabelled_fold_videos": unlabelled,
        "nonfinite": {"policy": cfg.data.nonfinite, **nonfinite},
        "folds": folds,
        "video_end": video_end,
        "sources": {role: {"path": str(p), "sha256": file_sha256(p)} for role, p in vars(src).items()},
    }
    return PreparedDataset(segments, arrays, manifest), manifest


def ingest(cfg: Config, *, text_features: bool = False) -> dict[str, Any]:
    """Build and atomically write <prepared_dir>/<corpus>/; returns a JSON-able report.
    data.format mmsa | mult reads MMSA's / MulT's pickle instead (psamf.data.pickles).
    `text_features`: also fill the text-feature cache (text_features.cache_dir), inside the stage's
    run: the pipeline's ingest task does, so that every later task reads the features."""
    from psamf import tracking
    from psamf.data.pickles import build_from_pickle

    src = corpus_sources(cfg) if cfg.data.format not in PICKLE_FORMATS else None
    with tracking.stage_run(cfg, "ingest"):
        ds, manifest = build_prepared(cfg, src) if src is not None else build_from_pickle(cfg)
        out = save_prepared(ds, cfg.data.prepared_path)
        tracking.set_tags({"av_simulated": manifest["av_simulated"]})
        tracking.log_metrics({"n_labelled": manifest["n_labelled"], "n_prepared": manifest["n_prepared"],
                              "n_excluded": len(manifest["excluded"]),
                              "n_orphan_transcripts": len(manifest["orphan_transcripts"]),
                              **{f"nonfinite_{m}": manifest["nonfinite"][m] for m in MODALITIES}})
        tracking.log_artifact(out / "manifest.json", "ingest")
        if text_features:
            from psamf.data.prepared import load_prepared
            from psamf.data.text_features import text_features as compute_text_features

            compute_text_features(cfg, load_prepared(out))
    for e in manifest["excluded"]:
        log.warning("excluded %s: %s", e["segment_id"], e["reason"])
    text_src = src.transcripts if src is not None else manifest["sources"].get("label_csv", {}).get("path")
    for seg in manifest["orphan_transcripts"]:
        log.warning("%s: row for segment %s, which has no label (ignored)", text_src, seg)
    for key, what in (("unfolded_videos", "has labels but is in no fold (ignored)"),
                      ("unlabelled_fold_videos", "is in a fold but has no labels (ignored)")):
        for vid in manifest[key]:
            log.warning("%s: video %s %s", src.folds if src is not None else "folds", vid, what)
    return {k: manifest[k] for k in ("corpus", "format", "av_simulated", "n_labelled", "labelled_splits", "n_prepared", "splits",
                                      "excluded", "orphan_transcripts", "unfolded_videos", "unlabelled_fold_videos",
                                      "nonfinite", "dims")} | {"videos": len(manifest["video_end"]),
                                                                   "out": str(out)}
