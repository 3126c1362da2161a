"""`psamf pipeline ...`: run the KFP pipeline locally, compile it, submit it, schedule it."""
# No `from __future__ import annotations`: Typer resolves these annotations at runtime.
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `pipeline` command group to `app` (called once by psamf.cli)."""
    from psamf.cli import ParamsOpt, ProfileOpt, SetOpt, echo_json, one_line_errors

    pipe = typer.Typer(help="The Kubeflow pipeline: local run, compile, submit, schedule.", no_args_is_help=True)
    app.add_typer(pipe, name="pipeline")
    HostOpt = Annotated[str, typer.Option("--host", help="KFP API endpoint, e.g. http://localhost:8080")]

    def _overrides(params: Optional[Path], sets: Optional[list[str]]) -> list[str]:
        if params is not None:  # tasks read ./params.yaml (or $PSAMF_PARAMS); keep them on the same file
            import os
            os.environ["PSAMF_PARAMS"] = str(params.resolve())
        return list(sets or [])

    @pipe.command("run")
    @one_line_errors
    def run(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
            root: Annotated[Path, typer.Option(help="kfp.local pipeline_root (task outputs)")] = Path("reports/kfp"),
            ) -> None:
        """Run the whole DAG locally with kfp.local's SubprocessRunner (no cluster, no Docker)."""
        from psamf.pipeline import run_local

        echo_json(run_local(profile or "demo", _overrides(params, set_), root))

    @pipe.command("compile")
    @one_line_errors
    def compile_(out: Annotated[Path, typer.Option(help="YAML to write")] = Path("reports/psamf-training.yaml")) -> None:
        """Compile the pipeline for a cluster (component image from $PSAMF_IMAGE)."""
        from psamf.pipeline import compile_pipeline

        typer.echo(str(compile_pipeline(out)))

    @pipe.command("submit")
    @one_line_errors
    def submit(host: HostOpt, params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
        """Submit one run to a KFP cluster."""
        from psamf.pipeline import submit as do_submit

        echo_json(do_submit(host, profile or "demo", _overrides(params, set_)))

    @pipe.command("schedule")
    @one_line_errors
    def schedule(host: HostOpt,
                 cron: Annotated[str, typer.Option("--cron", help="6-field cron, seconds first: '0 0 3 * * *'")],
                 name: Annotated[str, typer.Option(help="recurring run name")] = "psamf-retrain",
                 params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
        """Create a recurring run (max_concurrency 1, no catch-up); unchanged data+code skips retraining."""
        from psamf.pipeline import schedule as do_schedule

        echo_json(do_schedule(host, cron, profile or "demo", _overrides(params, set_), name=name))
