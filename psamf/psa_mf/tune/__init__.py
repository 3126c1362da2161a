"""`psamf tune`: an Optuna search over PSA-MF's τ, N and λ (PSA-MF §4 Search).

    create_study(cfg)               the study in its storage, created ONCE before any worker starts
    run_worker(cfg, worker=0)       one worker: runs trials until the study has tune.n_trials finished
    tune(cfg, workers=None)         create the study, run the workers, write the report
    tune_report(cfg, study=None)    (re)write the report from the storage (`psamf tune --report-only`)
    psamf tune-process --config PATH --worker I     the worker process `tune` starts (hidden command)

Modules:

    search    storage and dialects, sampler, pruner, study, search space, the objective, epoch budget
    workers   one worker's locked trial loop, worker processes, preflight, the `tune` stage
    report    best_params.json, summaries, plots (PNG + one interactive HTML), MLflow logging
"""
from psamf.psa_mf.tune.report import PLOTS, PLOTS_HTML, finish_study, tune_report
from psamf.psa_mf.tune.search import (PARAMS, STORAGE_ENV, Objective, apply_params, budget_allows_trial, create_study,
                               encoder_depth, epochs_spent, keyed_study, load_study, make_pruner, make_sampler,
                               make_storage, report_dir, storage_url, study_finished, suggest, trial_counts)
from psamf.psa_mf.tune.workers import preflight, run_worker, tune, worker_argv

__all__ = ["PARAMS", "PLOTS", "PLOTS_HTML", "STORAGE_ENV", "Objective", "apply_params",
           "budget_allows_trial", "create_study", "encoder_depth", "epochs_spent", "finish_study", "keyed_study",
           "load_study", "make_pruner", "make_sampler", "make_storage", "preflight",
           "report_dir", "run_worker", "storage_url", "study_finished", "suggest", "trial_counts", "tune",
           "tune_report", "worker_argv"]
