"""No Argo CD drift from the operator's writes, on a real kube-apiserver: a FineTuneJob applied from
Git (client-side apply, and server-side apply as Argo CD's `ServerSideApply=true` does), then a
status written the way the operator writes it (a merge patch of the /status subresource), then
`kubectl diff` of the Git manifest — the diff Argo CD's sync computes — shows nothing.

The operator's writes are made here by the test itself (same call as finetune_operator.kube's
patch_ftj_status), so this holds the contract independently of the controller loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
GIT_MANIFEST = REPO / "deploy" / "kueue" / "finetunejob.yaml"
STATUS = {
    "phase": "Running",
    "message": "the trainer is running",
    "observedGeneration": 1,
    "jobName": "medical-r1-queued",
    "conditions": [
        {"type": "Running", "status": "True", "reason": "Training", "message": "the trainer is running",
         "lastTransitionTime": "2026-11-23T10:00:00Z", "observedGeneration": 1},
    ],
    "progress": {"step": 30, "totalSteps": 60, "percent": 50.0, "loss": 1.23, "tokensPerSecond": 5200.0},
    "checkpoint": {"uri": "s3://models/finetune/team-a/medical-r1-queued/step-20/", "step": 20,
                   "time": "2026-11-23T10:05:00Z"},
    "preemptions": 1,
    "startTime": "2026-11-23T09:58:00Z",
}  # fmt: skip
APPLY_MODES = {
    "client-side": ("apply",),
    "server-side": ("apply", "--server-side", "--field-manager=argocd-controller"),
}
DIFF_MODES = {
    "client-side": ("diff",),
    # Argo CD's server-side sync applies with --force-conflicts: fields another manager took over
    # show up as a diff instead of an error.
    "server-side": ("diff", "--server-side", "--force-conflicts", "--field-manager=argocd-controller"),
}


@pytest.fixture(scope="module")
def kube(cluster: Any) -> Any:
    cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.finetune.dev")
    return cluster


def git_manifest(name: str, namespace: str) -> str:
    doc = yaml.safe_load(GIT_MANIFEST.read_text())
    doc["metadata"].update(name=name, namespace=namespace)
    return yaml.safe_dump(doc)


def get(kube: Any, name: str) -> dict[str, Any]:
    return json.loads(kube.kubectl("get", "ftj", name, "-n", kube.namespace, "-o", "json").stdout)


@pytest.mark.parametrize("mode", APPLY_MODES, ids=APPLY_MODES)
def test_status_written_by_the_operator_is_no_drift(kube, mode):
    name = f"drift-{mode}"
    manifest = git_manifest(name, kube.namespace)
    kube.kubectl(*APPLY_MODES[mode], "-f", "-", input=manifest)
    before = get(kube, name)

    status = {**STATUS, "observedGeneration": before["metadata"]["generation"]}
    kube.kubectl("patch", "ftj", name, "-n", kube.namespace, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": status}))  # fmt: skip
    after = get(kube, name)
    assert after["status"]["phase"] == "Running"
    # The status subresource leaves spec, labels, annotations and the generation alone.
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["spec"] == before["spec"]
    assert after["metadata"].get("annotations") == before["metadata"].get("annotations")
    assert after["metadata"].get("labels") == before["metadata"].get("labels")

    diff = kube.kubectl(*DIFF_MODES[mode], "-f", "-", input=manifest, check=False)
    assert diff.returncode == 0, f"Git manifest drifts from the live object:\n{diff.stdout}{diff.stderr}"


def test_a_spec_change_is_drift(kube):
    """The check can fail: someone overwriting a field Git sets (here: activeDeadlineSeconds, one of
    the two fields a created job may change) is drift. (A field Git does not set, like spec.suspend
    here, is not: Argo CD leaves it to others too.)"""
    name = "drift-control"
    doc = yaml.safe_load(git_manifest(name, kube.namespace))
    doc["spec"]["activeDeadlineSeconds"] = 3600
    manifest = yaml.safe_dump(doc)
    kube.kubectl(*APPLY_MODES["server-side"], "-f", "-", input=manifest)
    patch = {"spec": {"activeDeadlineSeconds": 7200}}
    kube.kubectl("patch", "ftj", name, "-n", kube.namespace, "--type=merge", "-p", json.dumps(patch))
    diff = kube.kubectl(*DIFF_MODES["server-side"], "-f", "-", input=manifest, check=False)
    assert diff.returncode == 1, diff.stdout + diff.stderr
    assert "activeDeadlineSeconds" in diff.stdout
