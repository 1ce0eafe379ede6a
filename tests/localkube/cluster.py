"""The whole local cluster: control plane, kwok GPU nodes and the test kubelet's node."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from .controlplane import ControlPlane
from .kubelet import TestKubelet
from .kueue import Kueue

LOCAL_NODE = "local-gpu-0"


def wait(what: str, ready: Callable[[], Any], timeout: float = 60, interval: float = 0.2) -> Any:
    """Poll `ready` until it returns something truthy (returned); AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if value := ready():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Cluster:
    """A running cluster. Build with Cluster.start(workdir, bin_dir); end with stop().

    Attributes: kubeconfig (admin, system:masters), bin_dir, workdir, logs (component -> log
    file), kubelet (the TestKubelet of LOCAL_NODE), control_plane, kwok_nodes, timings.
    """

    def __init__(self, workdir: Path, bin_dir: Path, **control_plane: Any) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.control_plane = ControlPlane(workdir, bin_dir, **control_plane)
        self.kubeconfig = self.control_plane.kubeconfig
        self.kwok_nodes = self.control_plane.kwok_nodes
        self.timings = self.control_plane.timings
        self.kubelet: TestKubelet | None = None
        self.kueue: Kueue | None = None
        self.current_test = ""
        self._namespaces: dict[str, str] = {}

    @classmethod
    def start(cls, workdir: Path, bin_dir: Path, *, kueue: bool = False, **control_plane: Any) -> Cluster:
        """Start everything and wait until it is ready; on failure stop what started, then raise.
        `kueue`: also run the Kueue manager (start_kueue). `control_plane`: options of ControlPlane
        (kwok pool, kwok stages, audit log, ...)."""
        cluster = cls(workdir, bin_dir, **control_plane)
        try:
            cluster.control_plane.start()
            t0 = time.monotonic()
            cp = cluster.control_plane
            cluster.kubelet = TestKubelet(
                cp.kubeconfig_for(f"system:node:{LOCAL_NODE}", "system:nodes"),
                workdir / "kubelet",
                cp.port,
                name=LOCAL_NODE,
                drainer_kubeconfig=cp.kubeconfig_for("localkube-drainer", "system:masters"),
            )
            cluster.kubelet.start()
            cluster.wait("node local-gpu-0 Ready", lambda: cluster._node_ready(LOCAL_NODE))
            cluster.timings["test kubelet"] = time.monotonic() - t0
            if kueue:
                cluster.start_kueue()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def start_kueue(self) -> Kueue:
        """Start the Kueue manager on this cluster (once; see localkube.kueue)."""
        if self.kueue is None:
            self.kueue = Kueue(self.control_plane).start()
            self.timings.update(self.kueue.timings)
        return self.kueue

    def stop(self) -> None:
        if self.kueue:
            self.kueue.stop()
        if self.kubelet:
            self.kubelet.stop()
        self.control_plane.stop()

    @property
    def logs(self) -> dict[str, Path]:
        logs = {p.name: p.log for p in self.control_plane.procs}
        if self.kubelet:
            logs["test-kubelet"] = self.kubelet.log
        return logs

    # -- clients ---------------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl as the admin; text output. check=True raises with stderr on failure."""
        done = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}{done.stdout}"
            )
        return done

    def api_client(self) -> client.ApiClient:
        """A kubernetes python client ApiClient authenticated as the admin (close it when done)."""
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def apply(self, *objects: dict[str, Any] | Iterable[dict[str, Any]]) -> None:
        """`kubectl apply --server-side` of manifests (dicts or lists of dicts)."""
        docs: list[dict[str, Any]] = []
        for obj in objects:
            docs.extend([obj] if isinstance(obj, dict) else obj)
        self.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        """An object as JSON (kubectl get -o json)."""
        ns = ["-n", namespace] if namespace else []
        return json.loads(self.kubectl("get", kind, name, *ns, "-o", "json").stdout)

    # -- namespaces ------------------------------------------------------------------------------

    def new_namespace(self, prefix: str = "t") -> str:
        """Create a namespace with a unique name starting with `prefix`; return its name."""
        base = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:40] or "t"
        name = f"{base}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        self.wait(
            f"default ServiceAccount in {name}",
            lambda: self.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
        )
        return name

    @property
    def namespace(self) -> str:
        """A fresh namespace for the current test, created on first use within it (also when first
        read from a module fixture: that fixture and the test then share it). Namespaces stay until
        the cluster stops, so a failed test's objects can be inspected."""
        key = self.current_test or "default"
        if key not in self._namespaces:
            test_name = key.rsplit("::", 1)[-1].split("[")[0].removeprefix("test_")
            self._namespaces[key] = self.new_namespace(test_name)
        return self._namespaces[key]

    # -- waiting ---------------------------------------------------------------------------------

    wait = staticmethod(wait)

    def _node_ready(self, name: str) -> bool:
        done = self.kubectl("get", "node", name, "-o", "json", check=False)
        if done.returncode != 0:
            return False
        conditions = json.loads(done.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
