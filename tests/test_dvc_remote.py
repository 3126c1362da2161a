"""The team DVC remote (`team` in the committed .dvc/config) round-trips data through a real S3
server on loopback (moto, tests/servers.py), with the endpoint only in `dvc remote modify --local`
(.dvc/config.local) and the credentials only in the environment.

Everything happens in a throwaway git+DVC repo under tmp_path; the project's own .dvc is only read.
"""
from __future__ import annotations

import hashlib
import os
import random
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dvc_s3", reason="dvc-s3 not installed (pip install dvc-s3): the S3 remote cannot be used")
pytest.importorskip("moto.server", reason="moto[server] not installed: no local S3 server to push to")
boto3 = pytest.importorskip("boto3", reason="boto3 not installed: cannot inspect the bucket")
configobj = pytest.importorskip("configobj", reason="configobj (a dvc dependency) not installed")
yaml = pytest.importorskip("yaml", reason="PyYAML not installed: cannot read the .dvc file")

from servers import moto_s3  # noqa: E402  tests/servers.py

REPO = Path(__file__).resolve().parents[1]
REMOTE = "team"


def _committed_remote_url() -> str:
    cfg = configobj.ConfigObj(str(REPO / ".dvc" / "config"))
    assert cfg["core"]["remote"] == REMOTE, dict(cfg["core"])
    return cfg[f'remote "{REMOTE}"']["url"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True, timeout=120)
    except subprocess.CalledProcessError as e:
        raise AssertionError(f"{' '.join(cmd[2:] if cmd[0] == sys.executable else cmd)} failed "
                             f"({e.returncode}):\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}") from None


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_team_remote_push_pull_through_local_s3(tmp_path, monkeypatch):
    url = _committed_remote_url()
    assert url.startswith("s3://"), url
    bucket, _, prefix = url[len("s3://"):].partition("/")
    prefix = prefix.strip("/")

    key_id, secret = f"AKIA{secrets.token_hex(8).upper()}", secrets.token_hex(20)
    region = "us-east-1"
    home = tmp_path / "home"
    home.mkdir()
    creds = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": region}
    # Only the environment supplies credentials: no ~/.aws files, no session token, no profile.
    isolation = {"AWS_CONFIG_FILE": str(home / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-creds")}
    for k in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL",
              "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {**creds, **isolation}.items():  # moto_s3's own boto3 client reads these too
        monkeypatch.setenv(k, v)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env.update({
        "HOME": str(home),  # no user-level git/dvc/aws config leaks in
        "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"),
        "DVC_SITE_CACHE_DIR": str(home / "dvc-site"),
        "DVC_NO_ANALYTICS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    dvc = [sys.executable, "-m", "dvc"]

    work = tmp_path / "repo"
    work.mkdir()
    _run(["git", "init", "-q"], work, env)
    _run([*dvc, "init", "-q"], work, env)
    shutil.copyfile(REPO / ".dvc" / "config", work / ".dvc" / "config")
    committed = (work / ".dvc" / "config").read_bytes()

    with moto_s3(bucket) as endpoint:
        _run([*dvc, "remote", "modify", "--local", REMOTE, "endpointurl", endpoint], work, env)
        # The endpoint went to config.local (git-ignored), not into the committed config.
        assert (work / ".dvc" / "config").read_bytes() == committed
        local_cfg = configobj.ConfigObj(str(work / ".dvc" / "config.local"))
        assert local_cfg[f'remote "{REMOTE}"']["endpointurl"] == endpoint
        assert endpoint not in committed.decode()
        _run(["git", "check-ignore", "-q", ".dvc/config.local"], work, env)

        raw = work / "data" / "raw"
        (raw / "sub").mkdir(parents=True)
        rng = random.Random(1234)
        for name, size in (("a.bin", 1500), ("b.csv", 2048), ("sub/c.bin", 3000)):
            (raw / name).write_bytes(rng.randbytes(size))
        original = _files(raw)
        assert len(original) == 3

        _run([*dvc, "add", "-q", "data/raw"], work, env)
        out = yaml.safe_load((work / "data" / "raw.dvc").read_text())["outs"][0]
        assert out["path"] == "raw" and out["md5"].endswith(".dir"), out
        dir_md5 = out["md5"][: -len(".dir")]

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region)
        # moto keeps its state per process, not per server: a bucket of the same name from an earlier
        # test in this session would still hold objects. Empty it so the push alone must fill it.
        for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=o["Key"])
        assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0

        pushed = _run([*dvc, "push", "-r", REMOTE], work, env)

        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
        base = f"{prefix}/files/md5" if prefix else "files/md5"
        expected = {f"{base}/{h[:2]}/{h[2:]}" for h in (hashlib.md5(b).hexdigest() for b in original.values())}
        expected.add(f"{base}/{dir_md5[:2]}/{dir_md5[2:]}.dir")
        assert expected <= keys, f"missing in s3://{bucket}: {sorted(expected - keys)}; got {sorted(keys)}\n" \
                                 f"{pushed.stdout}{pushed.stderr}"
        assert all(k.startswith(f"{base}/") for k in keys), sorted(keys)
        for h in (hashlib.md5(b).hexdigest() for b in original.values()):  # stored content is the file itself
            body = s3.get_object(Bucket=bucket, Key=f"{base}/{h[:2]}/{h[2:]}")["Body"].read()
            assert hashlib.md5(body).hexdigest() == h

        shutil.rmtree(work / ".dvc" / "cache")
        shutil.rmtree(raw)
        assert not raw.exists()

        _run([*dvc, "pull", "-r", REMOTE], work, env)

    assert _files(raw) == original
    assert (work / ".dvc" / "cache").is_dir()  # it came back through the cache, i.e. from the remote

    # The credentials lived in the environment only: nowhere in the repo's files (.dvc/ included).
    leaks = [p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()
             and any(s.encode() in p.read_bytes() for s in (key_id, secret))]
    assert not leaks, f"credentials written to {leaks}"
    assert any((work / ".dvc").rglob("*")), "no .dvc files to check"


def test_team_remote_is_the_bucket_infra_creates_and_the_docs_use_it():
    """The committed remote points at the bucket infra's MinIO Job creates and the pipeline's key
    may write (`dvc/*`), and both READMEs push to that one remote instead of adding another."""
    import json
    import re

    bucket, _, prefix = _committed_remote_url()[len("s3://"):].partition("/")
    docs = list(yaml.safe_load_all((REPO / "infra" / "k8s" / "base" / "minio-buckets.yaml").read_text()))
    setup = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    created = re.search(r"for bucket in ([\w -]+); do", setup["setup.sh"]).group(1).split()
    assert bucket in created, f".dvc/config's remote bucket {bucket!r} is not one MinIO creates: {created}"
    objects = [s["Resource"] for s in json.loads(setup["policy.json"])["Statement"] if "s3:PutObject" in s["Action"]]
    assert any(f"arn:aws:s3:::{bucket}/*" in r for r in objects), objects
    for doc in (REPO / "README.md", REPO / "infra" / "README.md"):
        text = doc.read_text()
        assert not re.search(r"dvc remote add", text), f"{doc.name} adds a second remote; use `{REMOTE}`"
        assert f"dvc remote modify --local {REMOTE} endpointurl" in text, doc.name
        for url in re.findall(r"s3://[\w.-]+/[\w./-]*", text):
            if "dvc" in url.split("/")[2]:
                assert url.rstrip("/") == f"s3://{bucket}/{prefix}".rstrip("/"), f"{doc.name}: {url}"
