"""A named mutex across processes and machines, on whatever database they already share.

    PostgreSQL  a session-level pg_advisory_lock on a dedicated connection: released by the
                server when the holder dies, so a crashed worker never leaves it held
    sqlite      a FileLock (flock) on a file in the temp dir named after the database: released by
                the kernel when the holder dies
    other       no lock (kind == "none"); callers say what that means for them

Used around Optuna's "count the trials, then ask for one" (psamf.psa_mf.tune) and the registry gate's
"read @champion, decide, move the alias" (psamf.registry.gate).
"""
from __future__ import annotations

import contextlib
import tempfile
import zlib
from pathlib import Path

from psamf.errors import InputError
from psamf.redact import redact


def dialect(url: str, what: str = "tune.storage") -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).get_backend_name()
    except Exception:
        raise InputError(what, f"not a SQLAlchemy URL: {redact(url)!r}") from None


def with_driver(url: str, what: str = "tune.storage") -> str:
    """PostgreSQL URLs go through psycopg 3, the driver psamf ships: `postgresql://` and
    `postgresql+psycopg2://` (SQLAlchemy's default, not installed) are read as `postgresql+psycopg://`."""
    from sqlalchemy.engine import make_url

    if dialect(url, what) != "postgresql":
        return url
    u = make_url(url)
    return url if u.drivername == "postgresql+psycopg" else u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite URL (None for other dialects and in-memory databases)."""
    from sqlalchemy.engine import make_url

    if dialect(url) != "sqlite":
        return None
    db = make_url(url).database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


class NamedLock:
    """A lock called `name` in the database at `url` (any SQLAlchemy URL)."""

    def __init__(self, url: str, name: str, what: str = "tune.storage"):
        self.kind, self.held = "none", False
        self._conn = self._file_lock = None
        self._key = zlib.crc32(name.encode())
        backend = dialect(url, what)  # `what`: the setting a bad URL came from, for the error
        if backend == "postgresql":
            import sqlalchemy

            self.kind = "postgresql"
            self._engine = sqlalchemy.create_engine(with_driver(url, what), poolclass=sqlalchemy.pool.NullPool)
        elif sqlite_file(url) is not None:
            # In the temp dir, keyed by the database's absolute path: nothing to clean up next to it.
            self.kind = "sqlite"
            from filelock import FileLock

            db = str(sqlite_file(url).resolve())
            self._file_lock = FileLock(Path(tempfile.gettempdir()) / f"psamf-lock-{zlib.crc32(db.encode()):08x}-{self._key:08x}.lock")

    def acquire(self) -> None:
        if self.held:
            return
        if self.kind == "postgresql":
            import sqlalchemy

            if self._conn is None:
                self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        elif self.kind == "sqlite":
            self._file_lock.acquire()
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.kind == "postgresql":
            import sqlalchemy

            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
        elif self.kind == "sqlite":
            self._file_lock.release()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._engine.dispose()

    def __enter__(self) -> "NamedLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
