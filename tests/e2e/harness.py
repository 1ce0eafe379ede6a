"""The operator as a real process against the local cluster, for the e2e tests and `make demo`.

The operator runs as `python -m finetune_operator run` (a subprocess, so tests can SIGKILL and
restart it) with a configuration file that points training pods at the test kubelet's node and the
test S3 server.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from localkube.cluster import wait
from localkube.images import ImageRun, argv_of, local_image
from localkube.rest import Rest

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
FTJ_PATH = "/apis/finetune.dev/v1alpha1/finetunejobs"
JOB_LABEL = "finetune.dev/job"
MANAGED = "app.kubernetes.io/managed-by=finetune-operator"
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("operator", "trainer-image", "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HOST_PROCESS_IMAGE = "localkube.invalid/finetune-trainer:host-process"
"""The trainer image of jobs whose pods run as host processes from the project venv: a name no
build makes, so the test kubelet never finds it among the built images (the chart's default trainer,
ghcr.io/finetune-dev/finetune-trainer, is in the store after `make images`)."""


def operator_config(s3: Any, **overrides: Any) -> dict[str, Any]:
    """Config for the local cluster: pods on the test kubelet's node (as host processes unless
    `defaultImage` names a built image), storage in the test S3."""
    progress = free_port()
    cfg: dict[str, Any] = {
        "defaultImage": HOST_PROCESS_IMAGE,
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

    def __init__(
        self, kubeconfig: Path, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.kubeconfig = kubeconfig
        self.config = config
        self.workdir = workdir
        self.env = env or {}
        """Extra environment (the platform's storage keys, for storage.sts)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / "operator.log"

    def start(self) -> OperatorProcess:
        for attempt in range(3):
            self._launch()
            try:
                wait("operator ready", self.ready, timeout=60)
            except RuntimeError:
                # free_port() picks a port in the ephemeral range and lets it go: an outgoing
                # connection may take it before the operator binds it. Only that is retried.
                if attempt == 2 or b"address already in use" not in self.log_path.read_bytes()[-2000:]:
                    raise
                self._fresh_ports()
                continue
            self.starts += 1
            return self
        raise AssertionError("unreachable")

    def _fresh_ports(self) -> None:
        progress = free_port()
        self.config["ports"] = {"metrics": free_port(), "progress": progress, "health": free_port()}
        self.config["reportUrl"] = f"http://127.0.0.1:{progress}"

    def _launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "config.yaml"
        path.write_text(yaml.safe_dump(self.config))
        env = {
            **os.environ,
            **self.env,
            "KUBECONFIG": str(self.kubeconfig),
            "FINETUNE_OPERATOR_CONFIG": str(path),
            "PYTHONPATH": os.pathsep.join(filter(None, [PYTHONPATH, os.environ.get("PYTHONPATH")])),
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator", "run"], env=env, stdout=log, stderr=log, cwd=REPO
        )
        log.close()

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


def tiny_job(name: str, model_dir: Path, data_path: Path, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob for the tiny model on the CPU (one step takes well under a second)."""
    base: dict[str, Any] = {
        "model": {"path": str(model_dir), "maxSeqLength": 256},
        "data": {"path": str(data_path)},
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


def install_crd(cluster: Any) -> None:
    """Apply the FineTuneJob CRD and wait until FineTuneJobs can be listed. Right after a CRD is
    created the API server answers 429 "storage is (re)initializing" for a moment; an operator
    started then spends its first ~20 s in kopf's retry backoff."""
    cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    # Not `kubectl wait --for=condition=Established`: it fails at once, instead of waiting, while the
    # new CRD has no status.conditions yet (seen on a loaded machine).
    established = '{.status.conditions[?(@.type=="Established")].status}'
    wait(
        "the FineTuneJob CRD Established",
        lambda: (
            cluster.kubectl(
                "get", "crd", "finetunejobs.finetune.dev", "-o", f"jsonpath={established}", check=False
            ).stdout.strip()
            == "True"
        ),
        timeout=60,
    )
    rest = Rest(cluster.kubeconfig)

    def listable() -> bool:
        try:
            rest.request("GET", FTJ_PATH, query={"limit": 1})
        except Exception:
            return False
        return True

    try:
        wait("FineTuneJobs listable", listable, timeout=60)
    finally:
        rest.close()


@dataclass
class Seen:
    """One version of an object as a watch delivered it: monotonic and wall-clock arrival times."""

    at: float
    wall: float
    obj: dict[str, Any]
    deleted: bool = False


class Recorder:
    """Every version of every FineTuneJob and operator-managed Pod, cluster-wide, as the watches
    deliver them (one thread per kind), so tests can ask what status showed *during* a run, not only
    at the end, and time transitions without polling kubectl."""

    def __init__(self, kubeconfig: Path) -> None:
        self.rest = Rest(kubeconfig)
        self._ftjs: dict[tuple[str, str], list[Seen]] = defaultdict(list)
        self._pods: dict[tuple[str, str], list[Seen]] = defaultdict(list)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._watch, args=(FTJ_PATH, {}, self._ftjs), daemon=True),
            threading.Thread(
                target=self._watch, args=("/api/v1/pods", {"labelSelector": MANAGED}, self._pods), daemon=True
            ),
        ]

    def start(self) -> Recorder:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.rest.close()

    def _note(self, store: dict[tuple[str, str], list[Seen]], obj: dict[str, Any], deleted: bool) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self.lock:
            versions = store[key]
            if (
                versions
                and not deleted
                and versions[-1].obj["metadata"].get("resourceVersion") == meta.get("resourceVersion")
            ):
                return  # the same version again (a relist)
            versions.append(Seen(time.monotonic(), time.time(), obj, deleted))

    def _watch(self, path: str, query: dict[str, Any], store: dict[tuple[str, str], list[Seen]]) -> None:
        while not self.stopping.is_set():
            try:
                listed = self.rest.request("GET", path, query=query)
                for item in listed["items"]:
                    self._note(store, item, False)
                rv = listed["metadata"]["resourceVersion"]
                for event in self.rest.watch(path, {**query, "resourceVersion": rv, "timeoutSeconds": 60}):
                    if self.stopping.is_set():
                        return
                    if event["type"] == "ERROR":
                        break
                    self._note(store, event["object"], event["type"] == "DELETED")
            except Exception:
                if not self.stopping.is_set():
                    time.sleep(0.5)

    # -- queries ------------------------------------------------------------------------------

    def history(self, namespace: str, name: str) -> list[Seen]:
        """Every version of the FineTuneJob seen so far, oldest first."""
        with self.lock:
            return list(self._ftjs.get((namespace, name), []))

    def latest(self, namespace: str, name: str) -> dict[str, Any] | None:
        versions = self.history(namespace, name)
        return None if not versions or versions[-1].deleted else versions[-1].obj

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return (self.latest(namespace, name) or {}).get("status") or {}

    def pod_history(self, namespace: str, job: str) -> dict[str, list[Seen]]:
        """Versions of each pod of the FineTuneJob `job`, by pod name (pods in creation order)."""
        with self.lock:
            found = {
                name: list(versions)
                for (ns, name), versions in self._pods.items()
                if ns == namespace and versions[0].obj["metadata"].get("labels", {}).get(JOB_LABEL) == job
            }
        return dict(
            sorted(found.items(), key=lambda kv: kv[1][0].obj["metadata"].get("creationTimestamp", ""))
        )

    def pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """The pods of `job` that exist now (latest versions, creation order)."""
        return [v[-1].obj for v in self.pod_history(namespace, job).values() if not v[-1].deleted]


