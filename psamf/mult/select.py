"""Personalized MulT's fine-tuning knobs, chosen on selection speakers: `psamf loo --select`.

    select_finetune(cfg)  for each of the data.selection_users speakers (the next ones by segment
                          count after the data.loo_users report speakers), pretrain MulT without it
                          and without every report speaker; then an Optuna search over
                          finetune.{epochs, dropout, kd_lambda, lr_base, lr_adapter, stratified},
                          each trial scored by the mean FS-UA-KD MAE over the selection speakers'
                          R draws. Writes <finetune.out_dir>/<corpus>/select/:
                            best_params.json  the chosen values as dotted keys
                                              (`psamf loo --best-params ...` applies them)
                            selection.json    the choice and its evidence (speakers, the objective,
                                              every trial's value)
                            trials.csv        study.trials_dataframe()

The report speakers never enter this: not as a held-out user, not as pretraining data.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from psamf import tracking
from psamf.config import Config
from psamf.errors import InputError
from psamf.io import write_json
from psamf.mult.finetune import VARIANTS, finetune_draws
from psamf.mult.pretrain import mult_inputs, pretrain
from psamf.reports.html import write_csv

log = logging.getLogger(__name__)

OBJECTIVE = "fs_ua_kd"  # the method the paper proposes: its MAE, mean over selection speakers


def search_space(trial) -> dict[str, Any]:
    """The fine-tuning knobs a trial sets, as dotted config keys."""
    return {
        "finetune.epochs": trial.suggest_int("finetune.epochs", 1, 40, log=True),
        "finetune.dropout": trial.suggest_categorical("finetune.dropout", [False, True]),
        "finetune.kd_lambda": trial.suggest_float("finetune.kd_lambda", 0.0, 1.0),
        "finetune.lr_base": trial.suggest_float("finetune.lr_base", 1e-5, 1e-3, log=True),
        "finetune.lr_adapter": trial.suggest_float("finetune.lr_adapter", 1e-4, 1e-2, log=True),
        "finetune.stratified": trial.suggest_categorical("finetune.stratified", [False, True]),
    }


def with_params(cfg: Config, params: dict[str, Any]) -> Config:
    fc = dataclasses.replace(cfg.finetune, **{k.split(".", 1)[1]: v for k, v in params.items()})
    return dataclasses.replace(cfg, finetune=fc)


def select_dir(cfg: Config) -> Path:
    return Path(cfg.finetune.out_dir) / cfg.data.corpus / "select"


def select_finetune(cfg: Config, n_trials: int | None = None) -> dict[str, Any]:
    """Choose the fine-tuning knobs on the selection speakers; see the module docstring."""
    import optuna

    ds, tensors, source = inputs = mult_inputs(cfg)
    report_users = ds.loo_users(cfg.data.loo_users)
    users = ds.selection_users(cfg.data.loo_users, cfg.data.selection_users)
    if not users:
        raise InputError("data.selection_users", f"the {cfg.data.corpus} corpus has no speaker left after the "
                                                 f"{len(report_users)} report speakers (data.loo_users)")
    short = [u for u in users if (ds.segments["speaker_id"] == u).sum() <= cfg.finetune.k_shot]
    if short:
        raise InputError("data.selection_users", f"selection speakers with no more than k_shot="
                                                 f"{cfg.finetune.k_shot} segments: {', '.join(short)}")
    # Their own pretrained models, without every report speaker: kept apart from the LOO's.
    sel_cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(
        cfg.pretrain, out_dir=str(Path(cfg.pretrain.out_dir) / "select")))
    out = select_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    n = n_trials or cfg.finetune.select_trials
    with tracking.stage_run(cfg, "loo-select", "loo-select", {"selection_users": ",".join(users)}):
        for u in users:
            pretrain(sel_cfg, u, exclude=tuple(report_users))

        def objective(trial) -> float:
            trial_cfg = with_params(sel_cfg, search_space(trial))
            per_user = {u: finetune_draws(trial_cfg, u, inputs)["summary"] for u in users}
            for v in VARIANTS:
                trial.set_user_attr(f"{v}_mae", float(np.mean([s[v]["mae"]["mean"] for s in per_user.values()])))
            return trial.user_attrs[f"{OBJECTIVE}_mae"]

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", study_name="loo-select",
                                    sampler=optuna.samplers.TPESampler(seed=cfg.finetune.seed))
        study.optimize(objective, n_trials=n, show_progress_bar=True)
        best = study.best_trial
        trials = study.trials_dataframe(attrs=("number", "value", "params", "user_attrs", "state"))
        write_csv(out / "trials.csv", trials)
        write_json(out / "best_params.json", best.params)
        summary = {"corpus": cfg.data.corpus, "av_simulated": ds.av_simulated, "text_features": source,
                   "objective": f"mean {OBJECTIVE} MAE over the selection speakers' draws (minimized)",
                   "selection_users": users, "report_users_left_out": report_users,
                   "k_shot": cfg.finetune.k_shot, "draws": cfg.finetune.draws, "n_trials": n,
                   "best_trial": best.number, "best_value": best.value, "best_params": best.params,
                   "best_trial_means": {k: v for k, v in best.user_attrs.items()},
                   "files": {"best_params": str(out / "best_params.json"), "trials": str(out / "trials.csv")}}
        write_json(out / "selection.json", summary)
        tracking.log_metrics({f"select_{k}": v for k, v in best.user_attrs.items()})
        tracking.set_tags({f"select.{k}": v for k, v in best.params.items()})
        for f in ("best_params.json", "selection.json", "trials.csv"):
            tracking.log_artifact(out / f, "loo_select")
    return summary
