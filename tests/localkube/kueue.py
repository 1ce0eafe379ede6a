"""The real Kueue manager (hack/cluster-bins.sh builds it) against a running local control plane.

What `Kueue(control_plane).start()` sets up, as Kueue's own manifests do in a cluster:
- its CRDs, from the same module as the binary; the five with two served versions (v1beta1 and
  v1beta2) convert through Kueue's conversion webhook, as in config/components/crd/patches;
- its Configuration: batch/v1 Jobs managed when they carry `kueue.x-k8s.io/queue-name`, leader
  election off, `internalCertManagement` disabled (the certificates are this fixture's), every port
  on 127.0.0.1 and picked at random (so several clusters run side by side), VisibilityOnDemand off
  (its API server listens on a fixed port and needs an APIService);
- its webhook server on 127.0.0.1 with a serving certificate of the cluster's CA, and the
  Mutating/ValidatingWebhookConfigurations of config/components/webhook pointing at it by URL,
  limited to the groups this Configuration manages (batch and kueue.x-k8s.io): the other
  frameworks' webhooks target resources that are not installed, or Pods and apps, which Kueue
  would then gate for nothing.

Kueue runs as a system:masters identity: the fixture gives it no ClusterRole of its own (its
chart's is long and not what is tested here).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .controlplane import ControlPlane
from .procs import Process, free_port, wait_for

KUEUE_VERSION = "v0.15.2"
"""Keep in step with KUEUE_VERSION in hack/cluster-bins.sh."""
NAMESPACE = "kueue-system"
MANAGED_GROUPS = {"batch", "kueue.x-k8s.io"}
CONVERTED = (
    "localqueues.kueue.x-k8s.io",
    "clusterqueues.kueue.x-k8s.io",
    "cohorts.kueue.x-k8s.io",
    "workloads.kueue.x-k8s.io",
    "multikueueclusters.kueue.x-k8s.io",
)
"""CRDs whose versions convert through the webhook (config/components/crd/kustomization.yaml)."""


def kueue_dir() -> Path:
    """$KUEUE_DIR, else the versioned cache that hack/cluster-bins.sh fills."""
    if explicit := os.environ.get("KUEUE_DIR"):
        return Path(explicit)
    cache = Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune-operator")
    return cache / f"kueue-{KUEUE_VERSION}"


def kueue_missing(directory: Path | None = None) -> bool:
    directory = directory or kueue_dir()
    return not (os.access(directory / "bin" / "kueue", os.X_OK) and (directory / "webhooks.yaml").exists())


def configuration(webhook_port: int, cert_dir: Path, health_port: int, metrics_port: int) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for the local cluster."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        "featureGates": {"VisibilityOnDemand": False},
        "clientConnection": {"qps": 100, "burst": 200},
    }


def webhook_configurations(manifests: list[dict[str, Any]], url: str, ca: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations with `clientConfig.url` on `url` (service references need
    cluster DNS), named as its kustomization names them, only for MANAGED_GROUPS."""
    out = []
    for original in manifests:
        doc = copy.deepcopy(original)
        doc["metadata"]["name"] = "kueue-" + doc["metadata"]["name"]
        hooks = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups <= MANAGED_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": base64.b64encode(ca).decode()}
            hooks.append(hook)
        doc["webhooks"] = hooks
        out.append(doc)
    return out


def crds(directory: Path, url: str, ca: bytes) -> list[dict[str, Any]]:
    """Kueue's CRDs; those in CONVERTED with the conversion webhook on `url`/convert."""
    out = []
    for path in sorted((directory / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["metadata"]["name"] in CONVERTED:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{url}/convert", "caBundle": base64.b64encode(ca).decode()},
                    "conversionReviewVersions": ["v1"],
                },
            }
        out.append(crd)
    return out


