"""Helm for the chart tests: the real binary (built from its Go module by hack/cluster-bins.sh into
the versioned cache, like the control-plane binaries), `helm template` parsed into objects."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "finetune-operator"
KUBE_VERSION = "v1.34.4"  # hack/cluster-bins.sh
RELEASE = "ftop"
NAMESPACE = "finetune-system"


def kube_binary(name: str) -> str:
    """A binary of hack/cluster-bins.sh's cache (helm, kubectl, ...), built on first use."""
    cache = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-operator"))
    built = cache / f"k8s-{KUBE_VERSION}" / "bin" / name
    if not built.exists() and shutil.which("go"):
        subprocess.run([REPO / "hack" / "cluster-bins.sh"], check=True)
    if not built.exists():
        pytest.fail(f"{name} not found in {built.parent}: run hack/cluster-bins.sh (needs go)")
    return str(built)


def helm() -> str:
    """$HELM, else the cache's helm."""
    return os.environ.get("HELM") or kube_binary("helm")


def run_helm(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/helm-cache", "HELM_CONFIG_HOME": "/tmp/helm-config"}
    return subprocess.run([helm(), *args], check=False, capture_output=True, text=True, env=env, **kwargs)


def helm_template(*args: str, namespace: str = NAMESPACE, release: str = RELEASE) -> list[dict]:
    """The chart rendered with extra `helm template` arguments, as a list of objects."""
    done = run_helm(
        "template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *args
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]
