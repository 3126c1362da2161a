"""The study's report: best params, summaries, trials table, plots, and its MLflow logging.

Outputs, atomic, in `<tune.out_dir>/<corpus>/`:

    best_params.json   {"psamf.tau": .., "psamf.split_layer": .., "psamf.aux_lambda": ..}
    summary.json       corpus, av_simulated, trials by state, best value / trial, pruned count,
                       epochs run in total, retries, per-trial rows, worker exit codes, wall time
    summary.md, trials.csv
    plots/             optimization_history, param_importances, parallel_coordinate,
                       intermediate_values as .png (matplotlib), and all of them in one
                       interactive tune_plots.html (plotly, plotly.js inlined: works offline)
    tune_config.yaml   the resolved config the workers ran with
    trials/<study>/<n> one dir per trial: metrics.json (model.pt only with tune.keep_trial_models)
    workers/           worker-<i>.log for worker processes

MLflow: one `tune` run (params = config, metrics = best value / counts / epochs, the files
above as artifacts), one nested child run per trial (the config incl. τ/N/λ as params, tags
trial / state / retry_of / worker, metric valid_mae per epoch with step, value), and below it
the `train` run train_psamf opens. Worker processes nest under the tune run through
$PSAMF_PARENT_RUN_ID. Child runs of trials whose worker died are closed as KILLED at the end.
"""
from __future__ import annotations

import html
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

from psamf import tracking
from psamf.config import Config
from psamf.io import write_json, write_text
from psamf.psa_mf.tune.search import (PARAMS, encoder_depth, load_study, report_dir, storage_url, study_finished,
                                      trial_counts)
from psamf.redact import redact
from psamf.reports.html import html_page, markdown_table, provenance, save_figure, write_csv

log = logging.getLogger(__name__)

ROW_COLUMNS = ["number", "state", "value", *PARAMS, "epochs", "best_epoch", "retry_of", "worker", "duration_s",
               "fail_reason"]
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")
PLOTS_HTML = "tune_plots.html"


# ---------------------------------------------------------------------------- finishing a study

def finish_study(cfg: Config) -> dict[str, Any]:
    """After workers ran elsewhere (KFP's ParallelFor): check the study is complete, then write
    and log the report as `tune` does."""
    study = load_study(cfg)
    if not study_finished(study, cfg):
        c = trial_counts(study)
        raise RuntimeError(f"tune: the study {cfg.tune.study_name} has {c['COMPLETE'] + c['PRUNED']} of "
                           f"{cfg.tune.n_trials} finished trials after every worker task ended")
    with tracking.stage_run(cfg, "tune", run_name=f"tune[{cfg.data.corpus}][report]",
                            tags={"study": cfg.tune.study_name, "report": True}):
        return finalize(cfg, study, {})


def finalize(cfg: Config, study, extra: dict[str, Any]) -> dict[str, Any]:
    """Drop stale checkpoints and runs, write the report, log it to the active `tune` run."""
    _cleanup_checkpoints(cfg)
    _close_dead_runs(study)
    out = report_dir(cfg)
    summary = tune_report(cfg, study, extra=extra)
    tracking.log_metrics({"best_value": summary["best_value"], "n_complete": summary["trials_by_state"]["COMPLETE"],
                          "n_pruned": summary["pruned"], "n_failed": summary["trials_by_state"]["FAIL"],
                          "epochs_total": summary["epochs_total"], **({"wall_s": extra["wall_s"]} if "wall_s" in extra else {})})
    for name in ("best_params.json", "summary.json", "summary.md", "trials.csv", "tune_config.yaml"):
        tracking.log_artifact(out / name, "tune")
    for p in [*summary["plots"].values(), summary["plots_html"]]:
        if isinstance(p, str):
            tracking.log_artifact(p, "tune/plots")
    return summary


def _cleanup_checkpoints(cfg: Config) -> None:
    """After a complete study no trial will resume: drop checkpoints dead workers left behind."""
    root = report_dir(cfg) / "trials" / cfg.tune.study_name
    if root.is_dir():
        for ckpt in root.glob("*/ckpt"):
            shutil.rmtree(ckpt, ignore_errors=True)


