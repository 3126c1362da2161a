"""`psamf data synth`: the offline default corpus, written in the real SDK layout.

S speakers each have latent Big Five traits in [0, 1]. A segment has a true sentiment y
in [-3, 3]; each modality m shows the speaker's *expressed* sentiment

    e_m = offset_m(traits) + intensity_m(traits) * y

so the same y looks different from person to person, and differently in words, face
and voice. That is the effect personalization (User Adapter, personality alignment)
has to find:

    text   offset 1.2*(agreeableness - .5)     intensity 0.6 + 0.8*openness
    face   offset 1.0*(extraversion - .5)      intensity 0.3 + 1.4*extraversion
    voice  offset 1.0*(stability - .5)         intensity 0.3 + 1.2*(1 - stability)

("stability" is the trait First Impressions files under `neuroticism`; see
psamf.data.first_impressions.) Same seed and config -> byte-identical files.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import lfilter

from psamf.config import Config
from psamf.data.csd import ComputationalSequence, write_csd
from psamf.data.layout import csd_name, write_transcripts
from psamf.data.first_impressions import FI_DIRNAME, TRAITS, write_synthetic_personality_corpus
from psamf.io import atomic_dir, write_json

# Sentiment words by intensity bucket; a general-purpose text encoder already knows them.
WORDS = {
    -3: ["terrible", "awful", "horrible", "hated", "worst", "disgusting", "pathetic"],
    -2: ["bad", "boring", "disappointing", "annoying", "stupid", "waste"],
    -1: ["weak", "mediocre", "slow", "confusing", "dull", "forgettable"],
    1: ["decent", "okay", "fine", "nice", "pleasant", "watchable"],
    2: ["good", "great", "enjoyable", "fun", "funny", "solid"],
    3: ["amazing", "fantastic", "excellent", "brilliant", "loved", "awesome", "perfect"],
}
FILLER = ["the movie", "i think", "it was", "the plot", "the actors", "and", "but", "the story",
          "this scene", "the characters", "um", "you know", "the ending", "honestly", "the director",
          "i mean", "uh", "the music", "overall", "like"]
INTENSIFIERS = ["really", "so", "very", "totally"]


def expression_params(traits: np.ndarray) -> dict[str, tuple[float, float]]:
    """(offset, intensity) per modality from traits ordered as TRAITS."""
    ext, stab, agr, _con, opn = (float(t) for t in traits)
    return {
        "text": (1.2 * (agr - 0.5), 0.6 + 0.8 * opn),
        "visual": (1.0 * (ext - 0.5), 0.3 + 1.4 * ext),
        "audio": (1.0 * (stab - 0.5), 0.3 + 1.2 * (1.0 - stab)),
    }


def video_id(rng: np.random.Generator) -> str:
    alphabet = np.array(list(string.ascii_letters + string.digits + "-_"))
    return "".join(rng.choice(alphabet, 11))


def sample_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """MOSI-like labels: means of 5 ratings, so multiples of 0.2 in [-3, 3], a few exact zeros."""
    y = np.clip(rng.normal(0.1, 1.5, n), -3, 3)
    return np.round(y * 5) / 5


def words_for(rng: np.random.Generator, expressed: float, intensity: float) -> str:
    """A transcript whose sentiment words follow the *expressed* sentiment, with noise."""
    tokens = list(rng.choice(FILLER, rng.integers(4, 10)))
    n_sent = 1 + int(abs(expressed) > 1.5)
    for _ in range(n_sent):
        bucket = int(np.clip(np.round(expressed + rng.normal(0, 0.6)), -3, 3))
        if bucket == 0:
            continue
        word = str(rng.choice(WORDS[bucket]))
        if rng.random() < 0.3 * intensity:
            word = f"{rng.choice(INTENSIFIERS)} {word}"
        tokens.insert(int(rng.integers(0, len(tokens) + 1)), word)
    return " ".join(tokens)


def render_stream(rng: np.random.Generator, duration: float, hz: int, dim: int,
                  seg_bounds: np.ndarray, seg_cue: np.ndarray, speaker_mean: np.ndarray,
                  cue_dirs: np.ndarray, ar: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Frames at `hz` over [0, duration]: speaker mean + AR(1) noise + a per-segment cue.

    seg_bounds (S, 2) seconds; seg_cue (S,) the cue during each segment (0 between them);
    cue_dirs (dim,) how the cue spreads over feature dims. Returns (features, intervals).
    """
    n = max(1, int(np.ceil(duration * hz)))
    starts = np.arange(n, dtype=np.float64) / hz
    intervals = np.stack([starts, starts + 1.0 / hz], axis=1).astype(np.float32)
    white = rng.standard_normal((n, dim))
    noise = lfilter([np.sqrt(1 - ar**2)], [1.0, -ar], white, axis=0)
    mid = starts + 0.5 / hz
    idx = np.searchsorted(seg_bounds[:, 0], mid, side="right") - 1
    inside = (idx >= 0) & (mid < seg_bounds[np.clip(idx, 0, None), 1])
    cue = np.where(inside, seg_cue[np.clip(idx, 0, None)], 0.0)
    feats = speaker_mean[None, :] + noise + cue[:, None] * cue_dirs[None, :]
    return feats.astype(np.float32), intervals


