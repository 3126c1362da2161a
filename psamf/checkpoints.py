"""Checkpoints that outlive the task: `fit`'s last.pt/best.pt mirrored to a durable location.

A KFP retry starts a new pod with an empty output directory, and `dvc repro` deletes a stage's
outputs before it runs it, so a checkpoint kept only beside the outputs is lost exactly when it
is needed. With `checkpoints.uri` (env PSAMF_CHECKPOINT_URI wins) every checkpoint `fit` writes
is copied to `<uri>/<stage>/<fingerprint>/`, and a run that finds no local checkpoint pulls it
from there first. The fingerprint is the run's settings and data, so a retry finds its own
checkpoint and a run on other data or settings never does.

    uri: s3://bucket/prefix   the artifact store on a cluster (credentials and endpoint from env)
         a directory          local runs and `dvc repro` (a `persist: true` output in dvc.yaml)

Only a missing key means "no checkpoint". Any other store error (a 403, a 5xx, a missing bucket,
no endpoint) stops the stage with one line naming the store and the status: a run that silently
started from zero on a broken store would cost its whole budget again and say nothing.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from psamf.config import Config
from psamf.errors import InputError

log = logging.getLogger(__name__)
URI_ENV = "PSAMF_CHECKPOINT_URI"
FILES = ("last.pt", "best.pt")


class CheckpointStore:
    """One run's durable checkpoint directory: `<uri>/<stage>/<key>/`."""

    def __init__(self, uri: str, stage: str, key: str):
        self.uri, self.stage, self.key = uri.rstrip("/"), stage, key
        self.is_s3 = self.uri.startswith("s3://")

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri}/{self.stage}/{self.key})"

    # S3 and a directory behave the same: get a file if present, put a file, delete the prefix.
    def _s3(self):
        from psamf.data.source import s3_client, split_s3

        bucket, prefix = split_s3(self.uri)
        return s3_client(), bucket, "/".join(p for p in (prefix, self.stage, self.key) if p)

    def _s3_call(self, what: str, fn, *args, **kwargs):
        """One S3 request; a store error becomes a one-line InputError naming the store and status.
        A missing key is the caller's to handle: it is returned as None."""
        from botocore.exceptions import BotoCoreError, ClientError

        from psamf.redact import redact

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
            if err.get("Code") == "NoSuchKey":
                return None
            status = meta.get("HTTPStatusCode", "?")
            raise InputError(f"checkpoint store {redact(self.uri)}",
                             f"{what} failed: HTTP {status} {err.get('Code', 'error')}: "
                             f"{redact(err.get('Message') or str(e))}") from None
        except BotoCoreError as e:  # no endpoint, no credentials, a connection refused
            raise InputError(f"checkpoint store {redact(self.uri)}", f"{what} failed: {redact(str(e))}") from None

    def _dir(self) -> Path:
        return Path(self.uri.removeprefix("file://")) / self.stage / self.key

    def pull(self, local: Path) -> bool:
        """Copy the stored checkpoint into `local` unless `local` already holds one; True if it did."""
        if (local / "last.pt").is_file():
            return False
        local.mkdir(parents=True, exist_ok=True)
        got = False
        for name in FILES:
            if self.is_s3:
                client, bucket, prefix = self._s3()
                # GetObject, not download_file: its HEAD answers a bare 404 for a missing bucket
                # and a missing key alike, and only the key's absence means "no checkpoint"
                obj = self._s3_call(f"reading {name}", client.get_object, Bucket=bucket, Key=f"{prefix}/{name}")
                if obj is None:
                    continue
                with open(local / f".{name}.part", "wb") as f:
                    shutil.copyfileobj(obj["Body"], f, 1 << 20)
            else:
                src = self._dir() / name
                if not src.is_file():
                    continue
                shutil.copyfile(src, local / f".{name}.part")
            os.replace(local / f".{name}.part", local / name)  # a reader never sees half a file
            got = True
        if got:
            log.info("checkpoint restored from %s", self)
        return got

    def push(self, path: Path) -> None:
        """Store one checkpoint file (after `fit` wrote it atomically)."""
        if self.is_s3:
            client, bucket, prefix = self._s3()
            from boto3.exceptions import S3UploadFailedError

            try:  # an S3 PUT is atomic
                self._s3_call(f"writing {path.name}", client.upload_file, str(path), bucket, f"{prefix}/{path.name}")
            except S3UploadFailedError as e:  # upload_file wraps the ClientError
                from psamf.redact import redact

                raise InputError(f"checkpoint store {redact(self.uri)}",
                                 f"writing {path.name} failed: {redact(str(e))}") from None
        else:
            from psamf.io import atomic_path

            with atomic_path(self._dir() / path.name) as tmp:
                shutil.copyfile(path, tmp)

    def discard(self) -> None:
        """Forget this run's checkpoint (after the run succeeded)."""
        if self.is_s3:
            client, bucket, prefix = self._s3()
            for name in FILES:
                self._s3_call(f"deleting {name}", client.delete_object, Bucket=bucket, Key=f"{prefix}/{name}")
        else:
            shutil.rmtree(self._dir(), ignore_errors=True)


def checkpoint_uri(cfg: Config) -> str | None:
    return os.environ.get(URI_ENV) or cfg.checkpoints.uri or None


def ensure_local_root(cfg: Config) -> None:
    """Create a local store's root up front: dvc.yaml declares it as a (persisted) output, which
    must exist even when a stage had nothing to checkpoint (a skipped LOO slot)."""
    uri = checkpoint_uri(cfg)
    if uri and "://" not in uri.removeprefix("file://"):
        Path(uri.removeprefix("file://")).mkdir(parents=True, exist_ok=True)


def store_for(cfg: Config, stage: str, fingerprint: str) -> CheckpointStore | None:
    """The durable store for one run of `stage`, or None when checkpoints.uri is not set."""
    uri = checkpoint_uri(cfg)
    return CheckpointStore(uri, stage, fingerprint) if uri else None
