"""The one error type for bad input: the CLI prints it as a single line and exits non-zero."""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input: `where` names the file, field or segment; `what` says what is wrong."""

    def __init__(self, where: str | Path, what: str):
        self.where = str(where)
        self.what = what
        super().__init__(f"{self.where}: {what}")


class StageFailed(Exception):
    """A stage ran and failed on its own terms (its data failed validation, its training run
    diverged): not bad input, but as plain to report. The CLI prints one line and exits
    `exit_code` (1; bad input is 2)."""

    exit_code = 1


class ValidationFailed(StageFailed, RuntimeError):
    """The data failed its expectations (psamf.validation); the message names each failure."""


class TaskFailed(StageFailed):
    """A pipeline task failed (kfp.local): its name and its own one-line error, with the exit code
    the stage command would have given (2 bad input, 1 failed validation or a diverged run)."""

    def __init__(self, task: str, message: str, exit_code: int = 1):
        self.task, self.message, self.exit_code = task, message, exit_code
        super().__init__(f"pipeline task {task} failed: {message}")
