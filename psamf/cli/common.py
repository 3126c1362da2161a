"""What every `psamf` command shares: the config options, the one-line error contract, JSON out.

Its own module so that psamf.cli.main and the command groups it registers (cli_psamf, cli_registry,
cli_pipeline) all import it, and none of them imports another."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from psamf.config import Config, load_config
from psamf.errors import InputError, StageFailed

ParamsOpt = Annotated[Optional[Path], typer.Option("--params", help="params.yaml path (default: ./params.yaml or $PSAMF_PARAMS)")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="smoke | demo | paper")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override any key: section.key=value")]
BestParamsOpt = Annotated[Optional[Path], typer.Option(
    "--best-params", help="a JSON of dotted keys (best_params.json from `psamf tune` or `psamf loo --select`) "
                          "applied as overrides; --set wins over it")]
CorpusOpt = Annotated[Optional[str], typer.Option("--corpus", help="synthetic | mosi | mosei | sims (same as --set data.corpus=...)")]


def config_from(params: Path | None, profile: str | None, sets: list[str] | None,
                corpus: str | None = None, best_params: Path | None = None) -> Config:
    overrides = list(sets or [])
    if best_params is not None:
        from psamf.config import best_params_overrides

        overrides = best_params_overrides(best_params) + overrides
    if corpus:
        overrides.append(f"data.corpus={corpus}")
    cfg = load_config(params, profile, overrides)
    from psamf.checkpoints import ensure_local_root

    ensure_local_root(cfg)
    return cfg


def one_line_errors(fn: Callable) -> Callable:
    """The one-line contract: `psamf: error: <what>` on stderr, then exit 2 for bad input
    (InputError), or the StageFailed's exit code (1) for a stage that failed on its own terms:
    failed validation, a diverged training run, a failed pipeline task."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, StageFailed) as e:
            from psamf.redact import redact

            typer.echo(f"psamf: error: {redact(str(e))}", err=True)
            raise typer.Exit(2 if isinstance(e, InputError) else e.exit_code) from None

    return wrapper


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
