"""The one error type for bad input: the CLI prints it as a single line and exits non-zero."""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input: `where` names the file, field or segment; `what` says what is wrong."""

    def __init__(self, where: str | Path, what: str):
        self.where = str(where)
        self.what = what
        super().__init__(f"{self.where}: {what}")
