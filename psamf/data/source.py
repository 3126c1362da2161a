"""Where a run's raw corpus comes from, and how a pod materializes it with nothing but its inputs.

    synthetic                    generated in the task from the config (byte-deterministic)
    dvc                          the DVC directory recorded in the image's data.dvc, pulled from
                                 the default remote in the image's .dvc/config
    dvc:<md5>[@<remote url>]     that DVC directory (md5 of its .dir listing), from that remote
    s3://bucket/prefix           a plain S3 prefix laid out like <raw_dir>: <corpus>/<files>

`source_version` is cheap (no download) and is the content hash the source itself records,
so a pipeline can key its cache on it before fetching. `materialize` downloads into
`<dest>/raw/` and checks the bytes against that hash (DVC checks its md5s; S3 objects are
checked against single-part ETags, which are their MD5). S3 endpoints and credentials come
only from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psamf.config import Config
from psamf.errors import InputError
from psamf.redact import redact

DVC_POINTER = "data.dvc"
DVC_CONFIG = Path(".dvc") / "config"


@dataclass(frozen=True)
class Source:
    kind: str              # synthetic | dvc | s3
    md5: str = ""          # dvc: the .dir md5 (without the suffix)
    url: str = ""          # dvc: remote url ('' = the default remote); s3: s3://bucket/prefix


def parse_source(spec: str, pointer: str | Path = DVC_POINTER) -> Source:
    spec = (spec or "synthetic").strip()
    if spec == "synthetic":
        return Source("synthetic")
    if spec.startswith("s3://"):
        if not spec[5:].split("/", 1)[0]:
            raise InputError("data_source", f"{spec!r} has no bucket")
        return Source("s3", url=spec.rstrip("/"))
    if spec == "dvc" or spec.startswith("dvc:"):
        rest = spec[4:]
        md5, _, url = rest.partition("@")
        md5 = md5.removesuffix(".dir")
        if not md5:
            md5 = _pointer_md5(Path(pointer))
        if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
            raise InputError("data_source", f"{spec!r}: not an md5 of a DVC directory")
        return Source("dvc", md5=md5, url=url)
    raise InputError("data_source", f"{spec!r}: use synthetic, dvc, dvc:<md5>[@<remote>] or s3://bucket/prefix")


def _pointer_md5(path: Path) -> str:
    import yaml

    if not path.is_file():
        raise InputError(path, "no DVC pointer here to take the data version from (use dvc:<md5>)")
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    md5 = str(outs[0].get("md5", ""))
    if not md5.endswith(".dir"):
        raise InputError(path, "outs[0].md5 is not a DVC directory hash")
    return md5.removesuffix(".dir")


# ---------------------------------------------------------------------------- S3

def s3_client():
    import boto3

    # boto3 reads AWS_ENDPOINT_URL itself; MLFLOW_S3_ENDPOINT_URL is the same server on our clusters.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") \
        or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def _s3_objects(url: str) -> list[dict[str, Any]]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(url)
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        objs = [o for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    except ClientError as e:  # NoSuchBucket, AccessDenied, ...: the source named is wrong, not psamf
        err = e.response.get("Error", {})
        raise InputError("data_source", f"{redact(url)}: {err.get('Code', 'error')}: "
                                        f"{redact(err.get('Message', str(e)))}") from None
    except (BotoCoreError, ValueError) as e:  # no endpoint, no credentials, a bucket name S3 refuses
        raise InputError("data_source", f"{redact(url)}: {redact(str(e))}") from None
    if not objs:
        raise InputError("data_source", f"{url}: no objects under this prefix")
    return sorted(objs, key=lambda o: o["Key"])


def _s3_version(url: str) -> str:
    rows = [(o["Key"], o["Size"], o["ETag"].strip('"')) for o in _s3_objects(url)]
    return "s3:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:32]


def _s3_download(url: str, raw: Path) -> None:
    from tqdm import tqdm

    bucket, prefix = split_s3(url)
    client = s3_client()
    for o in tqdm(_s3_objects(url), desc="fetch s3", unit="file", leave=False):
        rel = o["Key"][len(prefix):].lstrip("/") if prefix else o["Key"]
        dest = raw / rel
        if ".." in Path(rel).parts:
            raise InputError(o["Key"], "object key escapes the prefix")
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, o["Key"], str(dest))
        etag = o["ETag"].strip('"')
        if "-" not in etag and hashlib.md5(dest.read_bytes()).hexdigest() != etag:  # multipart ETags are not MD5s
            raise InputError(f"s3://{bucket}/{o['Key']}", "downloaded bytes do not match the object's ETag")


# ---------------------------------------------------------------------------- DVC

def _dvc(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise InputError("data_source", f"dvc {args[0]} failed: {redact(tail[0])}")


def _default_remote_url(config: Path = DVC_CONFIG) -> str:
    import configparser

    if not config.is_file():
        raise InputError(config, "no DVC config here to find the default remote (use dvc:<md5>@<remote url>)")
    cp = configparser.ConfigParser()
    cp.read(config)
    name = cp.get("core", "remote", fallback="")
    url = cp.get(f"'remote \"{name}\"'", "url", fallback="")
    if not url:
        raise InputError(config, f"default remote {name!r} has no url")
    return url


def _dvc_pull(src: Source, raw: Path) -> None:
    """`dvc pull` of one directory into `raw`, in a throwaway no-SCM DVC project."""
    url = src.url or _default_remote_url()
    with tempfile.TemporaryDirectory(prefix="psamf-dvc-") as tmp:
        work = Path(tmp)
        _dvc(["init", "--no-scm", "-q"], work)
        _dvc(["remote", "add", "-d", "origin", url], work)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and url.startswith("s3://"):
            _dvc(["remote", "modify", "--local", "origin", "endpointurl", endpoint], work)
        (work / "raw.dvc").write_text(f"outs:\n- md5: {src.md5}.dir\n  path: raw\n  hash: md5\n")
        _dvc(["pull", "-q", "raw.dvc"], work)  # DVC verifies every file's md5 on the way in
        shutil.copytree(work / "raw", raw, dirs_exist_ok=True)


# ---------------------------------------------------------------------------- public

def source_version(cfg: Config, spec: str) -> str:
    """The data version of `spec` without downloading it."""
    src = parse_source(spec)
    if src.kind == "dvc":
        return f"dvc:{src.md5}"
    if src.kind == "s3":
        return _s3_version(src.url)
    from dataclasses import asdict

    # The generator's code is in the fingerprint's code version; its inputs are these keys.
    blob = {"synth": asdict(cfg.synth), "data": {k: v for k, v in asdict(cfg.data).items()
                                                 if k not in ("raw_dir", "prepared_dir", "shared_dir", "mosi_dir", "mosei_dir")}}
    return "synthetic:" + hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def materialize(cfg: Config, spec: str, dest: str | Path, expect_version: str | None = None) -> dict[str, Any]:
    """Download (or generate) the raw corpus into `<dest>/raw/`; returns version and file count.

    `expect_version` (from an earlier `source_version`) must still hold: a source that changed
    in between fails the task instead of training on data other than the fingerprint says."""
    from psamf.fingerprint import tree_sha256
    from psamf.io import atomic_dir

    src = parse_source(spec)
    version = source_version(cfg, spec)
    if expect_version and version != expect_version:
        raise InputError("data_source", f"{redact(spec)} changed since the run was fingerprinted "
                                        f"({expect_version} -> {version})")
    raw = Path(dest) / "raw"
    with atomic_dir(raw) as tmp:
        if src.kind == "s3":
            _s3_download(src.url, tmp)
        elif src.kind == "dvc":
            _dvc_pull(src, tmp)
        else:
            from dataclasses import replace

            from psamf.data.synth import write_synthetic_corpus
            write_synthetic_corpus(replace(cfg, data=replace(cfg.data, raw_dir=str(tmp), corpus="synthetic")))
    corpora = sorted(p.name for p in raw.iterdir() if p.is_dir())
    if cfg.data.corpus not in corpora:
        raise InputError("data_source", f"{redact(spec)} holds {corpora or 'no corpus dirs'}, "
                                        f"not data.corpus={cfg.data.corpus!r}")
    return {"source": redact(spec), "data_version": version, "content_sha256": tree_sha256(raw),
            "files": sum(1 for p in raw.rglob("*") if p.is_file()), "corpora": corpora}
