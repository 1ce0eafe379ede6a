"""Pods on kwok's fake nodes, ended by hand.

With `MANUAL_POD_STAGES` as the control plane's `kwok_stages`, kwok only makes a scheduled pod
Running (and removes deleted pods); it never completes one. A test or benchmark then reports each
pod's end itself, through the pods/status subresource, exactly as a kubelet would: completed with
exit code 0, failed with an exit code and a termination message, or preempted (a DisruptionTarget
condition, then Failed). The Job controller and the operator react to these as to any kubelet's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .rest import STRATEGIC, Rest

MANUAL_POD_STAGES = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.podIP'
      operator: 'DoesNotExist'
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: ContainersReady
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName false .metadata.uid .metadata.name .metadata.namespace | Quote }}
      phase: Running
      startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'Exists'
  next:
    finalizers:
      empty: true
    delete: true
"""
"""kwok pod stages: Running once scheduled, gone once deleted; nothing else happens by itself."""

KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
"""What a pod needs to land on a kwok node (they carry this taint so that nothing lands by mistake)."""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _started(pod: dict[str, Any], container: str) -> str:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == container:
            running = (cs.get("state") or {}).get("running") or {}
            return running.get("startedAt") or now()
    return now()


def _terminated_status(
    pod: dict[str, Any], phase: str, exit_code: int, reason: str, message: str = ""
) -> dict[str, Any]:
    stamp = now()
    ready_reason = "PodCompleted" if phase == "Succeeded" else "PodFailed"
    statuses = []
    for c in pod["spec"]["containers"]:
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": _started(pod, c["name"]),
            "finishedAt": stamp,
        }
        if message:
            terminated["message"] = message
        statuses.append(
            {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        )
    return {
        "phase": phase,
        "conditions": [
            {"type": "Ready", "status": "False", "reason": ready_reason, "lastTransitionTime": stamp},
            {
                "type": "ContainersReady",
                "status": "False",
                "reason": ready_reason,
                "lastTransitionTime": stamp,
            },
        ],
        "containerStatuses": statuses,
    }


def _patch(rest: Rest, pod: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    meta = pod["metadata"]
    return rest.request(
        "PATCH",
        f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
        {"metadata": {"uid": meta["uid"]}, "status": status},
        content_type=STRATEGIC,
    )


def complete(rest: Rest, pod: dict[str, Any], message: str = "") -> dict[str, Any]:
    """Every container exited 0 (`message`: the termination message, e.g. the trainer's summary)."""
    return _patch(rest, pod, _terminated_status(pod, "Succeeded", 0, "Completed", message))


def fail(rest: Rest, pod: dict[str, Any], exit_code: int, message: str = "") -> dict[str, Any]:
    """Every container exited with `exit_code` (78: the trainer's config error)."""
    return _patch(rest, pod, _terminated_status(pod, "Failed", exit_code, "Error", message))


def preempt(rest: Rest, pod: dict[str, Any], reason: str = "PreemptionByScheduler") -> dict[str, Any]:
    """Preempted: a DisruptionTarget condition, the container killed (137), the pod Failed. The
    operator's Job ignores such failures (podFailurePolicy) and starts a replacement pod."""
    status = _terminated_status(pod, "Failed", 137, "Error")
    status["conditions"].append(
        {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": reason,
            "message": "preempted by a higher-priority pod (localkube)",
            "lastTransitionTime": now(),
        }
    )
    return _patch(rest, pod, status)
