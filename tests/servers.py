"""Real servers for tests, on 127.0.0.1 only, each stopped by its own pid even when the test fails.

    postgres_server()           a throwaway PostgreSQL cluster -> SQLAlchemy URL
    moto_s3(bucket)             moto's S3 in a thread -> endpoint URL (bucket created)
    mlflow_server(store, dest)  `mlflow server` on a free port -> http URL
    model_server(model_uri)     `mlflow models serve --env-manager local` -> http URL

Credentials come only from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
MLFLOW_S3_ENDPOINT_URL); nothing here writes them to a file or a command line.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    """The PostgreSQL server binaries: $PSAMF_PG_BIN, Debian's /usr/lib/postgresql/*/bin, or PATH."""
    candidates = [os.environ.get("PSAMF_PG_BIN", ""), *PG_BIN_DIRS]
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).parent))
    for d in candidates:
        if d and (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    return None


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _wait_http(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered:\n{_tail(log) if log else ''}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{_tail(log) if log else ''}")


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process we started, by pid; SIGKILL its own process group if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # The group was created for this process (start_new_session), so it holds only its workers.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


# ---------------------------------------------------------------------------- PostgreSQL

@contextlib.contextmanager
def postgres_server(db: str = "psamf", password: str | None = None) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1:<free port> with database `db`.

    Yields `postgresql+psycopg://postgres@127.0.0.1:PORT/DB` (trust auth), or with `password`
    the same URL with that password, which TCP clients must then give (scram-sha-256), as on a
    real server. As root the cluster runs as the `postgres` user (the server refuses root).
    Skips the test when no binaries exist.
    """
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql, or set PSAMF_PG_BIN)")
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="psamf-pg-"))  # directly under /tmp: postgres must reach it
    if as_root:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, sock, log = root / "data", root / "sock", root / "server.log"
    port = free_port()
    started = False
    try:
        subprocess.run([*prefix, "mkdir", str(sock)], check=True)
        auth = ["-A", "trust"]
        if password is not None:
            pwfile = root / "pwfile"
            pwfile.write_text(password + "\n")
            if as_root:
                os.chown(pwfile, pw.pw_uid, pw.pw_gid)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), *auth, "-U", "postgres",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, text=True)
        opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = True
        r = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log),
                            "-w", "-t", "60", "start"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stderr}\n{_tail(log)}")
        subprocess.run([*prefix, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db],
                       check=True, capture_output=True, text=True, env={**os.environ, "PGPASSWORD": password or ""})
        userinfo = "postgres" if password is None else f"postgres:{password}"
        yield f"postgresql+psycopg://{userinfo}@127.0.0.1:{port}/{db}"
    finally:
        if started:
            r = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30",
                                "stop"], capture_output=True, text=True)
            pidfile = data / "postmaster.pid"
            if r.returncode != 0 and pidfile.is_file():  # pg_ctl could not stop it: the postmaster's pid
                with contextlib.suppress(ValueError, ProcessLookupError, OSError):
                    os.kill(int(pidfile.read_text().splitlines()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- S3 (moto)

@contextlib.contextmanager
def moto_s3(bucket: str = "psamf-test") -> Iterator[str]:
    """moto's S3 in a thread on 127.0.0.1:<free port>, with `bucket` created. Yields the endpoint URL.
    Uses the AWS_* credentials already in the environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
                     ).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


# ---------------------------------------------------------------------------- MLflow

def _env(extra: dict[str, str] | None) -> dict[str, str]:
    """The environment plus this interpreter's bin dir first on PATH: `mlflow models serve`
    execs `uvicorn` by name, which is only on PATH when the venv is activated."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _mlflow_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]


@contextlib.contextmanager
def _mlflow_process(args: list[str], health: str, env: dict[str, str], timeout: float, prefix: str) -> Iterator[str]:
    """`mlflow <args> --port PORT` on a free port, its log in a temp dir; yields the URL once
    `health` answers, SIGTERM by pid at the end."""
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix=prefix))
    log = log_dir / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*_mlflow_cmd(), *args, "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=log_dir)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}{health}", proc, timeout, log)
        yield url
    finally:
        stop_process(proc)
        shutil.rmtree(log_dir, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts_destination: str, env: dict[str, str] | None = None,
                  timeout: float = 90) -> Iterator[str]:
    """`mlflow server` with one worker and no job runner (about 0.5 GB instead of 2.2 GB).
    Yields http://127.0.0.1:PORT once /health answers; SIGTERM by pid at the end."""
    penv = {**_env(env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    penv.pop("MLFLOW_TRACKING_URI", None)
    with _mlflow_process(["server", "--workers", "1", "--backend-store-uri", backend_store_uri,
                          "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1"],
                         "/health", penv, timeout, "psamf-mlflow-") as url:
        yield url


@contextlib.contextmanager
def model_server(model_uri: str, env: dict[str, str] | None = None, timeout: float = 120) -> Iterator[str]:
    """`mlflow models serve -m URI --env-manager local` on a free port; yields its http URL."""
    with _mlflow_process(["models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-w", "1"],
                         "/ping", _env(env), timeout, "psamf-serve-") as url:
        yield url


def server_log(path: Path) -> str:  # pragma: no cover - debugging aid
    return _tail(path, 20000)
