"""A control plane of their own for the fault tests: they restart its API server and kill its
operator, which the session cluster's other tests must never see.

kwok runs pods without ending them (localkube.kwokpods), so a test decides when a training pod
completes, fails or is preempted; the test kubelet's node (labelled `type: local`) runs real
processes for the jobs that select it. The operator runs as a process with its own client
certificate (user `finetune-operator`), a short resync period (RESYNC_SECONDS) and status writes
at most once a second.
"""

from __future__ import annotations

import concurrent.futures
import re
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.harness import CRD, OperatorProcess, operator_config
from localkube import Cluster, kwokpods
from localkube.cluster import wait
from localkube.rest import MERGE, HttpError, Rest

RESYNC_SECONDS = 10.0
POD_CREATE_GRACE_SECONDS = 20.0
OPERATOR_USER = "finetune-operator"
API = "/apis/finetune.dev/v1alpha1"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
KWOK_JOB: dict[str, Any] = {
    "model": {"hub": "unsloth/Qwen3-8B"},
    "data": {"hub": "FreedomIntelligence/medical-o1-reasoning-SFT", "config": "en", "split": "train[0:500]"},
}
"""A job for kwok's nodes: its pods never run anything, the tests end them."""
BASE_MODELS = "base-models"
DATASETS = "datasets"
"""Prefixes of the test bucket the platform's policy lets every job read (spec.model.s3, spec.data.s3)."""
SUMMARY = '{"exitReason": "completed", "steps": 60, "totalSteps": 60}'


def ftj(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec or KWOK_JOB,
    }


@dataclass
class FaultEnv:
    cluster: Cluster
    operator: OperatorProcess
    rest: Rest

    # -- objects -----------------------------------------------------------------------------

    def namespace(self, prefix: str, secret: dict[str, Any] | None = None) -> str:
        ns = self.cluster.new_namespace(prefix)
        if secret is not None:
            self.rest.request("POST", f"/api/v1/namespaces/{ns}/secrets", secret)
        return ns

    def create(self, ns: str, objs: Iterable[dict[str, Any]], threads: int = 8) -> None:
        """POST FineTuneJobs, several at once (as `kubectl apply -f dir/` of many files would)."""
        rests = [Rest(self.cluster.kubeconfig) for _ in range(threads)]

        def one(item: tuple[int, dict[str, Any]]) -> None:
            i, obj = item
            rests[i % threads].request("POST", f"{API}/namespaces/{ns}/finetunejobs", obj)

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, enumerate(objs)))

    def ftjs(self, ns: str) -> dict[str, dict[str, Any]]:
        items = self.rest.request("GET", f"{API}/namespaces/{ns}/finetunejobs")["items"]
        return {o["metadata"]["name"]: o for o in items}

    def get(self, ns: str, name: str) -> dict[str, Any]:
        return self.rest.request("GET", f"{API}/namespaces/{ns}/finetunejobs/{name}")

    def jobs(self, ns: str) -> list[dict[str, Any]]:
        return self.rest.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]

    def pods(self, ns: str) -> list[dict[str, Any]]:
        return self.rest.request("GET", f"/api/v1/namespaces/{ns}/pods")["items"]

    def pod_of(self, ns: str, name: str, phase: str = "Running") -> dict[str, Any] | None:
        for pod in self.pods(ns):
            labels = pod["metadata"].get("labels") or {}
            if labels.get("batch.kubernetes.io/job-name") == name and pod["status"].get("phase") == phase:
                return pod
        return None

    def phases(self, ns: str) -> dict[str, str | None]:
        return {n: (o.get("status") or {}).get("phase") for n, o in self.ftjs(ns).items()}

    def all_in(self, ns: str, phase: str, count: int) -> bool:
        phases = self.phases(ns)
        return len(phases) == count and all(p == phase for p in phases.values())

    def patch_status(self, ns: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        path = f"{API}/namespaces/{ns}/finetunejobs/{name}/status"
        return self.rest.request("PATCH", path, {"status": status}, content_type=MERGE)

    # -- pods ---------------------------------------------------------------------------------

    def complete(self, ns: str, name: str) -> None:
        pod = wait(f"a running pod of {name}", lambda: self.pod_of(ns, name), 60)
        kwokpods.complete(self.rest, pod, SUMMARY)

    def preempt(self, ns: str, name: str) -> None:
        pod = wait(f"a running pod of {name}", lambda: self.pod_of(ns, name), 60)
        kwokpods.preempt(self.rest, pod)

    # -- the operator --------------------------------------------------------------------------

    def metric(self, name: str) -> float:
        """A series of the operator's /metrics (0 when absent)."""
        for line in self.operator.metrics().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rpartition(" ")[2])
        return 0.0

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.operator.url("health", "/healthz"), timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def operator_log(self) -> str:
        return self.operator.log_path.read_text(errors="replace")


def duplicate_jobs(jobs: list[dict[str, Any]]) -> dict[str, int]:
    """FineTuneJob uid -> number of Jobs it controls, for those controlling more than one."""
    owners: dict[str, int] = {}
    for job in jobs:
        for ref in job["metadata"].get("ownerReferences") or []:
            if ref.get("controller"):
                owners[ref["uid"]] = owners.get(ref["uid"], 0) + 1
    return {uid: n for uid, n in owners.items() if n > 1}


def install_crd(cluster: Cluster) -> None:
    """Apply the CRD and wait until FineTuneJobs can be listed (right after Established the API
    server still answers 429 "storage is (re)initializing" for a moment)."""
    cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    rest = Rest(cluster.kubeconfig)

    def listable() -> bool:
        try:
            rest.request("GET", f"{API}/finetunejobs", query={"limit": 1})
        except HttpError:
            return False
        return True

    wait("FineTuneJobs listable", listable, 90, 0.2)


def start(workdir: Path, bin_dir: Path, s3: Any) -> FaultEnv:
    stages = kwokpods.MANUAL_POD_STAGES
    cluster = Cluster.start(
        workdir / "cluster", bin_dir, kwok_nodes=2, gpus_per_node=64, pods_per_node=256, kwok_stages=stages
    )
    try:
        cluster.kubectl("label", "node", "local-gpu-0", "type=local")
        install_crd(cluster)
        config = operator_config(
            s3,
            defaultNodeSelector={"type": "kwok"},
            defaultTolerations=[kwokpods.KWOK_TOLERATION, GPU_TOLERATION],
            resyncSeconds=RESYNC_SECONDS,
            statusWriteIntervalSeconds=1,
            secretMissingGraceSeconds=2,
            podCreateGraceSeconds=POD_CREATE_GRACE_SECONDS,
            allowedModelSources=["unsloth/", "/", "s3://"],
            policy={
                "credentialsSecrets": ["partial-s3"],
                # allowed, and missing from the cluster: status names it (test_status_faults)
                "serviceAccounts": ["no-such-sa"],
                "modelPrefixes": [f"s3://{s3.bucket}/{BASE_MODELS}/"],
                "dataPrefixes": [f"s3://{s3.bucket}/{DATASETS}/"],
            },
        )
        kubeconfig = cluster.control_plane.kubeconfig_for(OPERATOR_USER, "system:masters")
        operator = OperatorProcess(kubeconfig, config, workdir / "operator").start()
    except BaseException:
        cluster.stop()
        raise
    return FaultEnv(cluster, operator, Rest(cluster.kubeconfig))


def secret_values_in(text: str, values: Iterable[str]) -> list[str]:
    """The values that occur in `text` (a secret must never reach a log, event or status)."""
    return [v for v in values if v and re.search(re.escape(v), text)]
