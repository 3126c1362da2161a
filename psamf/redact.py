"""Credentials stay in the environment: mask them in anything psamf logs, writes or reports.

Storage and S3 URLs are read from the environment where they are used (tune.storage_url,
boto3). Everything that leaves the process (MLflow params, tags, written configs, reports,
error lines) goes through `redact` / `redact_tree` first, so a password that was put in
params.yaml or `--set` by hand is masked too.
"""
from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# Env vars whose values are credentials (or URLs that may embed one).
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "PSAMF_OPTUNA_STORAGE", "PSAMF_REGISTRY_LOCK_URL", "MLFLOW_BACKEND_STORE_URI", "POSTGRES_PASSWORD",
              "PGPASSWORD")
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_QUERY = re.compile(r"(?i)(?P<head>[?&;](?:password|passwd|pwd|secret|token|access_key|secret_key|"
                    r"aws_secret_access_key|sslpassword)=)(?P<pw>[^&;\s]+)")


def _env_secrets() -> list[str]:
    """Literal secret values from the environment (URL passwords included), longest first."""
    values: set[str] = set()
    for name in SECRET_ENV:
        v = os.environ.get(name, "")
        if not v:
            continue
        m = _USERINFO.search(v)
        if m:
            values.add(m.group("pw"))
        elif "://" not in v and len(v) >= 4:  # a bare secret; short values would mask ordinary words
            values.add(v)
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with URL passwords, secret query parameters and the environment's secrets masked."""
    if not isinstance(text, str) or not text:
        return text
    out = _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    out = _QUERY.sub(lambda m: f"{m.group('head')}{MASK}", out)
    for secret in _env_secrets():
        out = out.replace(secret, MASK)
    return out


def redact_tree(obj: Any) -> Any:
    """`redact` applied to every string in nested dicts/lists (keys kept)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    return obj
