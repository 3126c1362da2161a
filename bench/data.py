"""Ingest + validate wall time and peak RSS, on `mosi` (real labels/text, simulated AV) and
on the demo synthetic corpus. Target: mosi in 30 s or less on 2 cores.

    python -m bench.data                 # both corpora -> bench/results/data.json
Tracking is off here (PSAMF_TRACKING=off is set by main): this measures the data work itself.
Each corpus runs in its own process so its peak RSS is its own.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from bench.common import peak_rss_mib, run_isolated, save

TARGET_MOSI_S = 30.0


def measure(corpus: str, workdir: str) -> dict:
    """Prepare the raw corpus (not timed), then time ingest and validate."""
    from psamf.config import load_config
    from psamf.data.ingest import ingest
    from psamf.validation import validate

    cfg = load_config("params.yaml", "demo", [f"data.corpus={corpus}", f"data.raw_dir={workdir}/raw",
                                              f"data.prepared_dir={workdir}/prepared"])
    if corpus == "synthetic":
        from psamf.data.synth import write_synthetic_corpus
        write_synthetic_corpus(cfg)
    else:
        from psamf.data.mosi import simulate_av
        simulate_av(cfg)
    t0 = time.perf_counter()
    report = ingest(cfg)
    t1 = time.perf_counter()
    result = validate(cfg, f"{workdir}/validation")
    t2 = time.perf_counter()
    return {"corpus": corpus, "segments": report["n_prepared"], "av_simulated": report["av_simulated"],
            "ingest_s": round(t1 - t0, 2), "validate_s": round(t2 - t1, 2),
            "ingest_validate_s": round(t2 - t0, 2), "validation_passed": result.success,
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def main() -> None:
    os.environ["PSAMF_TRACKING"] = "off"
    runs = {c: run_isolated("bench.data", "--one", c) for c in ("mosi", "synthetic")}
    mosi = runs["mosi"]["ingest_validate_s"]
    path = save("data", {"runs": runs, "target": {"mosi_ingest_validate_s": TARGET_MOSI_S},
                         "met": mosi <= TARGET_MOSI_S})
    print(json.dumps(runs, indent=2), f"\n-> {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(measure(sys.argv[2], d)))
    else:
        main()
