"""The operator as a real process against the local cluster, for the e2e tests and `make demo`.

The operator runs as `python -m finetune_operator run` (a subprocess, so tests can SIGKILL and
restart it) with a configuration file that points training pods at the test kubelet's node and the
test S3 server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("operator", "trainer-image", "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def operator_config(s3: Any, **overrides: Any) -> dict[str, Any]:
    """Config for the local cluster: pods on the test kubelet's node, storage in the test S3."""
    progress = free_port()
    cfg: dict[str, Any] = {
        "storage": {"uri": f"s3://{s3.bucket}/jobs", "endpoint": s3.endpoint_url, "region": s3.region},
        "defaultNodeSelector": {"finetune.dev/local": "true"},
        "defaultTolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "defaultCpu": "1",
        "defaultMemory": "4Gi",
        "reportUrl": f"http://127.0.0.1:{progress}",
        "reportIntervalSeconds": 1,
        "statusWriteIntervalSeconds": 2,
        "terminationGraceMarginSeconds": 10,
        "resyncSeconds": 10,
        "ports": {"metrics": free_port(), "progress": progress, "health": free_port()},
    }
    cfg.update(overrides)
    return cfg


class OperatorProcess:
    """`python -m finetune_operator run` with its own config file and log."""

    def __init__(self, kubeconfig: Path, config: dict[str, Any], workdir: Path) -> None:
        self.kubeconfig = kubeconfig
        self.config = config
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / "operator.log"

    def start(self) -> OperatorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "config.yaml"
        path.write_text(yaml.safe_dump(self.config))
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "FINETUNE_OPERATOR_CONFIG": str(path),
            "PYTHONPATH": os.pathsep.join(filter(None, [PYTHONPATH, os.environ.get("PYTHONPATH")])),
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator", "run"], env=env, stdout=log, stderr=log, cwd=REPO
        )
        log.close()
        self.starts += 1
        wait("operator ready", self.ready, timeout=60)
        return self

    def url(self, port: str, path: str) -> str:
        return f"http://127.0.0.1:{self.config['ports'][port]}{path}"

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")
        try:
            with urllib.request.urlopen(self.url("health", "/readyz"), timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url("metrics", "/metrics"), timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a node dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def wait(what: str, ready: Callable[[], Any], timeout: float = 60, interval: float = 0.25) -> Any:
    """Poll `ready` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def tiny_job(name: str, model_dir: Path, data: Path, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob for the tiny model on the CPU (one step takes well under a second)."""
    base: dict[str, Any] = {
        "model": {"path": str(model_dir), "maxSeqLength": 256},
        "data": {"path": str(data)},
        "template": {"type": "alpaca"},
        "lora": {"r": 8, "alpha": 16},
        "training": {
            "batchSize": 2,
            "gradientAccumulationSteps": 2,
            "maxSteps": 40,
            "warmupSteps": 2,
            "learningRate": 1e-3,
            "optimizer": "adamw_torch",
        },
        "checkpoint": {"everySteps": 5, "keepLast": 2, "gracePeriodSeconds": 30},
        "export": {"gguf": []},
        "resources": {"gpus": 0},
    }
    base.update(spec)
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": base,
    }
