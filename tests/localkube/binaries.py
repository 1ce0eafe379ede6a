"""Where the control-plane binaries built by hack/cluster-bins.sh live."""

from __future__ import annotations

import os
from pathlib import Path

KUBE_VERSION = "v1.34.4"
"""Keep in step with KUBE_VERSION in hack/cluster-bins.sh."""

NAMES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok", "helm")

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "cluster-bins.sh"


def bin_dir() -> Path:
    """$KUBE_BIN_DIR, else the versioned cache that hack/cluster-bins.sh fills."""
    if explicit := os.environ.get("KUBE_BIN_DIR"):
        return Path(explicit)
    cache = Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune-operator")
    return cache / f"k8s-{KUBE_VERSION}" / "bin"


def missing(directory: Path | None = None) -> list[str]:
    """Names of the binaries not (yet) in `directory` (default: bin_dir())."""
    directory = directory or bin_dir()
    return [name for name in NAMES if not os.access(directory / name, os.X_OK)]
