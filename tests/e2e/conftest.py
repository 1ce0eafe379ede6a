"""e2e fixtures: the CRD installed, the operator running as a process, the tiny model and data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.harness import OperatorProcess, Recorder, install_crd, operator_config
from trainer_fixtures import alpaca_rows, write_jsonl


@pytest.fixture(scope="session")
def operator(cluster: Any, s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator (cluster-wide) for the whole session; tests may kill and restart it."""
    install_crd(cluster)
    proc = OperatorProcess(cluster.kubeconfig, operator_config(s3), tmp_path_factory.mktemp("operator"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def recorder(cluster: Any) -> Iterator[Recorder]:
    """Every version of every FineTuneJob and training pod, as the watches deliver them."""
    rec = Recorder(cluster.kubeconfig).start()
    try:
        yield rec
    finally:
        rec.stop()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", alpaca_rows(64))


@pytest.fixture
def ns(cluster: Any, s3: Any) -> str:
    """This test's namespace, with the S3 credentials Secret the operator's default names."""
    namespace = cluster.namespace
    cluster.apply(s3.secret(namespace))
    return namespace
