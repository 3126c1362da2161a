"""Personalized MulT LOO benchmark: corpus `mosi` (real labels/text, simulated AV), ten real LOO
speakers, demo profile, CPU.

Reports baseline vs FS-UA vs FS-UA-KD per user with CIs, the paired KD-vs-baseline MAE
difference, wall time of the whole demo LOO, MulT training throughput on the fixed shape,
and peak RSS. Also measures the two questions the issue asks:
  - uniform vs stratified 5-shot draws (same pretrained models, finetune only);
  - User Adapter token at the end vs the start (re-pretrains, on the first `--position-users`).

    python -m bench.loo [--position-users 3]   -> bench/results/loo.json
    python -m bench.loo --set finetune.draws=10 --result-name loo_r10   # more draws, its own file
Targets: FS-UA-KD mean MAE < baseline's with the paired 95% CI above zero; whole LOO <= 15 min;
throughput >= 90 samples/s with peak RSS <= 1 GiB.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import peak_rss_mib, run_isolated, save

TARGET_LOO_S = 15 * 60


def measure(workdir: str, position_users: int, overrides: list[str] | None = None) -> dict:
    from psamf.config import load_config
    from psamf.data.ingest import ingest
    from psamf.data.mosi import simulate_av
    from psamf.mult.finetune import finetune
    from psamf.mult.loo import loo, loo_users
    from psamf.mult.pretrain import pretrain

    base = [f"data.raw_dir={workdir}/raw", f"data.prepared_dir={workdir}/prepared",
            f"pretrain.out_dir={workdir}/models", f"finetune.out_dir={workdir}/loo",
            "data.corpus=mosi", *(overrides or [])]
    cfg = load_config("params.yaml", "demo", base)
    simulate_av(cfg)
    ingest(cfg)
    users = loo_users(cfg)
    t0 = time.perf_counter()
    summary = loo(cfg, users)
    loo_s = time.perf_counter() - t0
    per_user = {u: json.loads((Path(workdir) / "loo" / "mosi" / f"{u}.json").read_text()) for u in users}

    # Uniform vs stratified draws: same pretrained models, finetune only.
    strat_cfg = load_config("params.yaml", "demo", base + ["finetune.stratified=true"])
    strat = {u: finetune(strat_cfg, u, write=False)["summary"] for u in users}

    # Adapter token position: the main run used `end`; re-pretrain a few users with `start`.
    def position_means(rows: dict) -> dict:
        return {v: {m: sum(r[v][m]["mean"] for r in rows.values()) / len(rows) for m in ("mae", "non0_acc2")}
                for v in ("baseline", "fs_ua", "fs_ua_kd")}

    subset = users[:position_users]
    start_cfg = load_config("params.yaml", "demo", base + ["user_adapter.position=start",
                                                           f"pretrain.out_dir={workdir}/models-start"])
    start_rows = {}
    for u in subset:
        pretrain(start_cfg, u)
        start_rows[u] = finetune(start_cfg, u, write=False)["summary"]
    pos = {"end": position_means({u: per_user[u]["summary"] for u in subset}), "start": position_means(start_rows)}

    def mean_of(src: dict, variant: str, metric: str) -> float:
        return sum(s[variant][metric]["mean"] for s in src.values()) / len(src)

    uniform = {u: r["summary"] for u, r in per_user.items()}
    return {
        "corpus": "mosi", "av_simulated": summary["av_simulated"], "profile": "demo", "users": users,
        "overrides": list(overrides or []), "draws_per_user": cfg.finetune.draws,
        "loo_wall_s": round(loo_s, 1),
        "averages": summary["averages"], "kd_mae_gain": summary["kd_mae_gain"],
        "per_user": {u: {v: {m: r["summary"][v][m] for m in ("mae", "corr", "acc7", "non0_f1", "non0_acc2")}
                         for v in ("baseline", "fs_ua", "fs_ua_kd")} | {"paired": r["paired"]}
                     for u, r in per_user.items()},
        "draws": {"uniform": {v: {m: mean_of(uniform, v, m) for m in ("mae", "non0_acc2")} for v in ("fs_ua", "fs_ua_kd")},
                  "stratified": {v: {m: mean_of(strat, v, m) for m in ("mae", "non0_acc2")} for v in ("fs_ua", "fs_ua_kd")}},
        "adapter_position": {"users": users[:position_users], **pos},
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--position-users", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override on top of the demo profile, e.g. finetune.draws=10 (repeatable)")
    ap.add_argument("--result-name", default="loo", help="bench/results/<name>.json")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--throughput", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.throughput:  # its own process, so its peak RSS is its own
        from bench.mult_throughput import measure_throughput
        print(json.dumps(measure_throughput()))
        return
    if args.one:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(measure(d, args.position_users, args.overrides)))
        return
    throughput = run_isolated("bench.loo", "--throughput")
    loo_run = run_isolated("bench.loo", "--one", "--position-users", str(args.position_users),
                           *(a for o in args.overrides for a in ("--set", o)))
    gain = loo_run["kd_mae_gain"]
    met = {"kd_beats_baseline_mae": loo_run["averages"]["fs_ua_kd"]["MAE"] < loo_run["averages"]["baseline"]["MAE"],
           "kd_gain_ci_above_zero": gain["lo"] > 0,
           "loo_within_15_min": loo_run["loo_wall_s"] <= TARGET_LOO_S,
           "throughput_ge_90": throughput.get("samples_per_s", 0) >= 90,
           "throughput_rss_le_1gib": throughput.get("peak_rss_mib", 1e9) <= 1024}
    path = save(args.result_name, {"loo": loo_run, "mult_throughput": throughput, "met": met,
                        "targets": {"loo_wall_s": TARGET_LOO_S, "samples_per_s": 90, "peak_rss_mib": 1024}})
    print(json.dumps({"met": met, "averages": loo_run["averages"], "loo_wall_s": loo_run["loo_wall_s"]}, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
