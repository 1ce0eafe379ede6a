"""The test kubelet behaves like a kubelet where the trainer can tell: what a container sees (env,
Secrets, ConfigMaps, volumes, a bound ServiceAccount token) and how it is stopped (SIGTERM, the
grace period, SIGKILL)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from localkube import LOCAL_LABEL, Cluster

pytestmark = pytest.mark.cluster


def pod(name: str, code: str, **spec: Any) -> dict[str, Any]:
    """A pod for the local node running `python -c code` with /out a hostPath of the test."""
    out = spec.pop("out")
    container = {"name": "main", "image": "python:3.11-slim", "command": ["python", "-c", code]}
    container |= spec.pop("container", {})
    container.setdefault("volumeMounts", []).append({"name": "out", "mountPath": "/out"})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {LOCAL_LABEL: "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "containers": [container],
            "volumes": [{"name": "out", "hostPath": {"path": str(out)}}, *spec.pop("volumes", [])],
            **spec,
        },
    }


def phase(cluster: Cluster, ns: str, name: str) -> str | None:
    return cluster.get("pod", name, ns).get("status", {}).get("phase")


def test_sigterm_then_grace_then_sigkill_on_deletion(cluster: Cluster, tmp_path: Path) -> None:
    # Notes SIGTERM, then keeps running: only SIGKILL ends it.
    code = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: open("/out/sigterm", "w").write(str(time.time())))
open("/out/pid", "w").write(str(os.getpid()))
while True:
    time.sleep(0.05)
"""
    ns = cluster.namespace
    manifest = pod("stubborn", code, out=tmp_path, terminationGracePeriodSeconds=3)
    manifest["metadata"]["namespace"] = ns
    cluster.apply(manifest)
    cluster.wait(
        "process started", lambda: (tmp_path / "pid").exists() and phase(cluster, ns, "stubborn") == "Running"
    )
    pid = int((tmp_path / "pid").read_text())

    start = time.time()
    cluster.kubectl("delete", "pod", "stubborn", "-n", ns, "--wait=false")
    gone = cluster.wait(
        "pod removed",
        lambda: (
            cluster.kubectl("get", "pod", "stubborn", "-n", ns, check=False).returncode != 0 and time.time()
        ),
        timeout=30,
    )
    cluster.wait("SIGTERM noted", (tmp_path / "sigterm").exists)
    sigterm = float((tmp_path / "sigterm").read_text())
    assert sigterm - start < 2, "SIGTERM came late"
    assert gone - start >= 3, "removed before the grace period was over"
    with pytest.raises(ProcessLookupError):  # SIGKILLed after the grace period
        os.kill(pid, 0)


def test_container_sees_env_secrets_configmaps_volumes_and_a_bound_token(
    cluster: Cluster, tmp_path: Path
) -> None:
    ns = cluster.namespace
    cluster.kubectl(
        "create", "secret", "generic", "creds", "-n", ns, "--from-literal=key=s3cr3t", "--from-literal=user=u"
    )
    cluster.kubectl(
        "create", "configmap", "settings", "-n", ns, "--from-literal=mode=fast", "--from-literal=lr=2e-4"
    )
    code = """
import json, os, pathlib
t = os.environ["TOKEN_DIR"]
json.dump({
    "env": {k: os.environ.get(k) for k in ("SECRET", "MODE", "CFG_lr", "user", "NS", "DERIVED", "LIMIT_MI")},
    "secret_file": open("/etc/creds/key").read(),
    "config_file": open("/etc/settings/mode").read(),
    "scratch": os.access("/scratch", os.W_OK),
    "token": open(t + "/token").read(),
    "ca": open(t + "/ca.crt").read().startswith("-----BEGIN CERTIFICATE-----"),
    "cwd": os.getcwd(),
    "mount_env": os.environ["LOCALKUBE_MOUNT_SCRATCH"] == "/scratch",
}, open("/out/seen.json", "w"))
"""
    container = {
        "workingDir": "/scratch",
        "env": [
            {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "DERIVED", "value": "$(MODE)-$(NS)"},
            {
                "name": "LIMIT_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            {"name": "TOKEN_DIR", "value": "/var/run/secrets/tokens"},
        ],
        "envFrom": [
            {"configMapRef": {"name": "settings"}, "prefix": "CFG_"},
            {"secretRef": {"name": "creds"}},
        ],
        "resources": {"limits": {"memory": "256Mi"}},
        "volumeMounts": [
            {"name": "creds", "mountPath": "/etc/creds"},
            {"name": "settings", "mountPath": "/etc/settings"},
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "token", "mountPath": "/var/run/secrets/tokens"},
        ],
    }
    volumes = [
        {"name": "creds", "secret": {"secretName": "creds"}},
        {"name": "settings", "configMap": {"name": "settings"}},
        {"name": "scratch", "emptyDir": {}},
        {
            "name": "token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": "finetune-operator",
                            "expirationSeconds": 600,
                            "path": "token",
                        }
                    },
                    {
                        "configMap": {
                            "name": "kube-root-ca.crt",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        }
                    },
                ]
            },
        },
    ]
    manifest = pod("sees", code, out=tmp_path, container=container, volumes=volumes)
    manifest["metadata"]["namespace"] = ns
    cluster.apply(manifest)
    cluster.wait("pod done", lambda: phase(cluster, ns, "sees") in ("Succeeded", "Failed"), timeout=60)
    assert phase(cluster, ns, "sees") == "Succeeded", cluster.kubelet.log_path(ns, "sees", "main").read_text()
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["env"] == {
        "SECRET": "s3cr3t", "MODE": "fast", "CFG_lr": "2e-4", "user": "u", "NS": ns, "DERIVED": f"fast-{ns}",
        "LIMIT_MI": "256",
    }  # fmt: skip
    assert seen["secret_file"] == "s3cr3t"
    assert seen["config_file"] == "fast"
    assert seen["scratch"] is True
    assert seen["ca"] is True
    assert seen["mount_env"] is True  # LOCALKUBE_MOUNT_SCRATCH names the directory /scratch became
    assert Path(seen["cwd"]).name == "scratch"

    # The projected token is a real one, bound to this pod, for the audience asked for.
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": seen["token"], "audiences": ["finetune-operator"]},
    }
    status = json.loads(cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout)[
        "status"
    ]
    assert status["authenticated"] is True
    assert status["user"]["username"] == f"system:serviceaccount:{ns}:default"
    assert status["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["sees"]
