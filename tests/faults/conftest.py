"""Fixtures of the fault tests: `faults`, a control plane and operator of their own (faults.env)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from faults.env import FaultEnv, start
from localkube import bin_dir, missing
from localkube.binaries import BUILD_SCRIPT


@pytest.fixture(scope="session")
def faults(tmp_path_factory: pytest.TempPathFactory, s3: Any) -> Iterator[FaultEnv]:
    """Skipped when the control-plane binaries are not built, unless CI is set (then it fails)."""
    if absent := missing():
        reason = f"control-plane binaries not built ({', '.join(absent)}): run {BUILD_SCRIPT}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    env = start(tmp_path_factory.mktemp("faults"), bin_dir(), s3)
    try:
        yield env
    finally:
        env.operator.stop()
        env.cluster.stop()
