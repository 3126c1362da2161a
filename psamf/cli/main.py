"""`psamf` command line: one Typer command per stage, all reading the same config tree.

Every command takes `--params`, `--profile` and repeated `--set section.key=value`.
Bad input ends in one line on stderr (`psamf: error: <where>: <what>`) and exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from psamf.cli.common import (BestParamsOpt, CorpusOpt, ParamsOpt, ProfileOpt, SetOpt, config_from, echo_json,
                               one_line_errors)
from psamf.config import Config
from psamf.errors import InputError

app = typer.Typer(help="Personalized multimodal sentiment analysis pipeline.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Corpora: build, simulate, ingest, validate.", no_args_is_help=True)
app.add_typer(data_app, name="data")

@app.callback()
def _options(ctx: typer.Context, log_level: Annotated[str, typer.Option(
        "--log-level", envvar="PSAMF_LOG_LEVEL", help="DEBUG | INFO | WARNING | ERROR")] = "WARNING") -> None:
    """Personalized multimodal sentiment analysis pipeline."""
    from psamf.logs import configure
    from psamf.resources import skip_final_gc_at_exit

    skip_final_gc_at_exit()  # one command per process: `dvc repro` starts one per stage

    try:
        configure(log_level)
    except InputError as e:
        typer.echo(f"psamf: error: {e}", err=True)
        raise typer.Exit(2) from None
    from tqdm.contrib.logging import logging_redirect_tqdm

    ctx.with_resource(logging_redirect_tqdm())  # log lines do not tear a progress bar apart


@app.command("config")
@one_line_errors
def show_config(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
                corpus: CorpusOpt = None) -> None:
    """Print the resolved config (profile merged, overrides applied)."""
    echo_json(config_from(params, profile, set_, corpus).loggable())


@data_app.command("synth")
@one_line_errors
def data_synth(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
               out: Annotated[Optional[Path], typer.Option(help="default: <raw_dir>/synthetic")] = None) -> None:
    """Write the synthetic corpus (SDK layout + First Impressions-format personality corpus)."""
    from psamf.data.synth import write_synthetic_corpus

    cfg = config_from(params, profile, set_, "synthetic")
    echo_json(write_synthetic_corpus(cfg, out))


@data_app.command("simulate-av")
@one_line_errors
def data_simulate_av(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
                     corpus: Annotated[str, typer.Option("--corpus", help="mosi | mosei")] = "mosi",
                     out: Annotated[Optional[Path], typer.Option(help="default: <raw_dir>/<corpus>")] = None) -> None:
    """Write simulated COVAREP/FACET CSDs for the real MOSI (or MOSEI) labels (marked as simulated)."""
    from psamf.data.mosi import simulate_av

    cfg = config_from(params, profile, set_, corpus)
    echo_json(simulate_av(cfg, out))


@data_app.command("ingest")
@one_line_errors
def data_ingest(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
                corpus: CorpusOpt = None) -> None:
    """Align the corpus to fixed-length segments and write the prepared dataset."""
    from psamf.data.ingest import ingest

    cfg = config_from(params, profile, set_, corpus)
    echo_json(ingest(cfg))


@data_app.command("export")
@one_line_errors
def data_export(out: Annotated[Path, typer.Argument(help="the pickle to write, e.g. psamf_mosi.pkl")],
                format_: Annotated[str, typer.Option("--format", help="mmsa (MMSA's MMDataLoader layout)")] = "mmsa",
                params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
                corpus: CorpusOpt = None) -> None:
    """Write the prepared corpus as an MMSA pickle, so MMSA's models train on psamf's data and splits."""
    from psamf.data.pickles import export_mmsa

    if format_ != "mmsa":
        raise InputError("--format", f"unknown export format {format_!r} (mmsa)")
    cfg = config_from(params, profile, set_, corpus)
    echo_json(export_mmsa(cfg, out))


@data_app.command("validate")
@one_line_errors
def data_validate(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
                  corpus: CorpusOpt = None,
                  out: Annotated[Optional[Path], typer.Option(help="default: reports/validation/<corpus>")] = None) -> None:
    """Run the great-expectations suites; write data docs + summary; exit 1 naming each failure."""
    from psamf.validation import validate

    cfg = config_from(params, profile, set_, corpus)
    result = validate(cfg, out)
    for failure in result.failures:
        typer.echo(f"psamf: validation failed: {failure}", err=True)
    typer.echo(f"validation {'passed' if result.success else 'FAILED'}: {result.summary_path}")
    if not result.success:
        raise typer.Exit(1)


HeldOutOpt = Annotated[Optional[str], typer.Option("--held-out", "--user", help="the LOO speaker id")]
RankOpt = Annotated[Optional[int], typer.Option("--rank", help="the LOO user by rank (0 = most segments); "
                                                               "for DVC/KFP fan-out over static slots")]


def _loo_user(cfg: Config, user: str | None, rank: int | None) -> str | None:
    if (user is None) == (rank is None):
        raise InputError("--held-out/--rank", "give exactly one of a speaker id or a rank")
    if user is not None:
        return user
    from psamf.mult.loo import user_at_rank

    return user_at_rank(cfg, rank)


def _skip_slot(cfg: Config, out_dir: str, rank: int) -> None:
    """A rank slot beyond data.loo_users: leave the skipped-slot marker so DVC sees a finished stage."""
    from psamf.mult.loo import skipped_slot_file, write_skipped_slot

    write_skipped_slot(cfg, skipped_slot_file(cfg, out_dir, rank), rank)
    typer.echo(f"rank {rank} >= data.loo_users={cfg.data.loo_users}: nothing to do")


@app.command("pretrain")
@one_line_errors
def pretrain_cmd(held_out: HeldOutOpt = None, rank: RankOpt = None, params: ParamsOpt = None,
                 profile: ProfileOpt = None, set_: SetOpt = None, corpus: CorpusOpt = None) -> None:
    """Pretrain MulT + User Adapter on every speaker except the held-out one (resumable)."""
    from psamf.mult.pretrain import pretrain

    cfg = config_from(params, profile, set_, corpus)
    user = _loo_user(cfg, held_out, rank)
    if user is None:
        return _skip_slot(cfg, cfg.pretrain.out_dir, rank)
    report = pretrain(cfg, user)
    echo_json({k: v for k, v in report.items() if k != "history"})


@app.command("finetune")
@one_line_errors
def finetune_cmd(user: HeldOutOpt = None, rank: RankOpt = None, params: ParamsOpt = None,
                 profile: ProfileOpt = None, set_: SetOpt = None, corpus: CorpusOpt = None,
                 best_params: BestParamsOpt = None) -> None:
    """baseline / FS-UA / FS-UA-KD over R seeded k-shot draws for one user."""
    from psamf.mult.finetune import finetune

    cfg = config_from(params, profile, set_, corpus, best_params)
    who = _loo_user(cfg, user, rank)
    if who is None:
        return _skip_slot(cfg, cfg.finetune.out_dir, rank)
    report = finetune(cfg, who)
    echo_json({"user": who, "summary": {v: {k: round(c["mean"], 4) for k, c in m.items()}
                                        for v, m in report["summary"].items()}, "paired": report["paired"]})


@app.command("loo")
@one_line_errors
def loo_cmd(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None, corpus: CorpusOpt = None,
            report_only: Annotated[bool, typer.Option("--report-only", help="only collect existing per-user reports")] = False,
            reports: Annotated[Optional[list[Path]], typer.Argument(help="finetune report files to collect "
                                                                    "(default: <finetune.out_dir>/<corpus>/<user>.json)")] = None,
            out: Annotated[Optional[Path], typer.Option(help="report dir (default: <finetune.out_dir>/<corpus>)")] = None,
            select: Annotated[bool, typer.Option(
                "--select", help="choose the fine-tuning knobs on the data.selection_users speakers (never the "
                                 "report speakers); writes <finetune.out_dir>/<corpus>/select/best_params.json")] = False,
            best_params: BestParamsOpt = None) -> None:
    """The leave-one-out experiment over the K users with the most segments: tables, CSV, chart.

    Choose the fine-tuning knobs first, on other speakers: `psamf loo --select`, then
    `psamf loo --best-params <finetune.out_dir>/<corpus>/select/best_params.json`."""
    from psamf.mult.loo import loo, tracked_loo_report

    cfg = config_from(params, profile, set_, corpus, best_params)
    if select:
        from psamf.mult.select import select_finetune

        summary = select_finetune(cfg)
        echo_json({k: summary[k] for k in ("selection_users", "best_params", "best_value", "best_trial_means",
                                           "files")})
        return
    if report_only or reports:
        echo_json(tracked_loo_report(cfg, report_files=reports or None, out_dir=out))
    else:
        echo_json(loo(cfg))


@app.command("report")
@one_line_errors
def report_cmd(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None, corpus: CorpusOpt = None,
               loo: Annotated[Optional[Path], typer.Option(help="the LOO report's loo_summary.json "
                                                           "(default: <finetune.out_dir>/<corpus>/loo_summary.json)")] = None,
               model: Annotated[Optional[Path], typer.Option(help="the trained PSA-MF dir with predictions.csv "
                                                             "(default: <train.out_dir>/<corpus>)")] = None,
               out: Annotated[Path, typer.Option(help="report dir")] = Path("reports/personalization")) -> None:
    """One personalization page: baseline / FS-UA / FS-UA-KD / PSA-MF / cold start per LOO user, with CIs."""
    from psamf.reports.personalization import report
    from psamf.psa_mf.train import default_out_dir

    cfg = config_from(params, profile, set_, corpus)
    loo = loo or Path(cfg.finetune.out_dir) / cfg.data.corpus / "loo_summary.json"
    summary = report(cfg, loo, model or default_out_dir(cfg), out)
    typer.echo(f"personalization report: {summary['files']['html']} ({len(summary['users'])} users)")


DVC_VARS_FILE = Path("dvc_vars.yaml")  # dvc.yaml's `vars`


def dvc_vars_text(cfg) -> str:
    """dvc.yaml's vars, resolved from the config as `psamf` resolves it (profile merged).

    DVC reads params.yaml's top-level keys only and knows nothing of `profile`, so a path that a
    profile moves (data.corpus: mosi under `paper`) would be the default's; dvc.yaml uses these
    instead. DVC refuses a var that params.yaml already defines, hence the `resolved` section."""
    from psamf.config import loo_rank_slots
    from psamf.psa_mf.train import default_out_dir

    corpus = cfg.data.corpus
    resolved = {"profile": cfg.profile, "corpus": corpus, "model_dir": default_out_dir(cfg).as_posix(),
                "tune_dir": (Path(cfg.tune.out_dir) / corpus).as_posix()}
    lines = ["# Written by `psamf dvc-vars` (`make dvc_vars.yaml`) from params.yaml with its profile merged; "
             "do not edit.", f"loo_ranks: {loo_rank_slots(cfg)}", "resolved:"]
    lines += [f"  {k}: {v}" for k, v in resolved.items()]
    return "\n".join(lines) + "\n"


@app.command("dvc-vars")
@one_line_errors
def dvc_vars_cmd(params: ParamsOpt = None,
                 out: Annotated[Path, typer.Option(help="the vars file dvc.yaml reads")] = DVC_VARS_FILE) -> None:
    """Write dvc.yaml's vars: the LOO rank slots (DVC's foreach cannot count to data.loo_users) and
    the paths the profile decides (corpus, model and tune dirs), resolved as every stage resolves them.

    No --profile/--set: `dvc repro` runs with the params file as it is, so the vars must too."""
    from psamf.config import load_config
    from psamf.io import write_text

    text = dvc_vars_text(load_config(params))
    write_text(out, text)
    typer.echo(f"{out}:\n{text.split(chr(10), 1)[1]}", nl=False)


@app.command("demo")
@one_line_errors
def demo(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
         root: Annotated[Path, typer.Option(help="kfp.local pipeline_root (task outputs)")] = Path("reports/kfp"),
         verbose: Annotated[bool, typer.Option("--verbose", help="show kfp.local's full output, not a line per task")] = False,
         no_cache: Annotated[bool, typer.Option("--no-cache", help="run every task, not only those whose "
                                                "code, data or params changed (kfp.local's cache)")] = False,
         ) -> None:
    """The main job: the whole pipeline (the KFP DAG, run locally) on the embedded default.

    corpus -> ingest -> validate -> personality | LOO pretrain/finetune | tune -> train -> register;
    ends with the registry's champion. Same as `psamf pipeline run`, plus a summary."""
    from psamf.cli.kfp import run_local
    from psamf.registry.gate import list_versions, registered_name
    from psamf.tracking import tracking_uri

    cfg = config_from(params, profile, set_)
    result = run_local(cfg.profile, list(set_ or []), root, params=params, verbose=verbose, cache=not no_cache)
    listing = list_versions(cfg, registered_name(cfg, "psamf"))
    champ = next((v for v in listing["versions"] if v["champion"]), None)
    cached = f" ({result['cached_tasks']} task(s) served from kfp.local's cache)" if result.get("cached_tasks") else ""
    typer.echo(f"pipeline finished in {result['wall_s']} s{cached}; task outputs under {result['pipeline_root']}")
    if result.get("report"):
        typer.echo(f"personalization report (HTML): {result['report']}")
    if champ is None:
        typer.echo(f"{listing['model_name']}: no champion", err=True)
        raise typer.Exit(1)
    m = champ["metrics"]
    typer.echo(f"{listing['model_name']}@champion = v{champ['version']}: {cfg.registry.eval_split} MAE "
               f"{m.get('mae', float('nan')):.3f}, Non0-Acc2 {m.get('non0_acc2', float('nan')):.3f} (the gate's "
               f"selection score; the test numbers are in the train run's metrics.json)")
    from mlflow.tracking import MlflowClient

    from psamf.tracking import experiment_link

    exp = MlflowClient(tracking_uri(cfg)).get_experiment_by_name(cfg.tracking.experiment)
    ui = "http://127.0.0.1:5000"
    typer.echo(f"browse: mlflow ui --backend-store-uri {tracking_uri(cfg)}, then "
               f"{experiment_link(ui, exp.experiment_id) if exp else ui}")


@app.command("tracking-user")
@one_line_errors
def tracking_user(
    username_env: Annotated[str, typer.Option(help="env var holding the user name to create")] = "PSAMF_USER_NAME",
    password_env: Annotated[str, typer.Option(help="env var holding its password")] = "PSAMF_USER_PASSWORD",
) -> None:
    """Create or update a user on an MLflow basic-auth server, as the admin in MLFLOW_TRACKING_USERNAME/PASSWORD.

    Names and passwords come from the environment, never argv (which every process in a pod can read)."""
    import os

    from psamf.tracking import ensure_user

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    missing = [n for n in ("MLFLOW_TRACKING_URI", username_env, password_env) if not os.environ.get(n)]
    if missing:
        raise InputError("environment", f"{', '.join(missing)} not set")
    typer.echo(f"{os.environ[username_env]}: {ensure_user(uri, os.environ[username_env], os.environ[password_env])}")


def _register_extensions() -> None:
    """Stage groups that live in their own modules add their commands here."""
    from psamf.cli import pipeline, psa_mf, registry

    for module in (psa_mf, registry, pipeline):
        module.register(app)


_register_extensions()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
