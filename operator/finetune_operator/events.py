"""Kubernetes Events on FineTuneJobs, one per phase transition (`kubectl describe ftj` shows them)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from finetune_trainer.timestamps import rfc3339

from finetune_operator.api import API_GROUP, API_VERSION, KIND
from finetune_operator.kube import Kube

log = logging.getLogger(__name__)

COMPONENT = "finetune-operator"


def event(ftj: dict[str, Any], kind: str, reason: str, message: str, now: datetime) -> dict[str, Any]:
    """A core/v1 Event about `ftj` (`kind` Normal or Warning)."""
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
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def transition_event(
    ftj: dict[str, Any], moved: tuple[str | None, str], reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """A core/v1 Event for `ftj` moving from phase moved[0] to moved[1] (Warning for Failed)."""
    old, new = moved
    kind = "Warning" if new == "Failed" else "Normal"
    return event(ftj, kind, reason, f"{old or 'New'} -> {new}: {message}", now)


def evaluation_events(
    ftj: dict[str, Any], old_status: dict[str, Any], patch: dict[str, Any], now: datetime
) -> list[dict[str, Any]]:
    """Events for what a status patch says about the eval loss: EvalLossImproved when the best eval
    loss drops, EvalLossWorsening (Warning) when it has not improved for spec.evaluation.patience
    evaluations in a row. Judged on the patch against the status it was computed from, so each is
    posted once whichever writer (reconcile or progress) applied it."""
    old, new = old_status.get("progress") or {}, patch.get("progress") or {}
    out = []
    best, was = new.get("bestEvalLoss"), old.get("bestEvalLoss")
    if isinstance(best, int | float) and (not isinstance(was, int | float) or best < was):
        before = f" (was {was:.4f} at step {old.get('bestEvalStep')})" if isinstance(was, int | float) else ""
        out.append(
            event(
                ftj,
                "Normal",
                "EvalLossImproved",
                f"eval loss {best:.4f} at step {new.get('bestEvalStep')}, the best so far{before}",
                now,
            )
        )
    patience = int(((ftj.get("spec") or {}).get("evaluation") or {}).get("patience") or 3)
    since, since_was = new.get("evalsSinceBest"), old.get("evalsSinceBest")
    if (
        isinstance(since, int)
        and since >= patience
        and not (isinstance(since_was, int) and since_was >= patience)
    ):
        now_loss = new.get("evalLoss")
        shown = f"{now_loss:.4f}" if isinstance(now_loss, int | float) else "?"
        out.append(
            event(
                ftj,
                "Warning",
                "EvalLossWorsening",
                f"eval loss has not improved for {since} evaluations (best {new.get('bestEvalLoss')} at "
                f"step {new.get('bestEvalStep')}, now {shown} at step {new.get('evalStep')})",
                now,
            )
        )
    return out


def uris_dropped_event(
    ftj: dict[str, Any], dropped: list[tuple[str, str]], prefix: str, now: datetime
) -> dict[str, Any] | None:
    """A Warning naming each field of the trainer's summary that status left out because its URI
    is outside the job's storage prefix (status.final_outputs); None when there is none."""
    if not dropped:
        return None
    fields = ", ".join(f"{field} {uri[:200]!r}" for field, uri in dropped)
    return event(
        ftj,
        "Warning",
        "UriOutsideJobPrefix",
        f"left out of status: {fields}: not under the job's storage prefix {prefix}",
        now,
    )


async def post(kube: Kube, event: dict[str, Any]) -> None:
    """Post an event; failing to is logged, never fatal (events are best effort by design)."""
    try:
        await kube.create_event(event["metadata"]["namespace"], event)
    except Exception as e:
        log.warning("cannot post event: %s", e)
