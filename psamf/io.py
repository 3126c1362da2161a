"""Atomic outputs (a reader sees the old file/dir or the new one, never half of either), and JSON
inputs read with one-line errors that name the file."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it into place, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last: some writers (kfp, matplotlib) choose the format from it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600; outputs are ordinary files
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp dir; on success swap it in for `path` (replacing any old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # what read_text expects; never the locale's default
    return Path(path)


def read_text(path: str | Path, missing: str = "file not found", max_bytes: int | None = None) -> str:
    """A text file strictly as UTF-8 (a BOM is dropped); an InputError naming the file and the
    first bad byte's offset and line, instead of a UnicodeDecodeError traceback. With `max_bytes`,
    a bigger file is refused before it is read (a config file is small; a huge one is an attack
    or a mistake, and parsing it could take minutes)."""
    from psamf.errors import InputError

    p = Path(path)
    if not p.is_file():
        raise InputError(p, missing)
    if max_bytes is not None:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise InputError(p, f"{p.stat().st_size} bytes: over the {max_bytes}-byte cap for this file")
    else:
        data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(p, f"not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line})") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def read_json(path: str | Path, missing: str = "file not found", max_bytes: int | None = None) -> Any:
    """The parsed JSON file; an InputError naming it when it is absent (`missing`), over
    `max_bytes`, not UTF-8, not JSON, nested too deep to parse, or has a key twice in one object
    (JSON would silently keep the last)."""
    from psamf.errors import InputError

    p = Path(path)
    try:
        return json.loads(read_text(p, missing, max_bytes), object_pairs_hook=_no_duplicate_keys)
    except ValueError as e:
        raise InputError(p, f"not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(p, "not valid JSON (nested too deep)") from None
