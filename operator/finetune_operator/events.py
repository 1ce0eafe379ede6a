"""Kubernetes Events on FineTuneJobs, one per phase transition (`kubectl describe ftj` shows them)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from finetune_operator.api import API_GROUP, API_VERSION, KIND
from finetune_operator.kube import Kube
from finetune_operator.status import rfc3339

log = logging.getLogger(__name__)

COMPONENT = "finetune-operator"


def transition_event(
    ftj: dict[str, Any], moved: tuple[str | None, str], reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """A core/v1 Event for `ftj` moving from phase moved[0] to moved[1] (Warning for Failed)."""
    old, new = moved
    meta = ftj["metadata"]
    stamp = rfc3339(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name'][:200]}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": "Warning" if new == "Failed" else "Normal",
        "reason": reason,
        "message": f"{old or 'New'} -> {new}: {message}"[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


async def post(kube: Kube, event: dict[str, Any]) -> None:
    """Post an event; failing to is logged, never fatal (events are best effort by design)."""
    try:
        await kube.create_event(event["metadata"]["namespace"], event)
    except Exception as e:
        log.warning("cannot post event: %s", e)
