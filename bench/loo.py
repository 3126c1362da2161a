"""Personalized MulT LOO benchmark: corpus `mosi` (real labels/text, simulated AV), demo profile, CPU.

The knobs are chosen before the report speakers are touched, as `psamf loo --select` does it:

  1. select   Optuna over finetune.{epochs, dropout, kd_lambda, lr_base, lr_adapter, stratified}
              on the data.selection_users speakers (MOSI ranks 11-20 by segment count), their
              MulTs pretrained without any report speaker; objective: mean FS-UA-KD MAE.
  2. report   the LOO table (baseline / FS-UA / FS-UA-KD, per-user CIs over draws, the paired KD
              gain) on the data.loo_users report speakers, scored once with the chosen knobs.
  3. position the User Adapter token at the end vs the start (re-pretrains, on the first
              `--position-users` report speakers), with the chosen knobs. Descriptive only: the
              knobs were not chosen by it.

    python -m bench.loo [--position-users 3] [--trials 20]   -> bench/results/loo.json
Targets: FS-UA-KD mean MAE < baseline's with the paired 95% CI above zero; the report LOO
<= 15 min; throughput >= 90 samples/s with peak RSS <= 1 GiB.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from bench.common import peak_rss_mib, run_isolated, save

TARGET_LOO_S = 15 * 60
KEYS = ("mae", "corr", "acc7", "non0_f1", "mult_f1", "non0_acc2")


def measure(workdir: str, position_users: int, trials: int, overrides: list[str] | None = None) -> dict:
    from psamf.config import best_params_overrides, load_config
    from psamf.data.ingest import ingest
    from psamf.data.mosi import simulate_av
    from psamf.mult.finetune import finetune
    from psamf.mult.loo import loo, loo_users
    from psamf.mult.pretrain import pretrain
    from psamf.mult.select import select_finetune

    base = [f"data.raw_dir={workdir}/raw", f"data.prepared_dir={workdir}/prepared",
            f"pretrain.out_dir={workdir}/models", f"finetune.out_dir={workdir}/loo",
            f"text_features.cache_dir={workdir}/cache", "data.corpus=mosi",
            f"finetune.select_trials={trials}", *(overrides or [])]
    cfg = load_config("params.yaml", "demo", base)
    simulate_av(cfg)
    ingest(cfg)

    t0 = time.perf_counter()
    selection = select_finetune(cfg)
    select_s = time.perf_counter() - t0
    chosen = best_params_overrides(selection["files"]["best_params"])
    cfg = load_config("params.yaml", "demo", [*chosen, *base])  # --set (the bench's overrides) wins
    users = loo_users(cfg)
    assert not set(users) & set(selection["selection_users"])
    t0 = time.perf_counter()
    summary = loo(cfg, users)
    loo_s = time.perf_counter() - t0
    per_user = {u: summary["per_user"][u] for u in users}

    # Adapter token position: the report run used `end`; re-pretrain a few users with `start`.
    def position_means(rows: dict) -> dict:
        return {v: {m: sum(r[v][m]["mean"] for r in rows.values()) / len(rows) for m in ("mae", "non0_acc2")}
                for v in ("baseline", "fs_ua", "fs_ua_kd")}

    subset = users[:position_users]
    start_cfg = load_config("params.yaml", "demo", [*chosen, *base, "user_adapter.position=start",
                                                    f"pretrain.out_dir={workdir}/models-start"])
    start_rows = {}
    for u in subset:
        pretrain(start_cfg, u)
        start_rows[u] = finetune(start_cfg, u, write=False)["summary"]
    pos = {"end": position_means({u: per_user[u]["summary"] for u in subset}), "start": position_means(start_rows)}
    return {
        "corpus": "mosi", "av_simulated": summary["av_simulated"], "profile": "demo", "users": users,
        "overrides": list(overrides or []), "draws_per_user": cfg.finetune.draws,
        "selection": {k: selection[k] for k in ("selection_users", "report_users_left_out", "objective", "n_trials",
                                                "best_params", "best_value", "best_trial_means")},
        "select_wall_s": round(select_s, 1), "loo_wall_s": round(loo_s, 1),
        "averages": summary["averages"], "kd_mae_gain": summary["kd_mae_gain"],
        "per_user": {u: {v: {m: r["summary"][v][m] for m in KEYS} for v in ("baseline", "fs_ua", "fs_ua_kd")}
                     | {"paired": r["paired"]} for u, r in per_user.items()},
        "adapter_position": {"users": subset, **pos},
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--position-users", type=int, default=3)
    ap.add_argument("--trials", type=int, default=20, help="finetune.select_trials for the selection search")
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
            print(json.dumps(measure(d, args.position_users, args.trials, args.overrides)))
        return
    throughput = run_isolated("bench.loo", "--throughput")
    loo_run = run_isolated("bench.loo", "--one", "--position-users", str(args.position_users), "--trials", str(args.trials),
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
