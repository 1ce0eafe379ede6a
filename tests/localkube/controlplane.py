"""etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on loopback ports, as in a
real cluster: client certificates for every component, RBAC and Node authorization, the usual
admission plugins, ServiceAccount tokens signed and reviewable."""

from __future__ import annotations

import json
import ssl
import time
import urllib.request
from pathlib import Path

import yaml

from .pki import Pki
from .procs import Process, free_port, wait_for

ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.0.0.0/24"

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
"""On every GPU node, as GPU node pools usually are. The ExtendedResourceToleration admission
plugin (enabled here) adds the matching toleration to any pod that requests nvidia.com/gpu, so
GPU pods land on GPU nodes and nothing else does (a chart's operator Deployment stays off them)."""

KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
"""Only on kwok's fake nodes: their pods "run" without running, so a pod must opt in to them."""


def kubeconfig_yaml(server: str, ca: Path, cert: Path, key: Path, user: str) -> str:
    """A kubeconfig for one client-certificate identity (file paths, not inline data)."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "localkube",
            "clusters": [
                {"name": "localkube", "cluster": {"server": server, "certificate-authority": str(ca)}}
            ],
            "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": "localkube", "context": {"cluster": "localkube", "user": user}}],
        }
    )


def audit_policy_yaml(users: list[str]) -> str:
    """An audit policy recording one line per request (verb, resource, user, status) of `users`, and
    nothing of anyone else: cheap enough to leave on while measuring what a controller costs."""
    return yaml.safe_dump(
        {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [{"level": "Metadata", "users": users}, {"level": "None"}],
        }
    )


class ControlPlane:
    """Call start(), then use `kubeconfig` (system:masters); stop() ends every process.

    `workdir` holds certificates, etcd data and one log per component under `workdir/logs`.

    For benchmarks: `kwok_nodes`, `gpus_per_node` and `pods_per_node` size the fake GPU pool;
    `kwok_stages` (YAML of kwok Stage objects) replaces kwok's built-in pod stages (node stages stay
    the built-in ones); `audit_users` turns on the API server's audit log (`audit_log`) for those
    users only; `unlimited_qps` lifts the client-side rate limits of the controller manager and
    scheduler (20 and 50 requests/s by default), as kwokctl does for its benchmarks.
    """

    def __init__(
        self,
        workdir: Path,
        bin_dir: Path,
        kwok_nodes: int = 3,
        gpus_per_node: int = 8,
        *,
        pods_per_node: int = 110,
        kwok_stages: str = "",
        audit_users: list[str] | None = None,
        unlimited_qps: bool = False,
    ) -> None:
        self.workdir = workdir
        self.bin = bin_dir
        self.kwok_nodes = [f"kwok-gpu-{i}" for i in range(kwok_nodes)]
        self.gpus_per_node = gpus_per_node
        self.pods_per_node = pods_per_node
        self.kwok_stages = kwok_stages
        self.audit_users = audit_users or []
        self.unlimited_qps = unlimited_qps
        self.logs = workdir / "logs"
        self.audit_log = self.logs / "audit.jsonl"
        self.procs: list[Process] = []
        self.timings: dict[str, float] = {}
        self.etcd_url = ""
        self.apiserver: Process | None = None
        self.pki = Pki(workdir / "pki")
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = self.kubeconfig_for("localkube-admin", "system:masters")

    def kubeconfig_for(self, user: str, *groups: str) -> Path:
        """A kubeconfig authenticating as `user` in `groups` (a client certificate of the CA)."""
        pair = self.pki.client(user, *groups)
        path = self.workdir / f"{user.replace(':', '-')}.kubeconfig"
        path.write_text(kubeconfig_yaml(self.server, self.pki.ca.cert, pair.cert, pair.key, user))
        return path

    def _spawn(self, name: str, *args: object) -> Process:
        proc = Process(name, [self.bin / name, *args], self.logs / f"{name}.log")
        self.procs.append(proc)
        return proc

    def _timed(self, what: str, ready, watch: list[Process], timeout: float = 60) -> None:
        self.timings[what] = wait_for(what, ready, timeout, watch)

    def start(self) -> None:
        t0 = time.monotonic()
        self.etcd_url = self._start_etcd()
        api = self._start_apiserver(self.etcd_url)
        self._start_controllers(api)
        self._start_kwok()
        self.timings["total"] = time.monotonic() - t0

    def _start_etcd(self) -> str:
        client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        etcd = self._spawn(
            "etcd",
            "--name=localkube",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=localkube={peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        )
        self._timed(
            "etcd", lambda: b'"health":"true"' in urllib.request.urlopen(f"{client}/health").read(), [etcd]
        )
        return client

    def admin_tls(self) -> ssl.SSLContext:
        """A TLS context trusting the cluster's CA, with the admin's client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        admin = self.pki.dir / "localkube-admin"
        ctx.load_cert_chain(f"{admin}.crt", f"{admin}.key")
        return ctx

    def _https(self, path: str) -> bytes:
        """GET on the API server as the admin."""
        with urllib.request.urlopen(f"{self.server}{path}", context=self.admin_tls(), timeout=5) as resp:
            return resp.read()

    def _start_apiserver(self, etcd: str) -> Process:
        pki = self.pki
        audit: list[str] = []
        if self.audit_users:
            policy = self.workdir / "audit-policy.yaml"
            policy.write_text(audit_policy_yaml(self.audit_users))
            audit = [
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=batch",
                "--audit-log-batch-max-wait=1s",
                "--audit-log-maxsize=0",
            ]
        api = self._spawn(
            "kube-apiserver",
            f"--etcd-servers={etcd}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--tls-cert-file={pki.apiserver.cert}",
            f"--tls-private-key-file={pki.apiserver.key}",
            f"--client-ca-file={pki.ca.cert}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-account-issuer={ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # The defaults (NamespaceLifecycle, ServiceAccount, PodSecurity, ResourceQuota, webhooks,
            # ...) plus what a kubeadm cluster adds and the GPU toleration of GPU node pools.
            "--enable-admission-plugins=NodeRestriction,ExtendedResourceToleration",
            "--allow-privileged=true",
            "--profiling=false",
            "--endpoint-reconciler-type=none",
            *audit,
        )
        self._timed("kube-apiserver /readyz", lambda: self._https("/readyz") == b"ok", [api], timeout=90)
        self.apiserver = api
        return api

    def restart_apiserver(self, down_seconds: float = 0.0) -> float:
        """Stop the API server (SIGTERM, SIGKILL after 2 s), keep it down `down_seconds`, start it
        again on the same port with the same etcd, and wait for /readyz. Every client sees its
        connections drop and its watches end, as in a control-plane upgrade. Returns the seconds
        from the stop until ready again."""
        assert self.apiserver is not None, "start() first"
        t0 = time.monotonic()
        self.apiserver.stop()
        self.procs.remove(self.apiserver)
        time.sleep(down_seconds)
        self._start_apiserver(self.etcd_url)
        return time.monotonic() - t0

    def _start_controllers(self, api: Process) -> None:
        pki = self.pki
        qps = ["--kube-api-qps=5000", "--kube-api-burst=10000"] if self.unlimited_qps else []
        kcm = self._spawn(
            "kube-controller-manager",
            *qps,
            f"--kubeconfig={self.kubeconfig_for('system:kube-controller-manager')}",
            "--controllers=*",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--secure-port=0",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca.cert}",
            f"--cluster-signing-cert-file={pki.ca.cert}",
            f"--cluster-signing-key-file={pki.ca.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--cluster-name=localkube",
        )
        sched = self._spawn(
            "kube-scheduler",
            *qps,
            f"--kubeconfig={self.kubeconfig_for('system:kube-scheduler')}",
            "--leader-elect=false",
            "--secure-port=0",
        )

        def default_sa() -> bool:
            self._https("/api/v1/namespaces/default/serviceaccounts/default")
            return True

        self._timed("default ServiceAccount", default_sa, [api, kcm, sched])

    def _start_kwok(self) -> None:
        config = self.workdir / "kwok.yaml"
        # Empty: kwok's built-in stages (node heartbeat; pods become Running, Job pods then Succeeded,
        # deleted pods go). Pod stages given here replace the built-in pod stages.
        config.write_text(self.kwok_stages)
        kwok = self._spawn(
            "kwok",
            f"--kubeconfig={self.kubeconfig_for('kwok', 'system:masters')}",
            f"--config={config}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--server-address=127.0.0.1:{free_port()}",
            f"--node-port={free_port()}",
            "--node-ip=127.0.0.1",
            "--cidr=10.244.0.1/24",
        )
        kubectl = Process(
            "kubectl-nodes",
            [self.bin / "kubectl", f"--kubeconfig={self.kubeconfig}", "create", "-f", self._write_nodes()],
            self.logs / "kubectl-nodes.log",
        )
        if kubectl.popen.wait(60) != 0:
            raise RuntimeError(f"creating the kwok nodes failed, see {kubectl.log}")

        def nodes_ready() -> bool:
            nodes = json.loads(self._https("/api/v1/nodes?labelSelector=type%3Dkwok"))["items"]
            ready = [
                n
                for n in nodes
                if any(
                    c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", [])
                )
            ]
            return len(ready) == len(self.kwok_nodes)

        self._timed("kwok nodes Ready", nodes_ready, [kwok])

    def _write_nodes(self) -> Path:
        # Shaped like a GPU server (16 CPUs and 128 GiB per GPU), so that GPUs, not CPU or memory
        # requests, limit how many training pods fit.
        capacity = {
            "cpu": str(16 * self.gpus_per_node),
            "memory": f"{128 * self.gpus_per_node}Gi",
            "pods": str(self.pods_per_node),
            "nvidia.com/gpu": str(self.gpus_per_node),
        }
        nodes = [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "type": "kwok",
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "nvidia.com/gpu.present": "true",
                    },
                },
                "spec": {"taints": [GPU_TAINT, KWOK_TAINT]},
                "status": {"capacity": capacity, "allocatable": capacity},
            }
            for name in self.kwok_nodes
        ]
        path = self.workdir / "kwok-nodes.yaml"
        path.write_text(yaml.safe_dump_all(nodes))
        return path

    def stop(self) -> None:
        """Stop every process, newest first (kwok and the controllers before the API server)."""
        for proc in reversed(self.procs):
            proc.stop()
