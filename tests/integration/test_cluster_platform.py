"""The rest of what the operator relies on: ServiceAccount tokens (TokenRequest, TokenReview), the
kwok GPU nodes, the version the binaries report, and S3 over HTTP with its credentials Secret."""

from __future__ import annotations

import base64
import json

import pytest
from kubernetes import client
from localkube import KUBE_VERSION, S3, Cluster

pytestmark = pytest.mark.cluster


def test_token_request_and_token_review(cluster: Cluster) -> None:
    ns = cluster.namespace
    cluster.kubectl("create", "serviceaccount", "trainer", "-n", ns)
    with cluster.api_client() as api:
        core, auth = client.CoreV1Api(api), client.AuthenticationV1Api(api)
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=["finetune-operator"], expiration_seconds=600)
        )
        token = core.create_namespaced_service_account_token("trainer", ns, request).status.token
        review = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=["finetune-operator"])
        )
        status = auth.create_token_review(review).status
        assert status.authenticated is True
        assert status.user.username == f"system:serviceaccount:{ns}:trainer"
        assert status.audiences == ["finetune-operator"]
        wrong = auth.create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=["someone-else"]))
        ).status
        assert not wrong.authenticated


def test_kwok_gpu_nodes_are_ready_and_advertise_gpus(cluster: Cluster) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert set(cluster.kwok_nodes) | {"local-gpu-0"} <= set(by_name)
    for name in [*cluster.kwok_nodes, "local-gpu-0"]:
        status = by_name[name]["status"]
        assert status["capacity"]["nvidia.com/gpu"] == "8"
        assert status["allocatable"]["nvidia.com/gpu"] == "8"
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True", (name, ready)


def test_gpu_pod_is_scheduled_onto_a_kwok_node(cluster: Cluster) -> None:
    ns = cluster.namespace
    cluster.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu", "namespace": ns},
        "spec": {
            "nodeSelector": {"type": "kwok"},
            "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "c", "image": "trainer",
                            "resources": {"limits": {"nvidia.com/gpu": "8"}}}],
        },
    })  # fmt: skip

    def running() -> dict | None:
        obj = cluster.get("pod", "gpu", ns)
        return obj if obj.get("status", {}).get("phase") == "Running" else None

    obj = cluster.wait("GPU pod Running on kwok", running, timeout=60)
    assert obj["spec"]["nodeName"] in cluster.kwok_nodes


def test_binaries_report_the_pinned_version(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["clientVersion"]["gitVersion"] == KUBE_VERSION
    assert version["serverVersion"]["gitVersion"] == KUBE_VERSION


def test_s3_put_and_get_over_http(s3: S3) -> None:
    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    s3c = s3.client()
    s3c.put_object(Bucket=s3.bucket, Key="jobs/ns/job/hello.txt", Body=b"hello")
    assert s3c.get_object(Bucket=s3.bucket, Key="jobs/ns/job/hello.txt")["Body"].read() == b"hello"


def test_s3_credentials_secret(cluster: Cluster, s3: S3) -> None:
    ns = cluster.namespace
    cluster.apply(s3.secret(ns))
    data = cluster.get("secret", "finetune-s3", ns)["data"]
    assert base64.b64decode(data["AWS_ACCESS_KEY_ID"]).decode() == s3.access_key
    assert base64.b64decode(data["AWS_SECRET_ACCESS_KEY"]).decode() == s3.secret_key
