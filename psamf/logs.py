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


_FACTORY_MARK = "_psamf_redacts"


def install_redaction() -> None:
    """Mask credentials in every log record this process makes, whatever handler it reaches.

    A filter on the root handlers (RedactFilter) is lost whenever a library swaps them: kfp.local
    replaces the root handlers around every task and pipeline run (`local_logger_context`), and a
    task's own process has none (its records reach logging's last-resort handler). So the record
    is masked where it is made, by the record factory; idempotent."""
    old = logging.getLogRecordFactory()
    if getattr(old, _FACTORY_MARK, False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = old(*args, **kwargs)
        try:
            record.msg, record.args = redact(record.getMessage()), None
        except Exception:  # a bad format string: logging reports it when the record is emitted
            pass
        return record

    setattr(factory, _FACTORY_MARK, True)
    logging.setLogRecordFactory(factory)


def configure(level: str = "WARNING") -> None:
    """Root logging at `level` with FORMAT and RedactFilter; tqdm throttled when stderr is not a
    terminal (before any bar is made: tqdm reads TQDM_* overrides when it is imported)."""
    try:
        numeric = logging.getLevelNamesMapping()[level.upper()]
    except KeyError:
        from psamf.errors import InputError

        raise InputError("--log-level", f"{level!r} is not one of DEBUG, INFO, WARNING, ERROR") from None
    install_redaction()
    logging.basicConfig(level=numeric, format=FORMAT)
    logging.getLogger().setLevel(numeric)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", NON_TTY_BAR_INTERVAL_S)
