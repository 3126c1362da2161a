"""PSA-MF design decisions re-measured on VALID MAE only: corpus `mosi` (real labels, transcripts and
folds; SIMULATED acoustic/visual features), demo profile, CPU.

Each decision that bench/DECISIONS.md once settled by a test-split number is re-run here as the
default config against one variant that flips that decision, over --seeds (paired by seed), and
compared on the valid split alone (best epoch's valid MAE, what train selects the epoch on). The
test split is dropped from the prepared data before anything trains, so no number here can be a
test number.

    decision              default (ours)   variant
    prefusion_text        tokens           cls          (the paper's literal [CLS_s, X_v, X_a])
    prefusion_residual    true             false        (pre-fusion output replaces the text's)
    av_norm               speaker          none
    sim_weight            affine           raw          (the paper's w = sim)
    L_clm / AV tokens     frames           lstm_token   (the official code's one token per modality,
                                                         L_clm between CLS_s and those tokens)

    python -m bench.psamf_design [--seeds 0,1] [--train-subset 0] [--epochs 3] [--set train.batch_size=16]
        -> bench/results/psamf_design.json and .md

A variant "wins" when its mean valid MAE is lower and the paired 95% CI of (default - variant)
is clear of zero; otherwise the default stands. Skips (exit 0) without MOSI or First Impressions.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, save

DECISIONS = {  # name -> (the override that flips it, what the earlier test-based choice was)
    "prefusion_text": ("psamf.prefusion_text=cls", "tokens (2026-12-01, test MAE, 320 train segments)"),
    "prefusion_residual": ("psamf.prefusion_residual=false", "true (2026-12-02, test MAE, whole split)"),
    "av_norm": ("psamf.av_norm=none", "speaker (2026-12-02, test MAE, whole split)"),
    "sim_weight": ("psamf.sim_weight=raw", "affine (2026-11-23, by argument, no split)"),
    "clm_placement": ("psamf.prefusion_av=lstm_token", "frames: L_clm on what enters pre-fusion (2026-11-23)"),
}


def markdown(res: dict[str, Any]) -> str:
    lines = ["# PSA-MF design decisions on valid MAE (MOSI, demo profile, CPU)", "",
             f"Corpus `mosi`, real labels/transcripts/folds, **SIMULATED acoustic/visual features**. "
             f"Text encoder `{res['settings']['text_encoder']}`; personality encoder cut down for CPU "
             f"({res['settings']['personality_clips']} clips, 1 epoch). Train split: {res['data']['train_used']} "
             f"segments; {res['settings']['epochs']} epochs; seeds {res['settings']['seeds']}. The test split was "
             "dropped before training: every number is valid MAE at the best epoch.", "",
             "| decision | earlier choice (how) | default valid MAE | variant | variant valid MAE | "
             "paired default − variant [95% CI] | verdict |", "|---|---|---|---|---|---|---|"]
    d = res.get("default")
    for name, r in res.get("decisions", {}).items():
        ci = r["paired"]
        lines.append(f"| {name} | {DECISIONS[name][1]} | {d['mean']:.4f} | `{DECISIONS[name][0]}` | {r['mean']:.4f} | "
                     f"{ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}] | {r['verdict']} |")
    lines += ["", f"Per seed, default: {d and d['per_seed']}.",
              f"Machine: {res.get('machine', {}).get('cpus')} CPUs, load avg (1 min) at the end "
              f"{res.get('machine', {}).get('load_avg_1m')}. Wall (s): {res.get('wall_s')}.", ""]
    return "\n".join(lines)


def write(res: dict[str, Any]) -> Path:
    from psamf.io import write_text

    path = save("psamf_design", res)
    res["machine"] = json.loads(path.read_text())["machine"]
    write_text(RESULTS / "psamf_design.md", markdown(res))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-subset", type=int, default=0, help="train segments kept (0 = all)")
    ap.add_argument("--decisions", default=",".join(DECISIONS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, e.g. train.batch_size=16 (repeatable)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    decisions = [d for d in args.decisions.split(",") if d]

    from psamf.config import load_config
    from psamf.data.first_impressions import find_real_corpus

    probe = load_config("params.yaml", "demo", ["data.corpus=mosi"])
    if not (probe.data.mosi_path / "CMU_MOSI_Opinion_Labels.csd").is_file() or find_real_corpus(probe.data.shared_path) is None:
        print(json.dumps({"skipped": True, "reason": f"MOSI or First Impressions v2 not found under "
                                                     f"{probe.data.shared_path} (set PSAMF_SHARED_DATA)"}))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="psamf-design-")).resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlruns.db"
    os.environ["PSAMF_ARTIFACT_ROOT"] = str(work / "mlartifacts")
    import numpy as np
    import torch

    from psamf.data.ingest import ingest
    from psamf.data.mosi import simulate_av
    from psamf.data.prepared import load_prepared, save_prepared
    from psamf.psa_mf.personality import train_personality
    from psamf.psa_mf.train import train_psamf
    from psamf.stats import paired_diff

    torch.set_num_threads(args.threads)
    base = ["data.corpus=mosi", f"data.raw_dir={work}/raw", f"data.prepared_dir={work}/prepared",
            "data.seq_len=20", f"personality.out_dir={work}/personality", "personality.max_train_clips=800",
            "personality.epochs=1", "personality.max_len=32", "personality.lr=1e-4",
            f"psamf.personality_encoder={work}/personality", "psamf.max_len=32", f"train.out_dir={work}/models",
            f"train.epochs={args.epochs}", *args.overrides]
    cfg0 = load_config("params.yaml", "demo", base)
    res: dict[str, Any] = {"settings": {"seeds": seeds, "epochs": args.epochs, "text_encoder": cfg0.psamf.encoder,
                                        "personality_clips": 800, "train_subset": args.train_subset or None,
                                        "torch_threads": args.threads, "overrides": args.overrides},
                           "corpus": "mosi", "av_simulated": True, "split_scored": "valid", "wall_s": {}}
    t_all = time.perf_counter()
    simulate_av(cfg0)
    ingest(cfg0)
    ds = load_prepared(cfg0.data.prepared_path)
    split = ds.segments["split"].to_numpy()
    keep = split != "test"  # nothing here may be scored on test: drop it before anything trains
    if args.train_subset:
        train_idx = np.flatnonzero(split == "train")
        keep &= ~np.isin(np.arange(len(split)), np.setdiff1d(
            train_idx, np.random.default_rng(0).choice(train_idx, args.train_subset, replace=False)))
    save_prepared(ds.subset(keep), cfg0.data.prepared_path)
    res["data"] = {"train_used": int(((split == "train") & keep).sum()), "valid": int((split == "valid").sum()),
                   "test_dropped": int((split == "test").sum())}
    t = time.perf_counter()
    train_personality(cfg0)
    res["wall_s"]["personality"] = round(time.perf_counter() - t, 1)

    def valid_mae(extra: list[str], seed: int, tag: str) -> float:
        t = time.perf_counter()
        # train_psamf's tune-trial path sees train + valid only; the test rows are already gone here
        cfg = load_config("params.yaml", "demo", base + extra + [f"train.seed={seed}",
                                                                 f"train.out_dir={work}/models/{tag}-{seed}"])
        r = train_psamf(cfg, trial=_NoTrial())
        res["wall_s"][f"{tag}-{seed}"] = round(time.perf_counter() - t, 1)
        return float(r["valid"]["mae"])

    default = {s: valid_mae([], s, "default") for s in seeds}
    res["default"] = {"per_seed": default, "mean": float(np.mean(list(default.values())))}
    res["decisions"] = {}
    write(res)
    for name in decisions:
        override = DECISIONS[name][0]
        runs = {s: valid_mae([override], s, name) for s in seeds}
        paired = paired_diff([default[s] for s in seeds], [runs[s] for s in seeds])
        wins = float(np.mean(list(runs.values()))) < res["default"]["mean"] and paired["lo"] > 0
        res["decisions"][name] = {"override": override, "per_seed": runs, "mean": float(np.mean(list(runs.values()))),
                                  "paired": paired, "verdict": "variant better on valid" if wins else
                                  ("default stands (variant not better)" if paired["mean"] <= 0 else
                                   "default stands (variant lower but CI includes 0)")}
        write(res)
    res["wall_s"]["total"] = round(time.perf_counter() - t_all, 1)
    write(res)
    print(json.dumps({k: v.get("verdict") for k, v in res["decisions"].items()}, indent=2))


class _NoTrial:
    """A stand-in trial: train_psamf then takes its selection path (train + valid only, no test
    metrics, no saved model files) without an Optuna study. It never prunes."""

    number = ""

    def report(self, value: float, step: int) -> None:
        pass

    def should_prune(self) -> bool:
        return False


if __name__ == "__main__":
    main()
