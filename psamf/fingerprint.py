"""What a pipeline run is *of*: code version + data version + params hash.

The fingerprint keys everything that must change when an input changes: KFP's cache (every
cached task takes it as an input), the MLflow parent run (found or created from it), the
Optuna study name and the durable checkpoints. It must mean the same in a pod that holds
only the image and its inputs, where there is no `.git` and no `data.dvc`:

    code    $PSAMF_GIT_SHA (baked into the image at build time) > `git rev-parse HEAD` (+ a
            hash of uncommitted changes) > a hash of the installed psamf sources
    data    the content hash the source records: DVC's md5 of the directory, the S3 objects'
            ETags, or, for the generated synthetic corpus, its config (its code is in `code`)
    params  profile, overrides and the params file's text
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Sequence

CODE_ENV = "PSAMF_GIT_SHA"
DATA_ENV = "PSAMF_DATA_VERSION"  # set for a task by the orchestrator, read into MLflow tags
PACKAGE_DIR = Path(__file__).resolve().parent


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(root: str | Path, pattern: str = "*") -> str:
    """A content hash of every file below `root` (relative paths and bytes; mtimes ignored)."""
    root = Path(root)
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts)
    return _sha([(p.relative_to(root).as_posix(), file_sha256(p)) for p in files])


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@functools.cache
def code_version() -> str:
    """The code a task runs: the image's baked git SHA, else this checkout's, else a source hash."""
    baked = os.environ.get(CODE_ENV, "").strip()
    if baked:
        return baked
    head = (_git("rev-parse", "HEAD") or "").strip()
    if head:
        diff = _git("diff", "HEAD", "--", str(PACKAGE_DIR)) or ""
        return head + (f"+dirty.{hashlib.sha256(diff.encode()).hexdigest()[:12]}" if diff else "")
    return "src." + tree_sha256(PACKAGE_DIR, "*.py")[:16]


def params_hash(profile: str, overrides: Sequence[str], params_text: str = "") -> str:
    """The config's identity: profile, overrides (order-free) and the params file's text."""
    return _sha({"profile": profile, "overrides": sorted(overrides),
                 "params": hashlib.sha256(params_text.encode()).hexdigest() if params_text else ""})[:16]


def pipeline_fingerprint(profile: str, overrides: Sequence[str], data_version: str, code: str | None = None,
                         params_text: str = "") -> str:
    return _sha({"params": params_hash(profile, overrides, params_text), "data": data_version,
                 "code": code or code_version()})[:16]
