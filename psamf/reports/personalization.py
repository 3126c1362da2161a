"""`psamf report`: one personalization report per run, every model side by side per LOO user.

For each LOO user it puts five rows together, each with MAE, Corr and Non0-Acc2 and a 95% CI:

    baseline, FS-UA, FS-UA-KD   the LOO finetune draws (t-interval over R few-shot draws)
    PSA-MF                      the trained PSA-MF's predictions on that user's segments when
                                the speaker is in its valid or test fold (bootstrap over
                                segments: one model, no draws); n/a, with the reason, for a
                                speaker PSA-MF trained on
    cold start                  the pretrained MulT's unknown-user row on all of the user's
                                segments, before any labels (bootstrap over segments)

plus the paired KD gain per user as a forest plot, and the papers' numbers beside ours. Inputs
are the LOO report's `loo_summary.json` and the train stage's `predictions.csv`, so the report
is pure aggregation: no model is loaded and it runs in seconds anywhere.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from psamf import paper
from psamf.config import Config
from psamf.errors import InputError
from psamf.io import read_json, write_json, write_text
from psamf.metrics import CONVENTIONS
from psamf.reports.html import ci_bars, provenance, render, save_figure, write_csv
from psamf.stats import bootstrap_ci, mean_ci

METRICS = {"MAE": "mae", "Corr": "corr", "Non0-Acc2": "non0_acc2"}
MODELS = {"baseline": "Baseline (no fine-tuning)", "fs_ua": "FS-UA", "fs_ua_kd": "FS-UA-KD",
          "psamf": "PSA-MF", "cold_start": "Cold start (unknown user)"}
FILES = {"html": "personalization.html", "csv": "personalization.csv", "json": "personalization.json",
         "chart": "per_user.png", "forest": "kd_forest.png"}
# Why a PSA-MF score is not a held-out one: the user's split in PSA-MF's standard folds.
SPLIT_NOTE = {"train": "in-sample: this speaker is in PSA-MF's training fold (optimistic)",
              "valid": "this speaker's segments chose PSA-MF's best epoch (slightly optimistic)",
              "test": ""}


def _nan_note(metric: str, ci: dict[str, float]) -> str:
    if not math.isnan(ci.get("mean", float("nan"))):
        return ""
    if metric == "corr":
        return "Corr undefined: predictions or labels constant"
    if metric == "non0_acc2":
        return "Non0-Acc2 undefined: every label is 0"
    return f"{metric} missing"


def _row(user: str, model: str, cis: dict[str, dict[str, float]] | None, ci_kind: str, n: int | None,
         note: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"user": user, "model": model, "n": n, "ci": ci_kind}
    notes = [note] if note else []
    for name, key in METRICS.items():
        ci = (cis or {}).get(key) or {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
        row.update({name: ci["mean"], f"{name}_lo": ci["lo"], f"{name}_hi": ci["hi"]})
        if cis is not None and (why := _nan_note(key, ci)):
            notes.append(why)
    row["note"] = "; ".join(dict.fromkeys(notes))
    return row


def _psamf_rows(users: list[str], predictions: Path | None, seed: int) -> tuple[list[dict[str, Any]], str]:
    if predictions is None or not predictions.is_file():
        why = f"no PSA-MF predictions ({predictions or 'no model dir given'}); run `psamf train`"
        return [_row(u, "psamf", None, "-", None, why) for u in users], why
    try:
        df = pd.read_csv(predictions, dtype={"segment_id": str, "speaker_id": str, "split": str})
        missing = {"speaker_id", "split", "label", "pred"} - set(df.columns)
    except (OSError, ValueError) as e:
        raise InputError(predictions, f"not a predictions table ({e})") from None
    if missing:
        raise InputError(predictions, f"missing column(s) {sorted(missing)}")
    rows = []
    for u in users:
        sub = df[df.speaker_id == u]
        if sub.empty:
            rows.append(_row(u, "psamf", None, "-", 0, "no held-out score: this speaker is in PSA-MF's training "
                                                        "fold (predictions.csv holds valid and test segments only)"))
            continue
        split = str(sub.split.mode().iloc[0])
        cis = bootstrap_ci(sub.pred.to_numpy(), sub.label.to_numpy(), seed=seed)
        rows.append({**_row(u, "psamf", cis, "bootstrap over segments", len(sub), SPLIT_NOTE.get(split, "")),
                     "psamf_split": split})
    return rows, ""


def report(cfg: Config, loo_summary: str | Path, model_dir: str | Path | None, out_dir: str | Path) -> dict[str, Any]:
    """`build` inside a `report` MLflow run; the page and its pictures also go to the pipeline's
    parent run, where people open a run first."""
    from psamf import tracking

    with tracking.stage_run(cfg, "report", "report"):
        summary = build(loo_summary, model_dir, out_dir, seed=cfg.data.seed)
        tracking.log_metrics({f"{m}_{METRICS[k]}": v for m, ms in summary["averages"].items() for k, v in ms.items()})
        for key in ("html", "chart", "forest", "csv"):
            tracking.log_artifact(summary["files"][key], "personalization")
            tracking.log_artifact(summary["files"][key], "personalization", parent=True)
    return summary


def build(loo_summary: str | Path, model_dir: str | Path | None, out_dir: str | Path,
          seed: int = 0) -> dict[str, Any]:
    """Write the report (HTML, CSV, JSON, two PNGs) to `out_dir` and return its summary."""
    loo = read_json(loo_summary)
    per_user = loo.get("per_user")
    if not per_user:
        raise InputError(loo_summary, "no per_user section (written by psamf >= this report); rerun `psamf loo --report-only`")
    users = list(loo["users"])
    predictions = Path(model_dir) / "predictions.csv" if model_dir else None
    psamf_rows, psamf_missing = _psamf_rows(users, predictions, seed)
    rows: list[dict[str, Any]] = []
    for u, psamf_row in zip(users, psamf_rows):
        rep = per_user[u]
        for v in ("baseline", "fs_ua", "fs_ua_kd"):
            rows.append(_row(u, v, rep["summary"][v], f"t over {rep['draws']} draws", rep["n_segments"] - rep["k_shot"]))
        rows.append(psamf_row)
        cold = rep.get("cold_start")
        rows.append(_row(u, "cold_start", cold, "bootstrap over segments", rep["n_segments"],
                         "" if cold else "finetune report predates cold-start scoring; rerun `psamf finetune`"))
    df = pd.DataFrame(rows)
    df["best"] = _best_by_mae(df)
    kd = _kd_gains(users, per_user)
    averages = {m: {k: mean_ci(df.loc[df.model == m, k].tolist())["mean"] for k in METRICS} for m in MODELS}
    # Users behind each model's mean: PSA-MF has no score for the speakers it trained on.
    counts = {m: int(df.loc[df.model == m, "MAE"].notna().sum()) for m in MODELS}

    out = Path(out_dir)
    write_csv(out / FILES["csv"], df)
    save_figure(ci_bars(df, users, "model", MODELS, {"MAE": "MAE (lower is better)", "Non0-Acc2": "Non0-Acc2"},
                        "Per LOO user: every model, mean with 95% CI"), out / FILES["chart"])
    save_figure(_forest(kd, loo["kd_mae_gain"]), out / FILES["forest"])
    summary = {"corpus": loo["corpus"], "av_simulated": loo["av_simulated"], "users": users,
               "averages": averages, "users_scored": counts, "kd_gain": kd, "kd_gain_mean": loo["kd_mae_gain"],
               "psamf_missing": psamf_missing, "rows": _json_rows(df),
               "files": {k: str(out / f) for k, f in FILES.items()}}
    write_text(out / FILES["html"], _html(loo, df, kd, averages, counts, out, psamf_missing))
    write_json(out / FILES["json"], summary)
    return summary


def _best_by_mae(df: pd.DataFrame) -> pd.Series:
    """Per user, the lowest-MAE model among held-out scores (in-sample PSA-MF is not eligible)."""
    eligible = df["MAE"].notna() & ~df.get("psamf_split", pd.Series("", index=df.index)).isin(["train", "valid"])
    best = pd.Series(False, index=df.index)
    for _, sub in df[eligible].groupby("user"):
        best[sub["MAE"].idxmin()] = True
    return best


def _kd_gains(users: list[str], per_user: dict[str, Any]) -> list[dict[str, Any]]:
    """Per user, baseline MAE - FS-UA-KD MAE, paired by draw: > 0 means KD fine-tuning helped."""
    out = []
    for u in users:
        d = per_user[u]["paired"]["fs_ua_kd_vs_baseline_mae"]
        out.append({"user": u, **{k: d[k] for k in ("mean", "lo", "hi", "n")}, "excludes_zero": d["excludes_zero"]})
    return out


def _json_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    rows = df.to_dict("records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def _forest(kd: list[dict[str, Any]], overall: dict[str, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [*kd, {"user": "mean over users", **overall}]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows):
        bold = r["user"] == "mean over users"
        ax.plot([r["lo"], r["hi"]], [yi, yi], color="black", lw=2.5 if bold else 1.2)
        ax.plot(r["mean"], yi, "D" if bold else "s", color="C3" if bold else "C0", ms=7 if bold else 5)
    ax.axvline(0, color="grey", ls="--", lw=1)
    ax.set_yticks(y, [r["user"] for r in rows], fontsize=8)
    ax.set_xlabel("baseline MAE − FS-UA-KD MAE (> 0: KD fine-tuning helped), 95% CI")
    ax.set_title("Paired KD gain per LOO user")
    ax.grid(axis="x", alpha=0.3)
    return fig


# ---- HTML ----------------------------------------------------------------------------------

def _html(loo: dict[str, Any], df: pd.DataFrame, kd: list[dict[str, Any]], averages: dict[str, dict[str, float]],
          counts: dict[str, int], out: Path, psamf_missing: str) -> str:
    caveats = [provenance(loo["corpus"], loo["av_simulated"], loo.get("text_features")),
               "The papers' numbers are on real CMU-MOSI with real COVAREP/FACET features; ours are comparable "
               "only where the corpus is `mosi` and the AV features are real." if loo["av_simulated"] or
               loo["corpus"] != "mosi" else "Real CMU-MOSI labels and features.",
               "PSA-MF is scored on a user's segments only where the speaker is in its valid or test fold; a "
               "speaker it trained on has no held-out PSA-MF score. A valid-fold speaker chose its best epoch "
               "(noted per row, never picked as best)."]
    if psamf_missing:
        caveats.append(f"PSA-MF: {psamf_missing}.")
    pm = paper.PERSONALIZED_MULT_MOSI
    theirs = {"baseline": pm["baseline"], "fs_ua": pm["fs_ua"], "fs_ua_kd": pm["fs_ua_kd"], "psamf": paper.PSAMF_MOSI}
    n_users = len(loo["users"])
    paper_rows = [{"name": MODELS[m].split(" (")[0] + ("" if counts[m] == n_users else f" ({counts[m]} of {n_users} users)"),
                   "ours": averages[m], "theirs": theirs.get(m, {})} for m in MODELS]
    return render("personalization.html.j2", title="psamf personalization report", loo=loo, caveats=caveats,
                  paper_rows=paper_rows, rows=df.to_dict("records"), metrics=list(METRICS), models=MODELS,
                  gain=loo["kd_mae_gain"], kd=kd, forest=out / FILES["forest"], chart=out / FILES["chart"],
                  conventions={k: CONVENTIONS[k] for k in METRICS.values()})
