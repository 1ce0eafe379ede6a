"""Names and labels derived from a FineTuneJob, deterministic so that every operator replica and
every restart computes the same Job name (the API server's 409 then prevents a second Job)."""

from __future__ import annotations

import hashlib
from typing import Any

from finetune_operator.api import API_GROUP, API_VERSION, KIND

MAX_LABEL_VALUE = 63
"""Job names end up in the `batch.kubernetes.io/job-name` label, so they obey label limits too."""

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = f"{API_GROUP}/job"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"
ANNOTATION_JOB_MANIFEST = f"{API_GROUP}/job"
"""Pod-template annotation carrying the job manifest the trainer reads (via a downward-API file)."""

APP_NAME = "finetune-trainer"
MANAGED_BY = "finetune-operator"

SELECTOR = {LABEL_MANAGED_BY: MANAGED_BY}
"""What the operator's Job and Pod watches select on."""


def short_name(name: str, limit: int = MAX_LABEL_VALUE) -> str:
    """`name` if it fits `limit`, else a prefix and a 10-hex-digit hash of the whole name (stable,
    and two long names that share a prefix still differ)."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: limit - 11].rstrip('-.')}-{digest}"


def job_name(ftj_name: str) -> str:
    """Name of the batch/v1 Job running the FineTuneJob `ftj_name`."""
    return short_name(ftj_name)


def job_labels(ftj_name: str) -> dict[str, str]:
    """Labels on the Job and its pods."""
    return {LABEL_NAME: APP_NAME, LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB: short_name(ftj_name)}


def owner_reference(ftj: dict[str, Any]) -> dict[str, Any]:
    """Controller reference: deleting the FineTuneJob garbage-collects what it owns (its Job and
    pods, its credentials Secret)."""
    meta = ftj["metadata"]
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
