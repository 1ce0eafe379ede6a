"""The pytest side: session fixtures `cluster` and `s3`, a fresh namespace per test, component
logs attached to the report of a failed cluster test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .binaries import BUILD_SCRIPT, bin_dir, missing
from .cluster import Cluster
from .kueue import Kueue, kueue_dir, kueue_missing
from .procs import in_ci, tail
from .s3 import S3, start_s3

_active: list[Cluster] = []


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The local cluster (see localkube.Cluster). Skipped when the binaries are not built, unless
    CI is set: then that is a failure (`make test` builds them first)."""
    directory = bin_dir()
    if absent := missing(directory):
        reason = f"control-plane binaries not built ({', '.join(absent)} missing in {directory}): "
        reason += f"run {BUILD_SCRIPT}"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    started = Cluster.start(tmp_path_factory.mktemp("localkube"), directory)
    _active.append(started)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in started.timings.items())
    print(f"\nlocalkube up in {started.workdir}: {timings}")
    try:
        yield started
    finally:
        _active.remove(started)
        started.stop()


@pytest.fixture(scope="session")
def kueue(cluster: Cluster) -> Kueue:
    """The real Kueue manager on the session's cluster (see localkube.kueue), started on first use
    and stopped with the cluster. Skipped when not built, unless CI is set."""
    if kueue_missing():
        reason = f"the Kueue manager is not built (nothing in {kueue_dir()}): run {BUILD_SCRIPT}"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    started = cluster.start_kueue()
    print(f"\nKueue up: {', '.join(f'{k} {v:.1f}s' for k, v in started.timings.items())}")
    return started


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """A moto S3 server over HTTP on loopback with the bucket `finetune` (see localkube.S3)."""
    server = start_s3()
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for started in _active:
        started.current_test = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed or "cluster" not in getattr(item, "fixturenames", ()) or not _active:
        return
    started = _active[0]
    lines = [f"{name}: {path}" for name, path in started.logs.items()]
    lines += ["", f"test kubelet log tail ({started.logs.get('test-kubelet')}):"]
    lines += [tail(started.logs["test-kubelet"], 15)] if "test-kubelet" in started.logs else []
    if started.kubelet is not None and (ns := started._namespaces.get(item.nodeid)):
        for log in sorted(started.kubelet.workdir.glob(f"pods/{ns}_*/*.log")):
            lines += ["", f"container log {log}:", tail(log, 15)]
    report.sections.append(("localkube logs", "\n".join(lines)))
