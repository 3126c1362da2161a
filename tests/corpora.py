"""The smoke corpus most test modules start from: config, synthetic SDK files, prepared dataset."""
from __future__ import annotations

from pathlib import Path

from psamf.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


def smoke_corpus(overrides: list[str]) -> Config:
    """Load the smoke profile with `overrides`, write the synthetic corpus and ingest it."""
    from psamf.data.ingest import ingest
    from psamf.data.synth import write_synthetic_corpus

    cfg = load_config(REPO / "params.yaml", "smoke", overrides)
    write_synthetic_corpus(cfg)
    ingest(cfg)
    return cfg
