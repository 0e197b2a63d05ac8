"""Real services on loopback for the tests: an MLflow server (``make mlflow-server``) and an
S3-protocol endpoint (moto in server mode). Each is a context manager that starts the
service on a free port, waits until it answers, and stops it at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
S3_CREDENTIALS = {  # moto accepts any; botocore wants some
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen | None, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            if proc is not None and proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace")[-2000:] if proc.stdout else ""
                raise RuntimeError(f"{what} exited {proc.returncode}: {out}") from None
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} in {timeout:.0f} s")


@contextmanager
def mlflow_server(home: Path):
    """``make mlflow-server`` on a free port with its home in ``home``; yields ``{"uri", "home"}``."""
    port = free_port()
    proc = subprocess.Popen(
        ["make", "-s", "-o", "install", "mlflow-server", f"MLFLOW_PORT={port}", f"MLFLOW_HOME={home}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", proc, "make mlflow-server")
        yield {"uri": uri, "home": Path(home)}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@contextmanager
def s3_server(bucket: str | None = None):
    """A moto S3 server on a free loopback port; yields ``{"endpoint", "env"}`` where ``env``
    holds the variables botocore/s3fs/DVC read (endpoint and dummy credentials). ``bucket``
    is created when given."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    try:
        _wait_http(endpoint, None, "moto server", timeout=30)
        if bucket:
            import boto3

            boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "env": env}
    finally:
        server.stop()


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    }
