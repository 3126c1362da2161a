"""CLI commands for the registry stages; `register(app)` adds them to the `psamf` Typer app."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app` (called once by psamf.cli)."""