def _close_dead_runs(study) -> None:
    """MLflow runs of trials whose worker died stay RUNNING; mark them (and their children) KILLED."""
    from optuna.trial import TrialState

    if not tracking.enabled():
        return
    ids = [t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    ids = [i for i in ids if i]
    if not ids:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for rid in ids:
            run = client.get_run(rid)
            children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{rid}'")
            for r in [run, *children]:
                if r.info.status == "RUNNING":
                    client.set_terminated(r.info.run_id, status="KILLED")
    except Exception as e:  # bookkeeping only: never fail a finished study over it
        log.warning("tune: could not close MLflow runs of dead trials: %s", e)


# ---------------------------------------------------------------------------- the report

def _trial_row(t) -> dict[str, Any]:
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retry_of = Retry.retried_trial_number(t)
    dur = t.duration.total_seconds() if t.duration is not None else None
    return {"number": t.number, "state": t.state.name, "value": t.value,
            **{k: t.params.get(k) for k in PARAMS},
            "epochs": len(t.intermediate_values), "best_epoch": t.user_attrs.get("best_epoch"),
            "retry_of": retry_of, "worker": t.user_attrs.get("worker"),
            "duration_s": None if dur is None else round(dur, 2), "fail_reason": t.user_attrs.get("fail_reason")}


def _skip_reason(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _save_pngs(study, out: Path) -> dict[str, Any]:
    """Optuna's plots as matplotlib PNGs: name -> path, or {"skipped": why}."""
    import matplotlib
    import optuna

    matplotlib.use("Agg", force=False)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(optuna.visualization.matplotlib, f"plot_{name}")(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                files[name] = str(save_figure(fig, out / f"{name}.png"))
        except Exception as e:  # e.g. importances need >= 2 complete trials with different values
            files[name] = {"skipped": _skip_reason(e)}
    return files


def _plot_section(study, name: str, include_js: bool) -> tuple[str, bool]:
    """One plot as an HTML <section>; True when it holds a figure (and so, maybe, plotly.js)."""
    import optuna
    import plotly.io as pio

    title = f"<h2>{html.escape(name.replace('_', ' '))}</h2>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig = getattr(optuna.visualization, f"plot_{name}")(study)
    except Exception as e:  # same reasons as the PNG's
        return f'<section id="{name}">{title}<p>skipped: {html.escape(_skip_reason(e))}</p></section>', False
    div = pio.to_html(fig, full_html=False, include_plotlyjs=include_js, div_id=f"plot-{name}",
                      default_height="520px", default_width="100%")
    return f'<section id="{name}">{title}{div}</section>', True


def _save_html(study, path: Path) -> Path:
    """Every plot in one interactive page, plotly.js inlined once: cluster pods and KFP UIs may be offline."""
    sections, need_js = [], True
    for name in PLOTS:
        section, drawn = _plot_section(study, name, include_js=need_js)
        sections.append(section)
        need_js = need_js and not drawn
    title = f"Optuna study {study.study_name}"
    return write_text(path, html_page(title, f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections)))


def _save_plots(study, out: Path) -> tuple[dict[str, Any], str]:
    """PNGs per plot (README, bench) and the one interactive HTML (MLflow, KFP)."""
    return _save_pngs(study, out), str(_save_html(study, out / PLOTS_HTML))


def _summary(cfg: Config, study, trials: list, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's content, less plots and files: the keys bench/psamf.py, the CLI and KFP read."""
    by_state = trial_counts(study)
    best = study.best_trial if by_state["COMPLETE"] else None  # best_trial raises before the first
    av = next((t.user_attrs["av_simulated"] for t in trials if "av_simulated" in t.user_attrs), None)
    tc = cfg.tune
    return {
        "stage": "tune", "corpus": cfg.data.corpus, "av_simulated": av, "profile": cfg.profile,
        "study_name": tc.study_name, "storage": redact(storage_url(cfg)), "direction": study.direction.name.lower(),
        "objective": "valid MAE at the best epoch (PSA-MF, ablation: %s)" % cfg.psamf.ablation,
        "n_trials": tc.n_trials, "n_trials_in_study": len(trials), "trials_by_state": by_state,
        "complete": study_finished(study, cfg), "epoch_budget": tc.epoch_budget,
        "best_value": best.value if best else None, "best_trial": best.number if best else None,
        "best_params": best.params if best else None, "pruned": by_state["PRUNED"],
        "epochs_total": sum(r["epochs"] for r in rows),
        "epochs_if_unpruned": (by_state["COMPLETE"] + by_state["PRUNED"]) * tc.epochs,
        "retried": [{"trial": r["number"], "retry_of": r["retry_of"]} for r in rows if r["retry_of"] is not None],
        "search_space": {"psamf.tau": ["log-uniform", tc.tau_min, tc.tau_max],
                         "psamf.split_layer": ["int", 1, encoder_depth(cfg.psamf.encoder) - 1],
                         "psamf.aux_lambda": ["uniform", tc.lambda_min, tc.lambda_max]},
        "sampler": {"name": "TPESampler", "seed": tc.seed, "n_startup_trials": tc.n_startup_trials},
        "pruner": {"name": tc.pruner, "startup_trials": tc.pruner_startup_trials,
                   "warmup_steps": tc.pruner_warmup_steps},
        "epochs_per_trial": tc.epochs, "text_encoder": cfg.psamf.encoder,
        "personality_encoder": cfg.psamf.personality_encoder,
        "heartbeat": {"interval_s": tc.heartbeat_interval, "grace_period_s": tc.grace_period,
                      "max_retry": tc.max_retry},
        "trials": rows,
    }


def _summary_md(cfg: Config, s: dict[str, Any], out: Path) -> str:
    """summary.md: counts, epochs, the best trial and how to train with it, the trials table."""
    by_state = s["trials_by_state"]
    finished = by_state["COMPLETE"] + by_state["PRUNED"]
    md = [f"# Optuna study `{cfg.tune.study_name}` ({cfg.data.corpus})", "",
          provenance(cfg.data.corpus, bool(s["av_simulated"])), "",
          f"Objective: {s['objective']}, minimized. {finished}/{cfg.tune.n_trials} finished trials; "
          f"states: {', '.join(f'{k} {v}' for k, v in by_state.items() if v)}. "
          f"Epochs run: {s['epochs_total']} (unpruned: {s['epochs_if_unpruned']})"
          + (f" of a budget of {cfg.tune.epoch_budget}." if cfg.tune.epoch_budget else "."), ""]
    if s["best_params"] is not None:
        params = ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`"
                           for k, v in s["best_params"].items())
        md += [f"Best: trial {s['best_trial']}, valid MAE {s['best_value']:.4f}, {params}", "",
               f"Train with it: `psamf train --best-params {out / 'best_params.json'}`", ""]
    rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in s["trials"]]
    md.append(markdown_table(rows, ["number", "state", "value", *PARAMS, "epochs", "retry_of", "duration_s"]))
    return "\n".join(md)


def tune_report(cfg: Config, study=None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write best_params.json, summary.json/.md, trials.csv and the plots from the study."""
    import pandas as pd

    if study is None:
        study = load_study(cfg)
    out = report_dir(cfg)
    trials = study.get_trials(deepcopy=False)
    rows = [_trial_row(t) for t in trials]
    summary = {**_summary(cfg, study, trials, rows), **(extra or {})}
    summary["plots"], summary["plots_html"] = _save_plots(study, out / "plots") if trials else ({}, None)
    summary["files"] = {"summary": str(out / "summary.json"), "summary_md": str(out / "summary.md"),
                        "trials_csv": str(out / "trials.csv")}
    if summary["best_params"] is not None:
        summary["files"]["best_params"] = str(write_json(out / "best_params.json", summary["best_params"]))
    write_csv(out / "trials.csv", pd.DataFrame(rows, columns=ROW_COLUMNS))
    write_text(out / "summary.md", _summary_md(cfg, summary, out))
    write_json(out / "summary.json", summary)
    return summary
