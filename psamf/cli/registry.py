"""CLI commands for the registry stages; `register(app)` adds them to the `psamf` Typer app.

    psamf register --model mult|psamf [--held-out U] [--run-id R]   log pyfunc, score, gate
    psamf compare [--model mult|psamf] [--json]                      versions, metrics, aliases
    psamf promote --model mult|psamf --version V --reason "..."      move @champion by hand
"""
# No `from __future__ import annotations`: Typer reads the option annotations at runtime.
from typing import Annotated, Any, Optional

import typer

from psamf.cli.common import CorpusOpt, ParamsOpt, ProfileOpt, SetOpt, config_from, echo_json, one_line_errors

TABLE_METRICS = ("mae", "non0_acc2", "non0_f1", "corr", "acc7")


def _short(value: Any, n: int) -> str:
    s = "" if value is None else str(value)
    return s if len(s) <= n else s[: n - 1] + "…"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_table(listing: dict[str, Any]) -> str:
    """One registered model's versions as a fixed-width table; `*` marks the champion."""
    name = listing["model_name"]
    if not listing["registered"]:
        return f"{name}: not registered yet (run `psamf register`)\n"
    head = (f"{name}: champion v{listing['champion'] or '-'}, challenger v{listing.get('challenger') or '-'}, "
            f"{len(listing['versions'])} version(s)")
    cols = ["", "version", "aliases", *TABLE_METRICS, "verdict", "test set", "run"]
    rows = []
    for v in listing["versions"]:
        rows.append(["*" if v["champion"] else "", v["version"], ",".join(v["aliases"]) or "-",
                     *(_num(v["metrics"].get(k)) for k in TABLE_METRICS), v["verdict"] or "-",
                     _short(v["test_set_id"], 60), _short(v["run_id"], 8)])
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app` (called once by psamf.cli.main)."""

    ModelOpt = Annotated[str, typer.Option("--model", help="mult (MulT + User Adapter) | psamf (PSA-MF)")]

    @app.command("register")
    @one_line_errors
    def register_cmd(
        model: ModelOpt,
        run_id: Annotated[Optional[str], typer.Option("--run-id", help="log into this run (e.g. the training "
                                                      "run); default: a new `register` stage run")] = None,
        held_out: Annotated[Optional[str], typer.Option("--held-out", help="mult: the held-out speaker whose "
                                                        "pretrained model to register (default: the first LOO user)")] = None,
        model_dir: Annotated[Optional[str], typer.Option("--model-dir", help="default: from the config")] = None,
        out: Annotated[Optional[str], typer.Option("--out", help="also write the decision JSON here (atomic; "
                                                   "dvc.yaml's register output)")] = None,
        params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None, corpus: CorpusOpt = None,
    ) -> None:
        """Log the trained model as pyfunc, score it on its test set, gate it against @champion."""
        from psamf.io import write_json
        from psamf.registry.gate import register_stage

        cfg = config_from(params, profile, set_, corpus)
        result = register_stage(cfg, model, run_id=run_id, held_out=held_out, model_dir=model_dir)
        if out:
            write_json(out, result)
        echo_json(result)
        where = "duplicate of an earlier registration: " if result["duplicate"] else ""
        typer.echo(f"{where}{result['model_name']} v{result['version']} -> "
                   f"{'@champion' if result['promoted'] else '@challenger'} [{result['verdict']}] "
                   f"{result['reason']}", err=True)

    @app.command("compare")
    @one_line_errors
    def compare_cmd(
        model: Annotated[Optional[str], typer.Option("--model", help="only this one: mult | psamf")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
        params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
    ) -> None:
        """Registered versions of both models: test metrics, aliases, gate verdicts, the champion."""
        from psamf.registry.gate import MODELS, list_versions, registered_name

        cfg = config_from(params, profile, set_)
        which = [model] if model else list(MODELS)
        listings = [list_versions(cfg, registered_name(cfg, w)) for w in which]
        if as_json:
            echo_json({"models": listings})
        else:
            typer.echo("\n".join(format_table(x) for x in listings), nl=False)

    @app.command("promote")
    @one_line_errors
    def promote_cmd(
        model: ModelOpt,
        version: Annotated[str, typer.Option("--version", help="the registry version to make champion")],
        reason: Annotated[str, typer.Option("--reason", help="recorded on the version")],
        params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None,
    ) -> None:
        """Move @champion by hand, bypassing the gate (e.g. after an `incomparable` verdict)."""
        from psamf.registry.gate import promote, registered_name

        cfg = config_from(params, profile, set_)
        echo_json(promote(cfg, registered_name(cfg, model), version, reason))
