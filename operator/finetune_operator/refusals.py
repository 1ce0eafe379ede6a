"""What the API server refuses, said in terms of the FineTuneJob: pure functions, no API calls.

Two kinds of refusal reach the operator after a FineTuneJob was accepted:
- the Job create itself is refused (422 Invalid: a field the CRD schema could not check, a pod
  template annotation over 256 KiB; 403: a quota on Jobs, an admission policy). `job_refusal` maps
  the Job's field paths in the API server's Status back to the spec field the user wrote.
- the Job exists but its controller cannot create a pod (a PriorityClass or ServiceAccount that
  does not exist, a quota on pods or GPUs): the Job controller says so only in `FailedCreate`
  Events. `pod_create_failure` turns the newest such Event into a reason and a message naming the
  spec field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MESSAGE_LIMIT = 1024

_POD = "spec.template.spec."
_CONTAINER = re.compile(r"^spec\.template\.spec\.containers\[0\]\.(.*)$")
JOB_FIELDS: tuple[tuple[str, str], ...] = (
    (_POD + "nodeSelector", "spec.nodeSelector"),
    (_POD + "tolerations", "spec.tolerations"),
    (_POD + "priorityClassName", "spec.priorityClassName"),
    (_POD + "serviceAccountName", "spec.serviceAccountName"),
    (_POD + "containers[0].image", "spec.image"),
    (_POD + "containers[0].resources.limits", "spec.resources"),
    (_POD + "containers[0].resources.requests", "spec.resources"),
    (_POD + "containers[0].resources", "spec.resources"),
    ("spec.template.metadata.annotations", "spec (the whole manifest, passed to the pod as an annotation)"),
    ("spec.activeDeadlineSeconds", "spec.activeDeadlineSeconds"),
    ("spec.backoffLimit", "spec.backoffLimit"),
    ("metadata.labels", "spec.queueName"),
    ("metadata.name", "metadata.name"),
)
"""Job field path prefix -> the FineTuneJob field it is built from (jobbuilder.build_job)."""


@dataclass(frozen=True)
class Refusal:
    field: str
    message: str
    permanent: bool
    """True when creating the same Job again cannot succeed (422: the Job is invalid)."""


def spec_field(job_field: str) -> str | None:
    """The FineTuneJob field a Job field path comes from, keeping what follows the prefix
    (`spec.template.spec.tolerations[0].value` -> `spec.tolerations[0].value`)."""
    for prefix, ours in JOB_FIELDS:
        if job_field == prefix or job_field.startswith(prefix + ".") or job_field.startswith(prefix + "["):
            rest = job_field[len(prefix) :]
            if ours.startswith("spec (") or ours == "spec.resources":
                return ours
            return ours + rest
    return None


def job_refusal(status: int, body: dict[str, Any]) -> Refusal:
    """The Job create refused with HTTP `status` and the API server's Status `body`, as the spec
    field to fix and the API server's own words."""
    causes = [c for c in (body.get("details") or {}).get("causes") or [] if isinstance(c, dict)]
    message = str(body.get("message") or f"HTTP {status}")
    for cause in causes:
        field = spec_field(str(cause.get("field") or ""))
        if field is not None:
            text = f"{cause.get('message') or message} (the Job field {cause.get('field')})"
            return Refusal(field, _cut(f"the API server refused the training Job: {text}"), status == 422)
    field = "spec"
    if "exceeded quota" in message:
        field = "metadata.namespace"
    elif causes:
        raw = str(causes[0].get("field") or "")
        field = spec_field(raw) or f"spec (the Job field {raw})"
    return Refusal(field, _cut(f"the API server refused the training Job: {message}"), status == 422)


@dataclass(frozen=True)
class PodCreateFailure:
    reason: str
    message: str
    field: str
    since: str | None = None
    """When the Job controller first failed so (the oldest FailedCreate Event's firstTimestamp)."""


_FAILURES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"no PriorityClass with name", re.I), "PriorityClassNotFound", "spec.priorityClassName"),
    (
        re.compile(r"serviceaccount .* not found|error looking up service account", re.I),
        "ServiceAccountNotFound",
        "spec.serviceAccountName",
    ),
    (re.compile(r"exceeded quota|forbidden: failed quota", re.I), "QuotaExceeded", "spec.resources"),
    (
        re.compile(r"LimitRange|maximum .* usage per|minimum .* usage per", re.I),
        "LimitRangeRefused",
        "spec.resources",
    ),
)


def pod_create_failure(events: list[dict[str, Any]]) -> PodCreateFailure | None:
    """The newest FailedCreate Event of a Job as (reason, message, spec field); None when there is
    none. An Event kind this does not know still shows, attributed to the pod template."""
    failed = [e for e in events if e.get("reason") == "FailedCreate"]
    if not failed:
        return None
    newest = max(failed, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    since = min(str(e.get("firstTimestamp") or e.get("eventTime") or "") for e in failed) or None
    text = str(newest.get("message") or "")
    for pattern, reason, field in _FAILURES:
        if pattern.search(text):
            return PodCreateFailure(reason, _cut(text), field, since)
    return PodCreateFailure("PodCreateFailed", _cut(text), "spec", since)


def _cut(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."
