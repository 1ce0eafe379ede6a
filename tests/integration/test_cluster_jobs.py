"""batch/v1 Jobs shaped like the operator's (podReplacementPolicy Failed, a podFailurePolicy, one GPU,
the local node selected) on the real controllers, their pods run by the test kubelet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from localkube import LOCAL_LABEL, LOCAL_NODE, Cluster

pytestmark = pytest.mark.cluster

CONFIG_ERROR = 3
"""The exit code that fails the Job at once (the trainer's config-error code in the real Job)."""


def job(name: str, code: str, out: Path, backoff_limit: int = 0) -> dict[str, Any]:
    """A Job whose one container runs `python -c code` with /out (a hostPath of the test) and the
    pod's name in env."""
    container = {
        "name": "trainer",
        "image": "python:3.11-slim",
        "command": ["python", "-c", code],
        "env": [
            {"name": "OUT", "value": "/out"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
        "volumeMounts": [{"name": "out", "mountPath": "/out"}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "trainer",
                            "operator": "In",
                            "values": [CONFIG_ERROR],
                        },
                    },
                ]
            },
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {LOCAL_LABEL: "true"},
                    "terminationGracePeriodSeconds": 5,
                    "containers": [container],
                    "volumes": [{"name": "out", "hostPath": {"path": str(out)}}],
                }
            },
        },
    }


def run(cluster: Cluster, manifest: dict[str, Any]) -> str:
    ns = cluster.namespace
    manifest["metadata"]["namespace"] = ns
    cluster.apply(manifest)
    return ns


def job_condition(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    """The Job's Complete or Failed condition once it has one."""
    conditions = cluster.get("job", name, ns).get("status", {}).get("conditions", [])
    return next(
        (c for c in conditions if c["type"] in ("Complete", "Failed") and c["status"] == "True"), None
    )


def pods(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", ns, "-l", f"job-name={name}", "-o", "json").stdout
    return sorted(json.loads(out)["items"], key=lambda p: p["metadata"]["creationTimestamp"])


def test_job_runs_a_real_process_to_complete(cluster: Cluster, tmp_path: Path) -> None:
    code = (
        "import json, os; open(os.environ['OUT'] + '/ran', 'w').write(os.environ['POD']); "
        "open('/dev/termination-log', 'w').write(json.dumps({'phase': 'Succeeded', 'loss': 0.5}))"
    )
    ns = run(cluster, job("complete", code, tmp_path))
    done = cluster.wait("Job complete", lambda: job_condition(cluster, ns, "complete"), timeout=60)
    assert done["type"] == "Complete", done
    [pod] = pods(cluster, ns, "complete")
    assert pod["spec"]["nodeName"] == LOCAL_NODE
    assert (tmp_path / "ran").read_text() == pod["metadata"]["name"]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert json.loads(terminated["message"]) == {"phase": "Succeeded", "loss": 0.5}
    assert pod["status"]["podIP"] == "127.0.0.1"
    # The GPU request brought the toleration of the GPU taint (ExtendedResourceToleration).
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])


@pytest.mark.parametrize("reason", ["TerminationByKubelet", "EvictionByEvictionAPI"])
def test_evicted_pod_is_replaced_without_counting_against_backoff(
    cluster: Cluster, tmp_path: Path, reason: str
) -> None:
    # The first run waits to be evicted (and notes its SIGTERM); the replacement finishes.
    code = """
import os, pathlib, signal, sys, time
out = pathlib.Path(os.environ["OUT"])
first = not (out / "first").exists()
(out / ("first" if first else "second")).write_text(os.environ["POD"])
if first:
    signal.signal(signal.SIGTERM, lambda *_: ((out / "sigterm").write_text("1"), sys.exit(143)))
    time.sleep(300)
"""
    ns = run(cluster, job("evicted", code, tmp_path, backoff_limit=0))
    cluster.wait("first pod running", (tmp_path / "first").exists, timeout=60)
    first = (tmp_path / "first").read_text()
    cluster.kubelet.evict(ns, first, reason=reason)

    done = cluster.wait("Job complete", lambda: job_condition(cluster, ns, "evicted"), timeout=90)
    assert done["type"] == "Complete", done  # backoffLimit 0: a counted failure would have failed it
    assert (tmp_path / "sigterm").exists(), "the evicted process got no SIGTERM"
    assert (tmp_path / "second").read_text() != first
    if reason == "TerminationByKubelet":  # the drained pod is gone; the reclaimed one stays Failed
        [evicted, _] = pods(cluster, ns, "evicted")
        assert evicted["metadata"]["name"] == first
        assert evicted["status"]["phase"] == "Failed"
        [disruption] = [c for c in evicted["status"]["conditions"] if c["type"] == "DisruptionTarget"]
        assert disruption["reason"] == reason
        assert evicted["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143


def test_config_error_exit_code_fails_the_job_at_once(cluster: Cluster, tmp_path: Path) -> None:
    code = f"import sys; print('bad config: lora.r must be > 0'); sys.exit({CONFIG_ERROR})"
    ns = run(cluster, job("config-error", code, tmp_path, backoff_limit=3))
    done = cluster.wait("Job failed", lambda: job_condition(cluster, ns, "config-error"), timeout=60)
    assert done["type"] == "Failed"
    assert done["reason"] == "PodFailurePolicy", done
    [pod] = pods(cluster, ns, "config-error")  # backoffLimit 3, yet no retry
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == CONFIG_ERROR
    assert terminated["reason"] == "Error"
    assert "bad config: lora.r must be > 0" in terminated["message"]  # FallbackToLogsOnError
