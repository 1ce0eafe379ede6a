"""e2e fixtures: the CRD installed, the operator running as a process, the tiny model and data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_install import installed_chart
from e2e.harness import HOST_PROCESS_IMAGE, OperatorProcess, Recorder, install_crd, operator_config
from trainer_fixtures import alpaca_rows, write_jsonl


@pytest.fixture(scope="module")
def operator(cluster: Any, s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator (cluster-wide) for an e2e module; tests may kill and restart it. Module scope:
    a cluster-wide operator left running would reconcile the FineTuneJobs of later test modules.

    It runs with the Helm chart's ServiceAccount token and nothing else: the chart is installed with
    `helm install` (replicas=2, so its Lease Role exists) and the operator takes that Lease, so every
    e2e test also proves the chart's RBAC is enough for the whole lifecycle, leader election included,
    and that the chart's admission policy admits every Job the operator makes.
    """
    install_crd(cluster)
    release_ns = cluster.new_namespace("finetune-system")
    workdir = tmp_path_factory.mktemp("operator")
    # Cluster-wide by explicit choice (rbac.clusterWide): every e2e test makes its own namespace. The
    # chart's admission policy knows the trainer image the operator's config names.
    values = (
        "--set",
        "replicas=2",
        "--set",
        "rbac.clusterWide=true",
        "--set",
        f"config.defaultImage={HOST_PROCESS_IMAGE}",
    )
    with installed_chart(cluster, workdir, *values, namespace=release_ns) as chart:
        election = {"enabled": True, "namespace": release_ns, "leaseName": chart["fullname"],
                    "leaseDurationSeconds": 6, "renewSeconds": 2}  # fmt: skip
        proc = OperatorProcess(chart["sa"], operator_config(s3, leaderElection=election), workdir)
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
