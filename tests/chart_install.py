"""The chart installed for real (the built helm against the local kube-apiserver) and a kubeconfig
holding its ServiceAccount's token, for the RBAC tests and for running the operator under it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from chart_tools import CHART, KUBE_VERSION, kube_binary, run_helm


def kubectl(kubeconfig: str | Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kube_binary("kubectl"), "--kubeconfig", str(kubeconfig), *args],
        check=False, capture_output=True, text=True, input=stdin, timeout=120,
    )  # fmt: skip


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def token_kubeconfig(admin: str | Path, token: str, dest: Path) -> Path:
    """A kubeconfig for the admin's API server that authenticates with `token` only."""
    config = yaml.safe_load(Path(admin).read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])["context"]
    server = next(c for c in config["clusters"] if c["name"] == context["cluster"])["cluster"]
    dest.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": server}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
    }))  # fmt: skip
    return dest


@contextmanager
def installed_chart(
    cluster: Any, workdir: Path, *helm_args: str, namespace: str | None = None
) -> Iterator[dict[str, Any]]:
    """`helm install` of charts/finetune-operator into `namespace` (default: the test's), which
    enforces the restricted Pod Security Standard, plus a second namespace for jobs; yields the admin
    and ServiceAccount kubeconfigs, names and the install time, and uninstalls afterwards.

    The chart's own Deployment stays Pending (every local node is tainted for GPU pods); tests run
    the operator as a process with the ServiceAccount's kubeconfig instead."""
    admin = str(cluster.kubeconfig)
    release_ns = namespace or cluster.namespace
    team_ns = f"{release_ns}-team"
    ok(kubectl(admin, "create", "namespace", team_ns))
    ok(kubectl(admin, "label", "namespace", release_ns, "pod-security.kubernetes.io/enforce=restricted",
               "pod-security.kubernetes.io/warn=restricted", "--overwrite"))  # fmt: skip
    release = f"ftop-{release_ns[-8:]}".strip("-")
    start = time.monotonic()
    done = run_helm(
        "install", release, str(CHART), "--namespace", release_ns, "--kubeconfig", admin,
        "--set", "metrics.serviceMonitor.enabled=false", *helm_args,
    )  # fmt: skip
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert "PodSecurity" not in done.stderr, f"the operator pod breaks the restricted standard: {done.stderr}"
    print(f"\nhelm install of charts/finetune-operator against kube-apiserver {KUBE_VERSION}: {seconds:.1f}s")
    fullname = f"{release}-finetune-operator"
    token = ok(kubectl(admin, "create", "token", fullname, "-n", release_ns, "--duration=1h")).strip()
    sa = token_kubeconfig(admin, token, workdir / "kubeconfig")
    try:
        yield {"admin": admin, "sa": sa, "release": release, "fullname": fullname,
               "namespaces": {"release": release_ns, "team": team_ns}, "seconds": seconds}  # fmt: skip
    finally:
        run_helm("uninstall", release, "--namespace", release_ns, "--kubeconfig", admin)
        kubectl(admin, "delete", "namespace", team_ns, "--wait=false")
