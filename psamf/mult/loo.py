"""Personalized MulT, step 3: the leave-one-out experiment and its table.

    loo(cfg)  pretrain + finetune for the K users with the most segments, then the report.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from psamf import tracking
from psamf.config import Config
from psamf.data.prepared import load_prepared
from psamf.errors import InputError
from psamf.io import write_json
from psamf.mult import VARIANTS
from psamf.stats import paired_diff



log = logging.getLogger(__name__)


# ---- the LOO experiment ------------------------------------------------------------------------

# The paper's Tables 1-3 columns, each named by its convention (psamf.metrics.CONVENTIONS). The
# paper's F1 comes from the MulT repo's evaluation, so that convention is a column of its own.
TABLE_METRICS = {"MAE": "mae", "Corr": "corr", "Acc7": "acc7", "F1_Non0": "non0_f1",
                 "F1_MulT": "mult_f1", "Acc2_Non0": "non0_acc2"}
HEADINGS = {"F1_Non0": "F1 (Non0)", "F1_MulT": "F1 (MulT repo)", "Acc2_Non0": "Acc2 (Non0)"}
VARIANT_NAMES = {"baseline": "Baseline (no fine-tuning)", "fs_ua": "FS-UA", "fs_ua_kd": "FS-UA-KD"}


def loo_users(cfg: Config) -> list[str]:
    return load_prepared(cfg.data.prepared_path).loo_users(cfg.data.loo_users)


def loo(cfg: Config, users: list[str] | None = None, on_user=None) -> dict[str, Any]:
    """Pretrain + finetune for every LOO user, then write the report."""
    # Here, not at the top: the report functions below (the loo-report task) need no torch.
    from psamf.mult.finetune import finetune
    from psamf.mult.pretrain import pretrain

    users = users or loo_users(cfg)
    with tracking.stage_run(cfg, "loo", "loo", {"loo_users": ",".join(users)}):
        for u in tqdm(users, desc="loo", unit="user"):
            with tracking.stage_run(cfg, "loo-user", f"user[{u}]", {"loo_user": u}, log_params=False):
                pre = pretrain(cfg, u)
                fin = finetune(cfg, u)
            if on_user:
                on_user(u, pre, fin)
        summary = loo_report(cfg, users)
        log_loo_summary(summary)
        return summary


def tracked_loo_report(cfg: Config, report_files: list[Path] | None = None,
                       out_dir: str | Path | None = None) -> dict[str, Any]:
    """`loo_report` in its own `loo` stage run (the DVC and KFP report stages)."""
    with tracking.stage_run(cfg, "loo", "loo-report"):
        summary = loo_report(cfg, report_files=report_files, out_dir=out_dir)
        log_loo_summary(summary)
    return summary


def log_loo_summary(summary: dict[str, Any]) -> None:
    """The LOO averages and report files (tables, chart) into the active MLflow run."""
    tracking.set_tags({"av_simulated": summary["av_simulated"]})
    tracking.log_metrics({f"{v}_{m}": x for v, ms in summary["averages"].items() for m, x in ms.items()})
    tracking.log_metrics({"kd_mae_gain": summary["kd_mae_gain"]["mean"]})
    for f in summary["files"].values():
        tracking.log_artifact(f, "loo_report")


def user_at_rank(cfg: Config, rank: int) -> str | None:
    """The LOO user at `rank` (0 = most segments), or None when rank >= data.loo_users.

    DVC and KFP fan out over rank slots, which are static, rather than speaker ids, which
    depend on the corpus."""
    users = loo_users(cfg)
    return users[rank] if 0 <= rank < len(users) else None


def skipped_slot_file(cfg: Config, out_dir: str | Path, rank: int) -> Path:
    """Where a stage whose outputs go to `out_dir` puts a skipped slot's marker: beside the
    `<out_dir>/<corpus>/...` outputs it would have written, so report globs find it."""
    return Path(out_dir) / cfg.data.corpus / f"rank{rank}-skipped.json"


def write_skipped_slot(cfg: Config, path: str | Path, rank: int) -> Path:
    """The one marker of a rank slot at or beyond data.loo_users, written by the CLI (so dvc)
    and KFP alike: the stage finishes with an output, and is_skipped_slot tells it from a report."""
    return write_json(path, {"skipped": True, "rank": rank, "loo_users": cfg.data.loo_users})


def is_skipped_slot(report: Any) -> bool:
    return isinstance(report, dict) and report.get("skipped") is True


def loo_report(cfg: Config, users: list[str] | None = None, report_files: list[Path] | None = None,
               out_dir: str | Path | None = None) -> dict[str, Any]:
    """Collect per-user finetune reports into the paper's table layout (+ CIs), CSV, MD, PNG.

    By default reads <finetune.out_dir>/<corpus>/<user>.json for the LOO users; orchestrators
    that kept each user's report elsewhere pass `report_files` instead (skipped slots' markers
    among them are passed over)."""
    import json

    from psamf.reports.html import (ci_bars, conventions_note, markdown_table, provenance, render, save_figure,
                                    write_csv, write_text)

    if report_files is not None:
        by_user = {}
        for p in report_files:
            try:
                rep = json.loads(Path(p).read_text())
                if is_skipped_slot(rep):
                    continue
                by_user[rep["user"]] = rep
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise InputError(p, f"not a finetune report ({e})") from None
        order = {u: i for i, u in enumerate(loo_users(cfg))}
        users = sorted(by_user, key=lambda u: (order.get(u, len(order)), u))
        reports = [by_user[u] for u in users]
    else:
        users = users or loo_users(cfg)
        base = Path(cfg.finetune.out_dir) / cfg.data.corpus
        reports = []
        for u in users:
            p = base / f"{u}.json"
            if not p.is_file():
                raise InputError(p, f"missing; run `psamf finetune --user {u}` first")
            reports.append(json.loads(p.read_text()))
    if not reports:
        raise InputError("loo", "no finetune reports to collect")
    rows = []
    for r in reports:
        for v in VARIANTS:
            row = {"user": r["user"], "variant": v, "n_segments": r["n_segments"], "draws": r["draws"]}
            for name, key in TABLE_METRICS.items():
                ci = r["summary"][v][key]
                row.update({name: ci["mean"], f"{name}_lo": ci["lo"], f"{name}_hi": ci["hi"]})
            rows.append(row)
    df = pd.DataFrame(rows)
    averages = {v: {name: float(df.loc[df.variant == v, name].mean()) for name in TABLE_METRICS} for v in VARIANTS}
    # Paired per-user difference baseline - FS-UA-KD in mean MAE: > 0 means KD helped.
    diffs = [r["summary"]["baseline"]["mae"]["mean"] - r["summary"]["fs_ua_kd"]["mae"]["mean"] for r in reports]
    kd_gain = paired_diff(diffs, [0.0] * len(diffs))
    first = reports[0]
    md = [f"# Personalized MulT: leave-one-out few-shot results ({len(users)} users)\n",
          provenance(cfg.data.corpus, first["av_simulated"], first["text_features"]),
          f"\n{first['k_shot']}-shot support sets, {first['draws']} seeded draws per user "
          f"({'stratified' if first['stratified'] else 'uniform'}), KD λ = {first['kd_lambda']}. "
          "Cells are per-user means over draws; `[lo, hi]` is the 95% t-interval over draws.\n"]
    tables = []
    for v in VARIANTS:
        sub = df[df.variant == v]
        heads = [HEADINGS.get(n, n) for n in TABLE_METRICS]
        table_rows = [{"User": r.user, **{HEADINGS.get(n, n): f"{getattr(r, n):.3f} [{getattr(r, n + '_lo'):.3f}, "
                                                              f"{getattr(r, n + '_hi'):.3f}]" for n in TABLE_METRICS}}
                      for r in sub.itertuples()]
        md += [f"\n## {VARIANT_NAMES[v]}\n", markdown_table(
            table_rows + [{"User": "**Average**", **{HEADINGS.get(n, n): f"**{averages[v][n]:.3f}**" for n in TABLE_METRICS}}],
            ["User", *heads])]
        tables.append({"name": VARIANT_NAMES[v], "columns": ["User", *heads], "rows": table_rows + [
            {"User": "Average", **{HEADINGS.get(n, n): f"{averages[v][n]:.3f}" for n in TABLE_METRICS}}]})
    md += [f"\nMean over users of (baseline MAE − FS-UA-KD MAE): {kd_gain['mean']:.4f} "
           f"[{kd_gain['lo']:.4f}, {kd_gain['hi']:.4f}] (95% CI; > 0 means KD fine-tuning lowered MAE).\n",
           "\n" + conventions_note(list(TABLE_METRICS.values()))]
    out = Path(out_dir) if out_dir else Path(cfg.finetune.out_dir) / cfg.data.corpus
    write_csv(out / "loo_table.csv", df)
    write_text(out / "loo_report.md", "".join(md))
    fig = ci_bars(df, users, "variant", VARIANT_NAMES, {"Acc2_Non0": "Acc2 (Non0)", "MAE": "MAE (lower is better)"},
                  "Personalized MulT, leave-one-out few-shot (mean ± 95% CI over draws)")
    save_figure(fig, out / "loo_chart.png")
    write_text(out / "loo_report.html", render("loo.html.j2", title="psamf LOO report", users=users,
                                               intro=md[1] + md[2], tables=tables, gain_line=md[-2].strip(),
                                               chart=out / "loo_chart.png", conventions=md[-1].strip()))
    summary = {"corpus": cfg.data.corpus, "av_simulated": first["av_simulated"], "users": users,
               "averages": averages, "kd_mae_gain": kd_gain, "metric_keys": TABLE_METRICS,
               "k_shot": first["k_shot"], "draws": first["draws"], "kd_lambda": first["kd_lambda"],
               "text_features": first["text_features"],
               # Everything but the draws, so `psamf report` needs this one file, not K of them.
               "per_user": {r["user"]: {k: v for k, v in r.items() if k != "per_draw"} for r in reports},
               "files": {k: str(out / f) for k, f in (("csv", "loo_table.csv"), ("markdown", "loo_report.md"),
                                                       ("chart", "loo_chart.png"), ("html", "loo_report.html"))}}
    write_json(out / "loo_summary.json", summary)
    # Flat numbers for `dvc metrics show` / KFP Metrics: <variant>.<metric>.
    write_json(out / "metrics.json", {**{f"{v}.{m}": round(x, 6) for v, ms in averages.items() for m, x in ms.items()},
                                      "kd_mae_gain": round(kd_gain["mean"], 6)})
    return summary
