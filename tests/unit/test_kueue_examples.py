"""deploy/kueue/ at the manifest level: the example objects reference each other correctly, and the
Job the operator's real builder makes from the example FineTuneJob is one Kueue admits into them
(suspended, labelled with the queue, requesting only resources the ClusterQueue covers, within quota).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from finetune_operator.api import FineTuneJob
from finetune_operator.config import OperatorConfig
from finetune_operator.jobbuilder import build_job

KUEUE = Path(__file__).resolve().parents[2] / "deploy" / "kueue"


def load(kind: str) -> dict:
    docs = [yaml.safe_load(p.read_text()) for p in sorted(KUEUE.glob("*.yaml"))]
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.fixture
def job() -> dict:
    ftj = load("FineTuneJob")
    ftj["metadata"]["uid"] = "0b8f6c1e-5f0a-4d53-9d8e-2f4a1c9e7b21"
    return build_job(ftj, OperatorConfig.model_validate({"storage": {"uri": "s3://models/finetune"}}))


def quantity(value: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_example_finetunejob_is_valid():
    FineTuneJob.model_validate(load("FineTuneJob"))


def test_queue_chain_is_consistent():
    ftj, local, cluster, flavor, ns = (load(k) for k in ("FineTuneJob", "LocalQueue", "ClusterQueue",
                                                         "ResourceFlavor", "Namespace"))  # fmt: skip
    assert ftj["spec"]["queueName"] == local["metadata"]["name"]
    assert ftj["metadata"]["namespace"] == local["metadata"]["namespace"] == ns["metadata"]["name"]
    assert local["spec"]["clusterQueue"] == cluster["metadata"]["name"]
    assert cluster["spec"]["namespaceSelector"]["matchLabels"].items() <= ns["metadata"]["labels"].items()
    flavors = {f["name"] for group in cluster["spec"]["resourceGroups"] for f in group["flavors"]}
    assert flavors == {flavor["metadata"]["name"]}


def test_operator_creates_the_job_suspended_with_the_queue_label(job):
    assert job["spec"]["suspend"] is True, "Kueue admits only suspended Jobs"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == load("LocalQueue")["metadata"]["name"]


def test_job_requests_only_covered_resources_within_quota(job):
    """Kueue leaves a workload that requests an uncovered resource, or more than the quota, pending."""
    cluster = load("ClusterQueue")
    covered = {r for group in cluster["spec"]["resourceGroups"] for r in group["coveredResources"]}
    quota = {
        r["name"]: quantity(r["nominalQuota"])
        for group in cluster["spec"]["resourceGroups"]
        for f in group["flavors"]
        for r in f["resources"]
    }
    pod = job["spec"]["template"]["spec"]
    requests = {}
    for container in pod.get("initContainers", []) + pod["containers"]:
        resources = container.get("resources", {})
        for name, value in {**resources.get("limits", {}), **resources.get("requests", {})}.items():
            requests[name] = requests.get(name, 0) + quantity(value)
    assert set(requests) <= covered, set(requests) - covered
    assert requests["nvidia.com/gpu"] == 1
    assert all(requests[name] <= quota[name] for name in requests)


def test_job_without_queue_is_not_suspended():
    ftj = load("FineTuneJob")
    del ftj["spec"]["queueName"]
    ftj["metadata"]["uid"] = "0b8f6c1e-5f0a-4d53-9d8e-2f4a1c9e7b21"
    built = build_job(ftj, OperatorConfig.model_validate({"storage": {"uri": "s3://models/finetune"}}))
    assert not built["spec"]["suspend"]
    assert "kueue.x-k8s.io/queue-name" not in built["metadata"]["labels"]
