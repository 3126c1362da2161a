"""CMU-MOSI (and CMU-MOSEI): real labels, transcripts and folds; simulated acoustic/visual features.

Real COVAREP/FACET features for MOSI are not available offline, so `psamf data
simulate-av` writes stand-ins as genuine SDK CSDs (same roots, dims and timing), marked
with the metadata key `psamf simulated`. Ingest carries that flag into the manifest and
every report. Drop the SDK's real `CMU_MOSI_COVAREP.csd` / `CMU_MOSI_Visual_Facet_41.csd`
next to the labels and they are read instead. `--corpus mosei` does the same for a MOSEI
download that lacks `CMU_MOSEI_COVAREP.csd` / `CMU_MOSEI_VisualFacet42.csd` (the cue uses
label column 0, sentiment).

Calibration: each segment gets a cue `signal * (y + noise)`, with noise sd 2.0 on the
label scale, plus a per-speaker bias, spread over a few feature dims and buried in AR(1)
frame noise. A linear probe on the segment means then gets a weak correlation with the
label, like real MOSI audio/visual alone, and the label cannot be read back from the features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from psamf.config import Config
from psamf.data.csd import ComputationalSequence, read_csd, write_csd
from psamf.data.layout import SIMULATED_KEY, csd_name, find_csd
from psamf.data.synth import cue_direction, render_stream
from psamf.errors import InputError
from psamf.io import atomic_dir

CUE_NOISE = 2.0      # per-segment noise on the label scale: what keeps the cue weak
SPEAKER_BIAS = 0.8   # per-speaker shift along the cue direction, unrelated to sentiment


# Per corpus: the SDK's dataset name and the FACET version of its visual CSD's root.
SIMULATED_NAMES = {"mosi": ("CMU-MOSI", "FACET 4.1"), "mosei": ("CMU-MOSEI", "FACET 4.2")}


def simulate_av(cfg: Config, out: str | Path | None = None) -> dict[str, Any]:
    """Write simulated COVAREP (audio) and FACET (visual) CSDs for the label CSD of data.corpus
    (mosi or mosei), into `out` (default <raw_dir>/<corpus>)."""
    sim, dc = cfg.simulate, cfg.data
    corpus = dc.corpus
    if corpus not in SIMULATED_NAMES:
        raise InputError("data.corpus", f"simulate-av is for {' | '.join(SIMULATED_NAMES)}, not {corpus!r}")
    labels = read_csd(find_csd(dc.sdk_path, corpus, "labels"))
    out = Path(out) if out else dc.raw_path
    rng = np.random.default_rng(sim.seed)
    dims = {"audio": dc.audio_dim, "visual": dc.visual_dim}
    hz = {"audio": sim.audio_hz, "visual": sim.visual_hz}
    dirs = {"audio": cue_direction(rng, dims["audio"], 8), "visual": cue_direction(rng, dims["visual"], 6)}
    streams: dict[str, dict] = {"audio": {}, "visual": {}}
    for vid in tqdm(sorted(labels.data), desc="simulate-av", unit="video", leave=False):
        y = labels.data[vid][0][:, 0].astype(np.float64)
        bounds = labels.data[vid][1].astype(np.float64)
        order = np.argsort(bounds[:, 0], kind="stable")  # render_stream needs sorted starts
        duration = float(bounds[:, 1].max()) + 1.0
        for m in ("audio", "visual"):
            cue = sim.signal * (y + rng.normal(0, CUE_NOISE, len(y))) + rng.normal(0, SPEAKER_BIAS)
            feats, ivals = render_stream(rng, duration, hz[m], dims[m], bounds[order], cue[order],
                                         rng.normal(0, 0.5, dims[m]), dirs[m])
            if m == "audio":
                feats[rng.random(len(feats)) < 0.002, dims[m] - 1] = -np.inf  # COVAREP's -inf quirk
            streams[m][vid] = (feats, ivals)
    dataset, facet = SIMULATED_NAMES[corpus]
    meta = {"dataset name": dataset, "creator": "psamf data simulate-av", SIMULATED_KEY: True,
            "psamf seed": sim.seed, "computational sequence description":
                "SIMULATED stand-in features (not real COVAREP/FACET); see psamf.data.mosi"}
    with atomic_dir(out) as tmp:
        write_csd(tmp / csd_name(corpus, "audio"), ComputationalSequence("COVAREP", streams["audio"], meta))
        write_csd(tmp / csd_name(corpus, "visual"), ComputationalSequence(facet, streams["visual"], meta))
    return {"corpus": corpus, "out": str(out), "videos": len(labels.data), "simulated": True,
            "audio_hz": sim.audio_hz, "visual_hz": sim.visual_hz}