def first_seen(versions: list[Seen], pred: Callable[[dict[str, Any]], Any]) -> Seen | None:
    """The first version for which `pred` holds."""
    return next((v for v in versions if not v.deleted and pred(v.obj)), None)


def pod_running(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running"


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a container log (the trainer logs one object a line; other output skipped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def log_time(line: dict[str, Any]) -> float:
    """A log line's time as a Unix timestamp."""
    return datetime.fromisoformat(line["time"]).timestamp()


def steps(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trainer's per-step progress events."""
    return [line for line in lines if line.get("event") == "progress"]


def last_step(lines: list[dict[str, Any]]) -> int:
    return max((line["step"] for line in steps(lines)), default=0)


CHECKPOINT_DONE = re.compile(r"checkpoint \S+/step-0*(\d+)/ complete")


def checkpoints_done(lines: list[dict[str, Any]]) -> list[int]:
    """Steps of the checkpoints the trainer finished uploading (manifest written), in order."""
    return [int(m.group(1)) for line in lines if (m := CHECKPOINT_DONE.search(str(line.get("msg", ""))))]


class ImageOperatorProcess(OperatorProcess):
    """The operator from its image, run as the chart's Deployment runs it (localkube.images): the
    image's entrypoint, the chart's user 65532, a read-only root file system, the config and the
    kubeconfig read-only at /etc/finetune-operator (the chart's ConfigMap mount), /tmp an empty dir.

    The one difference from the chart: the API server is reached through the ServiceAccount token's
    kubeconfig (KUBECONFIG) instead of the in-cluster token mount, as OperatorProcess does."""

    def __init__(self, image: str, kubeconfig: Path, config: dict[str, Any], workdir: Path) -> None:
        super().__init__(kubeconfig, config, workdir)
        self.image = image
        self.run: ImageRun | None = None

    def start(self) -> OperatorProcess:
        etc, tmp = self.workdir / "etc", self.workdir / "tmp"
        for folder in (etc, tmp):
            folder.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o777)
        (etc / "config.yaml").write_text(yaml.safe_dump(self.config))
        (etc / "kubeconfig").write_text(yaml.safe_dump(self_contained(self.kubeconfig)))
        for path in etc.iterdir():
            path.chmod(0o644)  # the ConfigMap's default mode
        image = local_image(self.image)
        if image is None:
            raise RuntimeError(f"{self.image} is not in the local image store: run `make images`")
        self.run = ImageRun(
            name=f"e2e-operator-{os.getpid()}-{self.starts}",
            image=self.image,
            config=image["config"],
            user="65532:65532",
            read_only=True,
            run_dir=self.workdir / f"run-{self.starts}",
            mounts=[(etc, "/etc/finetune-operator", True), (tmp, "/tmp", False)],
        )
        self.run.prepare()
        env = {
            "FINETUNE_OPERATOR_CONFIG": "/etc/finetune-operator/config.yaml",
            "KUBECONFIG": "/etc/finetune-operator/kubeconfig",
            "POD_NAME": f"finetune-operator-image-{self.starts}",
            "POD_NAMESPACE": self.config.get("leaderElection", {}).get("namespace", "default"),
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            self.run.argv(argv_of({}, image["config"]), env),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self.starts += 1
        wait("operator (from its image) ready", self.ready, timeout=120)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.run is not None:
            self.run.cleanup()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.run is not None:
            init = self.run.init_pid(self.proc.pid)
            if init is not None:
                os.kill(init, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        self.kill()


def self_contained(kubeconfig: Path) -> dict[str, Any]:
    """The kubeconfig with every file it names (CA, client certificate and key) inlined as data, so
    that it works where those paths do not exist (inside an image)."""
    config = yaml.safe_load(Path(kubeconfig).read_text())
    for section, key in (("clusters", "cluster"), ("users", "user")):
        for entry in config.get(section) or []:
            for field in ("certificate-authority", "client-certificate", "client-key"):
                if field in entry[key]:
                    data = base64.b64encode(Path(entry[key].pop(field)).read_bytes()).decode()
                    entry[key][f"{field}-data"] = data
    return config