class Kueue:
    """The Kueue manager of one control plane: start(), then stop(). `timings` says how long the
    steps took; `log` is the manager's log."""

    def __init__(self, control_plane: ControlPlane, directory: Path | None = None) -> None:
        self.cp = control_plane
        self.dir = directory or kueue_dir()
        self.workdir = control_plane.workdir / "kueue"
        self.log = control_plane.logs / "kueue.log"
        self.proc: Process | None = None
        self.timings: dict[str, float] = {}
        self.webhook_port = free_port()
        self.health_port = free_port()
        self.metrics_port = free_port()

    def _apply(self, docs: list[dict[str, Any]], name: str) -> None:
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        self._kubectl(f"applying Kueue's {name}", "apply", "--server-side", "--force-conflicts", "-f", path)

    def _kubectl(self, what: str, *args: str | Path) -> None:
        kubectl = Process(
            "kubectl-kueue",
            [self.cp.bin / "kubectl", f"--kubeconfig={self.cp.kubeconfig}", *args],
            self.cp.logs / "kubectl-kueue.log",
        )
        if kubectl.popen.wait(120) != 0:
            raise RuntimeError(f"{what} failed, see {kubectl.log}")

    def start(self) -> Kueue:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        ca = self.cp.pki.ca.cert.read_bytes()
        certs = self.workdir / "webhook-certs"
        self.cp.pki.serving("kueue-webhook", certs)
        metrics_certs = self.workdir / "metrics-certs"
        self.cp.pki.serving("kueue-metrics", metrics_certs)
        url = f"https://127.0.0.1:{self.webhook_port}"
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        kueue_crds = crds(self.dir, url, ca)
        self._apply([namespace, *kueue_crds], "crds")
        # The manager sets up its indexes at start and exits when a kind is not served yet.
        names = [f"crd/{c['metadata']['name']}" for c in kueue_crds]
        established = ("wait", "--for=condition=Established", "--timeout=60s")
        self._kubectl("waiting for Kueue's CRDs", *established, *names)
        self.timings["kueue CRDs"] = time.monotonic() - t0
        config = self.workdir / "config.yaml"
        config.write_text(
            yaml.safe_dump(configuration(self.webhook_port, certs, self.health_port, self.metrics_port))
        )
        kubeconfig = self.cp.kubeconfig_for("kueue-manager", "system:masters")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUEUE_METRICS_CERT_DIR": str(metrics_certs)}
        self.proc = Process(
            "kueue",
            [self.dir / "bin" / "kueue", f"--config={config}", "--zap-log-level=2"],
            self.log,
            env=env,
        )
        self.cp.procs.append(self.proc)
        t1 = time.monotonic()
        wait_for("kueue /readyz", self._ready, 120, [self.proc])
        manifests = list(yaml.safe_load_all((self.dir / "webhooks.yaml").read_text()))
        self._apply(webhook_configurations(manifests, url, ca), "webhooks")
        wait_for("Kueue's Job webhook", self._suspends_jobs, 60, [self.proc])
        self.timings["kueue manager"] = time.monotonic() - t1
        return self

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as resp:
            return resp.status == 200

    def _suspends_jobs(self) -> bool:
        """Whether the API server calls Kueue's Job webhook yet: a server-side dry run of an
        unsuspended Job with a queue name comes back suspended."""
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": "kueue-probe",
                "namespace": "default",
                "labels": {"kueue.x-k8s.io/queue-name": "probe"},
            },
            "spec": {
                "suspend": False,
                "template": {
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "probe"}]}
                },
            },
        }
        body = json.dumps(job).encode()
        req = urllib.request.Request(
            f"{self.cp.server}/apis/batch/v1/namespaces/default/jobs?dryRun=All",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, context=self.cp.admin_tls(), timeout=5) as resp:
            return bool(json.loads(resp.read())["spec"].get("suspend"))

    def stop(self) -> None:
        """Remove the webhook configurations (with failurePolicy Fail, every Job create would fail
        once the manager is gone), then stop the manager."""
        if self.proc is None:
            return
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            Process(
                "kubectl-kueue",
                [
                    self.cp.bin / "kubectl",
                    f"--kubeconfig={self.cp.kubeconfig}",
                    "delete",
                    kind,
                    f"kueue-{kind.removesuffix('webhookconfiguration')}-webhook-configuration",
                    "--ignore-not-found",
                    "--wait=false",
                ],
                self.cp.logs / "kubectl-kueue.log",
            ).popen.wait(30)
        self.proc.stop()
        if self.proc in self.cp.procs:
            self.cp.procs.remove(self.proc)
        self.proc = None
