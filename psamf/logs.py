"""Logging, configured once per process by the CLI: level, one format, credentials masked, and
progress bars that suit where the output goes."""
from __future__ import annotations

import logging
import os
import sys

from psamf.redact import redact

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NON_TTY_BAR_INTERVAL_S = "30"  # pod logs and CI keep a bar line every 30 s, not a line per update


class RedactFilter(logging.Filter):
    """Masks credentials in every record that reaches a handler (psamf.redact)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def configure(level: str = "WARNING") -> None:
    """Root logging at `level` with FORMAT and RedactFilter; tqdm throttled when stderr is not a
    terminal (before any bar is made: tqdm reads TQDM_* overrides when it is imported)."""
    try:
        numeric = logging.getLevelNamesMapping()[level.upper()]
    except KeyError:
        from psamf.errors import InputError

        raise InputError("--log-level", f"{level!r} is not one of DEBUG, INFO, WARNING, ERROR") from None
    logging.basicConfig(level=numeric, format=FORMAT)
    logging.getLogger().setLevel(numeric)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", NON_TTY_BAR_INTERVAL_S)
