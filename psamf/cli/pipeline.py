"""`psamf pipeline ...`: run the KFP pipeline locally, compile it, submit it, schedule it."""
# No `from __future__ import annotations`: Typer resolves these annotations at runtime.
from pathlib import Path
from typing import Annotated

import typer

from psamf.cli.common import ParamsOpt, ProfileOpt, SetOpt, echo_json, one_line_errors


def register(app: typer.Typer) -> None:
    """Add the `pipeline` command group to `app` (called once by psamf.cli.main)."""

    pipe = typer.Typer(help="The Kubeflow pipeline: local run, compile, submit, schedule.", no_args_is_help=True)
    app.add_typer(pipe, name="pipeline")
    HostOpt = Annotated[str, typer.Option("--host", help="KFP API endpoint, e.g. http://localhost:8080")]
    SourceOpt = Annotated[str, typer.Option(
        "--source", help="the corpus: synthetic | dvc | dvc:<md5>[@<remote url>] | s3://bucket/prefix")]

    @pipe.command("run")
    @one_line_errors
    def run(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None, source: SourceOpt = "synthetic",
            root: Annotated[Path, typer.Option(help="kfp.local pipeline_root (task outputs)")] = Path("reports/kfp"),
            no_cache: Annotated[bool, typer.Option(
                "--no-cache", help="run every task; by default kfp.local's cache (<root>/.kfp_cache) "
                                   "serves each task whose code, data and params are unchanged")] = False,
            verbose: Annotated[bool, typer.Option("--verbose", help="show kfp.local's full output")] = False,
            ) -> None:
        """Run the whole DAG locally with kfp.local's SubprocessRunner (no cluster, no Docker)."""
        from psamf.cli.kfp import run_local

        echo_json(run_local(profile, list(set_ or []), root, cache=not no_cache, params=params,
                            data_source=source, verbose=verbose))

    @pipe.command("compile")
    @one_line_errors
    def compile_(out: Annotated[Path, typer.Option(help="YAML to write")] = Path("reports/psamf-training.yaml")) -> None:
        """Compile the pipeline for a cluster (component image from $PSAMF_IMAGE)."""
        from psamf.cli.kfp import compile_pipeline

        typer.echo(str(compile_pipeline(out)))

    @pipe.command("submit")
    @one_line_errors
    def submit(host: HostOpt, params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
               source: SourceOpt = "synthetic") -> None:
        """Submit one run to a KFP cluster (params file, profile and overrides travel as pipeline parameters)."""
        from psamf.cli.kfp import submit as do_submit

        echo_json(do_submit(host, profile, list(set_ or []), params=params, data_source=source))

    @pipe.command("schedule")
    @one_line_errors
    def schedule(host: HostOpt,
                 cron: Annotated[str, typer.Option("--cron", help="6-field cron, seconds first: '0 0 3 * * *'")],
                 name: Annotated[str, typer.Option(help="recurring run name")] = "psamf-retrain",
                 params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
                 source: SourceOpt = "synthetic") -> None:
        """Create a recurring run (max_concurrency 1, no catch-up); KFP's cache skips unchanged code+data+params."""
        from psamf.cli.kfp import schedule as do_schedule

        echo_json(do_schedule(host, cron, profile, list(set_ or []), name=name, params=params, data_source=source))
