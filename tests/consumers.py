"""The programs that consume this repository's files, for the tests that check those files: promtool,
Argo CD's Lua engine (hack/consumers/argocd-health) and Ollama's Modelfile parser and template engine
(hack/consumers/ollama-modelfile). hack/cluster-bins.sh builds them from their pinned Go modules into
the versioned cache (`make test` does it first); here it is only asked to make sure they are current,
which takes milliseconds when nothing changed and rebuilds a harness whose source did."""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cache() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune-operator")


@functools.cache
def _bin_dir() -> Path:
    out = cache() / "consumers" / "bin"
    if shutil.which("go"):
        out.mkdir(parents=True, exist_ok=True)
        with (out.parent / "build.lock").open("w") as lock:  # pytest workers may ask at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            env = {**os.environ, "FINETUNE_CACHE": str(cache())}
            subprocess.run([REPO / "hack" / "cluster-bins.sh", "consumers"], check=True, env=env)
    return out


def binary(name: str) -> str:
    """Path of a consumer program, built on first use."""
    path = _bin_dir() / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} not found in {path.parent}: run hack/cluster-bins.sh consumers (needs go)")
    return str(path)