def cue_direction(rng: np.random.Generator, dim: int, active: int) -> np.ndarray:
    """A fixed direction over `active` dims: the only place a sentiment cue lives."""
    d = np.zeros(dim)
    d[:active] = rng.normal(0, 1, active)
    return d / np.linalg.norm(d)


def write_synthetic_corpus(cfg: Config, out: str | Path | None = None) -> dict[str, Any]:
    """Write the complete synthetic corpus to `out` (default <raw_dir>/synthetic)."""
    sc, dc = cfg.synth, cfg.data
    out = Path(out) if out else Path(dc.raw_dir) / "synthetic"
    rng = np.random.default_rng(sc.seed)
    dirs = {"audio": cue_direction(rng, dc.audio_dim, 8), "visual": cue_direction(rng, dc.visual_dim, 6)}
    hz = {"audio": sc.audio_hz, "visual": sc.visual_hz}
    dims = {"audio": dc.audio_dim, "visual": dc.visual_dim}
    labels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    streams: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"audio": {}, "visual": {}}
    transcript_rows: list[tuple[str, str, float, str]] = []
    speakers: list[dict[str, Any]] = []
    vids = []
    while len(vids) < sc.n_speakers:  # unique ids, still a pure function of the seed
        v = video_id(rng)
        if v not in vids:
            vids.append(v)
    n_train = int(round(sc.split[0] * sc.n_speakers))
    n_valid = int(round(sc.split[1] * sc.n_speakers))
    folds = {"train": vids[:n_train], "valid": vids[n_train:n_train + n_valid], "test": vids[n_train + n_valid:]}
    mode_of = {v: {"train": "train", "valid": "dev", "test": "test"}[s] for s, vs in folds.items() for v in vs}
    for vid in vids:
        traits = rng.beta(2.0, 2.0, len(TRAITS))
        expr = expression_params(traits)
        n = int(rng.integers(sc.segments_min, sc.segments_max + 1))
        y = sample_labels(rng, n)
        durations = rng.uniform(2.0, 6.0, n)
        gaps = rng.uniform(0.1, 0.6, n)
        starts = np.cumsum(np.concatenate([[0.5], (durations + gaps)[:-1]]))
        bounds = np.stack([starts, starts + durations], axis=1)
        video_end = float(bounds[-1, 1] + 0.5)
        labels[vid] = (y[:, None].astype(np.float32), bounds.astype(np.float32))
        for i in range(n):
            off, gain = expr["text"]
            transcript_rows.append((f"{vid}_{i + 1}", words_for(rng, off + gain * y[i], gain), float(y[i]), mode_of[vid]))
        for m in ("audio", "visual"):
            off, gain = expr[m]
            mean = rng.normal(0, 0.5, dims[m])
            feats, ivals = render_stream(rng, video_end, hz[m], dims[m], bounds, (off + gain * y) * 0.35, mean, dirs[m])
            if m == "audio":
                # COVAREP emits -inf for some frames (log-energy of silence); keep that quirk.
                feats[rng.random(len(feats)) < 0.002, dims[m] - 1] = -np.inf
            streams[m][vid] = (feats, ivals)
        speakers.append({"speaker_id": vid, **{t: round(float(v), 6) for t, v in zip(TRAITS, traits)},
                         **{f"{m}_{k}": round(v, 6) for m, (o, g) in expr.items() for k, v in (("offset", o), ("intensity", g))}})

    meta = {"dataset name": "psamf-synthetic", "dataset version": "1.0", "creator": "psamf data synth",
            "psamf seed": sc.seed}
    with atomic_dir(out) as tmp:
        write_csd(tmp / csd_name("synthetic", "labels"), ComputationalSequence(
            "Opinion Segment Labels", labels, {**meta, "dimension names": ["sentiment score"]}))
        for m, root in (("audio", "COVAREP"), ("visual", "FACET 4.1")):
            write_csd(tmp / csd_name("synthetic", m), ComputationalSequence(root, streams[m], dict(meta)))
        write_transcripts(tmp / "transcripts.csv", transcript_rows)
        write_json(tmp / "standard_folds.json", folds)
        write_json(tmp / "speakers.json", speakers)
        write_synthetic_personality_corpus(tmp / FI_DIRNAME, sc.personality_clips, sc.seed)
    return {"corpus": "synthetic", "out": str(out), "speakers": len(vids),
            "segments": len(transcript_rows), "folds": {k: len(v) for k, v in folds.items()}}


def file_digests(root: str | Path) -> dict[str, str]:
    """sha256 per file under root (relative names): the determinism check and data hash."""
    import hashlib

    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}

