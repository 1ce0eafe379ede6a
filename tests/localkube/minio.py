"""A real MinIO server on loopback, for what moto does not do: STS AssumeRole with an inline session
policy that the server enforces (tests/integration/test_sts_scoped.py).

The binary is built by `hack/cluster-bins.sh minio` into the versioned cache; tests skip when it
is not there (require_minio), and fail under CI. Each server gets a fresh data directory, a random port and a
root user; buckets are created with the root credentials.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config

from localkube.procs import Process, free_port, in_ci, wait_for

MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
"""Keep in step with MINIO_VERSION in hack/cluster-bins.sh."""

REGION = "us-east-1"


def minio_binary() -> Path:
    cache = Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune-operator")
    return cache / f"minio-{MINIO_VERSION}" / "bin" / "minio"


def minio_missing() -> bool:
    return not os.access(minio_binary(), os.X_OK)


MISSING_REASON = f"no MinIO binary at {minio_binary()}: build it with `hack/cluster-bins.sh minio` (~6 min)"


def require_minio() -> None:
    """Skip the test when the binary is not built, unless CI is set: then that is a failure, as for
    the control plane (`make test` builds it first)."""
    if minio_missing():
        if in_ci():
            pytest.fail(MISSING_REASON)
        pytest.skip(MISSING_REASON)


@dataclass
class MinIO:
    endpoint_url: str
    root_user: str
    root_password: str
    process: Process = field(repr=False)

    def client(
        self,
        service: str = "s3",
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
    ) -> Any:
        """A boto3 client of this server: with the root credentials unless others are given. No
        retries, so a refusal is seen at once."""
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=access_key or self.root_user,
            aws_secret_access_key=secret_key or self.root_password,
            aws_session_token=session_token,
            config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}),
        )

    def stop(self) -> None:
        self.process.stop()


def start_minio(workdir: Path, buckets: Sequence[str] = ("finetune",)) -> MinIO:
    """Start MinIO with its data under `workdir` and create `buckets`; call .stop() when done."""
    port, console = free_port(), free_port()
    user, password = "platform-root", secrets.token_hex(16)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "MINIO_ROOT_USER": user,
        "MINIO_ROOT_PASSWORD": password,
        "MINIO_BROWSER": "off",
        "MINIO_UPDATE": "off",
        "MINIO_REGION": REGION,
    }
    argv = [
        minio_binary(),
        "server",
        "--quiet",
        "--address",
        f"127.0.0.1:{port}",
        "--console-address",
        f"127.0.0.1:{console}",
        workdir / "data",
    ]
    proc = Process("minio", argv, workdir / "minio.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("minio", lambda: requests.get(f"{url}/minio/health/ready", timeout=2).ok, 60, [proc])
        server = MinIO(url, user, password, proc)
        s3 = server.client()
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
    except BaseException:
        proc.stop()
        raise
    return server
