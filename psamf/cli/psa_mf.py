"""CLI commands for the PSA-MF stages; `register(app)` adds them to the `psamf` Typer app.

    psamf personality train     fine-tune the Big Five encoder (psamf.psa_mf.personality)
    psamf train [--ablation X]  PSA-MF on the prepared dataset (psamf.psa_mf.train)
    psamf train --text-baseline the text-only baseline on the same encoder and folds
    psamf train --best-params P apply a best_params.json (dotted keys) from `psamf tune`
    psamf tune [--workers N]    Optuna search over tau, N, lambda (psamf.psa_mf.tune); --join on other nodes
    psamf tune-process          (hidden) one worker process that `psamf tune --workers N` starts
"""
# No `from __future__ import annotations`: Typer evaluates the option annotations at runtime.
from pathlib import Path
from typing import Annotated, Optional

import typer

from psamf.cli.common import BestParamsOpt, CorpusOpt, ParamsOpt, ProfileOpt, SetOpt, config_from, echo_json, one_line_errors


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app` (called once by psamf.cli.main)."""

    personality_app = typer.Typer(help="The personality (Big Five) encoder PSA-MF aligns with.",
                                  no_args_is_help=True)
    app.add_typer(personality_app, name="personality")

    @personality_app.command("train")
    @one_line_errors
    def personality_train(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
                          corpus: CorpusOpt = None) -> None:
        """Fine-tune personality.encoder on First Impressions v2 (speaker-disjoint split); writes an HF dir."""
        from psamf.psa_mf.personality import train_personality

        report = train_personality(config_from(params, profile, set_, corpus))
        echo_json({k: v for k, v in report.items() if k != "history"})

    @app.command("train")
    @one_line_errors
    def train_cmd(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
                  corpus: CorpusOpt = None,
                  ablation: Annotated[Optional[str], typer.Option(
                      "--ablation", help="none | no_personality | no_prefusion | no_enhanced_fusion | no_ps | no_clm "
                                         "(same as --set psamf.ablation=...)")] = None,
                  text_baseline: Annotated[bool, typer.Option(
                      "--text-baseline", help="train the text-only baseline (encoder + linear head) instead")] = False,
                  best_params: BestParamsOpt = None,
                  ) -> None:
        """Train PSA-MF (resumable); test metrics in every convention; writes model.pt + metrics.json."""
        from psamf.psa_mf.train import train_psamf, train_text_baseline

        sets = list(set_ or [])
        if ablation is not None:
            sets.append(f"psamf.ablation={ablation}")
        cfg = config_from(params, profile, sets, corpus, best_params)
        report = train_text_baseline(cfg) if text_baseline else train_psamf(cfg)
        echo_json({k: v for k, v in report.items() if k not in ("history", "metric_conventions")})

    @app.command("tune")
    @one_line_errors
    def tune_cmd(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
                 corpus: CorpusOpt = None,
                 workers: Annotated[Optional[int], typer.Option(
                     "--workers", help="local worker processes sharing the study (default tune.workers)")] = None,
                 join: Annotated[bool, typer.Option(
                     "--join", help="join the existing study from another node (same PSAMF_OPTUNA_STORAGE); "
                                    "no report")] = False,
                 report_only: Annotated[bool, typer.Option(
                     "--report-only", help="rewrite the report from the storage; run no trials")] = False,
                 study_per_input: Annotated[bool, typer.Option(
                     "--study-per-input", help="suffix the study name with a hash of code, data, encoders and "
                                               "settings: resume an interrupted search, never another input's")] = False,
                 ) -> None:
        """Optuna search over psamf.tau, psamf.split_layer, psamf.aux_lambda (valid MAE); writes best_params.json."""
        from psamf.psa_mf.tune import keyed_study, tune, tune_report

        cfg = config_from(params, profile, set_, corpus)
        if study_per_input:
            cfg = keyed_study(cfg)
        summary = tune_report(cfg) if report_only else tune(cfg, workers, join=join)
        echo_json({k: v for k, v in summary.items() if k not in ("trials", "search_space", "heartbeat")})

    @app.command("tune-process", hidden=True)
    @one_line_errors
    def tune_process_cmd(
            config: Annotated[Path, typer.Option("--config", help="a resolved config (tune_config.yaml) or params.yaml")],
            profile: ProfileOpt = None,
            worker: Annotated[int, typer.Option("--worker", help="worker index (offsets the sampler seed)")] = 0,
    ) -> None:
        """One worker process of `psamf tune --workers N`: run trials of the existing study until it has
        tune.n_trials finished. Hidden: `tune` starts it (storage URL from $PSAMF_OPTUNA_STORAGE)."""
        import yaml

        from psamf.config import load_config
        from psamf.psa_mf.tune import run_worker

        result = run_worker(load_config(config, profile), worker, parallel=True)
        typer.echo(yaml.safe_dump(result, sort_keys=False).strip())
