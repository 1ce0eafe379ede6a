"""A real MLflow tracking server for tests: the `mlflow` package's own server on 127.0.0.1.

`mlflow server` with a SQLite backend store and served artifacts in a test folder, on a free port,
run as a subprocess (its start-up, database migrations included, takes 10 to 40 s on 2 busy
cores, so `start` returns at once and `wait` blocks until /health answers).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, workdir: Path) -> MlflowServer:
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = workdir / "mlflow-server.log"
        mlflow = Path(sys.executable).with_name("mlflow")
        process = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{workdir / 'mlflow.db'}",
                "--artifacts-destination",
                str(workdir / "artifacts"),
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        return cls(f"http://127.0.0.1:{port}", process, log)

    def wait(self) -> MlflowServer:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited {self.process.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"mlflow server not healthy after {STARTUP_TIMEOUT:.0f}s: {self.log.read_text()[-2000:]}"
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
