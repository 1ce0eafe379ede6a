"""Who may report progress (progress_server.source_refusal, review_identity), what a report may point
at (uri_refusal), and the per-source budget (RateLimiter): the decisions, table-driven. The same
attacks against the real API server and operator: tests/faults/test_attacks.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from finetune_operator.progress_server import (
    POD_NAME_EXTRA,
    POD_UID_EXTRA,
    Authenticator,
    Identity,
    RateLimiter,
    review_identity,
    source_refusal,
    uri_refusal,
)

WHO = Identity("team-a", "victim-abcde", "pod-uid")
JOB = {"metadata": {"name": "victim", "uid": "job-uid"}}
FTJ = {"metadata": {"name": "victim", "uid": "ftj-uid"}, "status": {"phase": "Running"}}


def pod(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "metadata": {
            "name": "victim-abcde",
            "namespace": "team-a",
            "uid": "pod-uid",
            "ownerReferences": [{"kind": "Job", "name": "victim", "uid": "job-uid", "controller": True}],
        },
        "status": {"phase": "Running"},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        base[section][field] = value
    return base


def test_the_live_pod_of_the_current_job_may_report() -> None:
    assert source_refusal(WHO, "team-a", pod(), FTJ, JOB) is None
    terminating = pod(metadata__deletionTimestamp="2026-01-01T00:00:00Z")
    assert source_refusal(WHO, "team-a", terminating, FTJ, JOB) is None, "its SIGTERM checkpoint must count"


REFUSED: dict[str, tuple[Any, ...]] = {
    "another namespace's token": (Identity("team-b", "x", "pod-uid"), pod(), FTJ, JOB, "another namespace"),
    "a job without a Job": (WHO, pod(), FTJ, None, "no current Job"),
    "a Succeeded job": (WHO, pod(), {**FTJ, "status": {"phase": "Succeeded"}}, JOB, "finished"),
    "a Failed job": (WHO, pod(), {**FTJ, "status": {"phase": "Failed"}}, JOB, "finished"),
    "the pod is gone": (WHO, None, FTJ, JOB, "does not exist"),
    "a namesake pod (earlier uid)": (WHO, pod(metadata__uid="other-uid"), FTJ, JOB, "does not exist"),
    "owner with a fake uid": (
        WHO,
        pod(metadata__ownerReferences=[{"kind": "Job", "name": "victim", "uid": "fake", "controller": True}]),
        FTJ,
        JOB,
        "does not belong",
    ),
    "owner not the controller": (
        WHO,
        pod(metadata__ownerReferences=[{"kind": "Job", "name": "victim", "uid": "job-uid"}]),
        FTJ,
        JOB,
        "does not belong",
    ),
    "no owner": (WHO, pod(metadata__ownerReferences=[]), FTJ, JOB, "does not belong"),
    "a Succeeded pod": (WHO, pod(status__phase="Succeeded"), FTJ, JOB, "pod has finished"),
    "a Failed (preempted) pod": (WHO, pod(status__phase="Failed"), FTJ, JOB, "pod has finished"),
}


@pytest.mark.parametrize(("who", "the_pod", "ftj", "job", "says"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_sources(who: Identity, the_pod: Any, ftj: Any, job: Any, says: str) -> None:
    why = source_refusal(who, "team-a", the_pod, ftj, job)
    assert why is not None and says in why


def review(**user: Any) -> dict[str, Any]:
    base = {
        "username": "system:serviceaccount:team-a:default",
        "extra": {POD_NAME_EXTRA: ["victim-abcde"], POD_UID_EXTRA: ["pod-uid"]},
    }
    return {"authenticated": True, "audiences": ["finetune-operator"], "user": {**base, **user}}


def test_review_identity() -> None:
    assert review_identity(review(), "finetune-operator") == WHO
    assert review_identity({**review(), "authenticated": False}, "finetune-operator") is None
    assert review_identity({**review(), "audiences": ["other"]}, "finetune-operator") is None
    assert review_identity(review(extra={}), "finetune-operator") is None, "a token bound to no pod"
    assert review_identity(review(extra={POD_NAME_EXTRA: ["p"]}), "finetune-operator") is None
    assert review_identity(review(username="alice"), "finetune-operator") is None


PREFIX = "s3://b/jobs/team-a/victim"
OWN = f"{PREFIX}/checkpoints/step-00000005/"
FOREIGN = "s3://b/jobs/team-b/secret/checkpoints/step-00000005/"


@pytest.mark.parametrize(
    ("report", "refused"),
    [
        ({"checkpoint": {"uri": OWN}}, None),
        ({"checkpoints": [{"uri": OWN}], "bestCheckpoint": {"uri": OWN}}, None),
        ({"step": 3}, None),
        ({"checkpoint": {"uri": FOREIGN}}, "checkpoint.uri"),
        ({"checkpoints": [{"uri": OWN}, {"uri": FOREIGN}]}, "checkpoints[1].uri"),
        ({"bestCheckpoint": {"uri": FOREIGN}}, "bestCheckpoint.uri"),
        ({"checkpoint": {"uri": f"{PREFIX}-other/x/"}}, "checkpoint.uri"),
        ({"checkpoint": {"uri": f"{PREFIX}/../../team-b/secret/"}}, "checkpoint.uri"),
        ({"checkpoint": {"uri": 5}}, "checkpoint.uri"),
    ],
)
def test_uris_only_under_the_jobs_prefix(report: dict[str, Any], refused: str | None) -> None:
    why = uri_refusal(report, PREFIX)
    assert (why.split(" ")[0] if why else None) == refused


def test_rate_limiter_per_source() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=10, burst=5, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("b"), "another source has its own budget"
    now[0] += 0.1
    assert limiter.allow("a") and not limiter.allow("a")


class CountingReviews:
    """Stands in for the API server's TokenReview only to count calls (the real one: test_attacks)."""

    def __init__(self) -> None:
        self.calls = 0

    async def token_review(self, token: str, audience: str) -> dict[str, Any]:
        self.calls += 1
        return review() if token == "good" else {"authenticated": False}


def test_verdicts_cached_both_ways() -> None:
    kube = CountingReviews()
    now = [0.0]
    auth = Authenticator(kube, "finetune-operator", clock=lambda: now[0])  # type: ignore[arg-type]

    async def run() -> None:
        assert await auth.identity("good") == WHO
        assert await auth.identity("good") == WHO
        assert await auth.identity("bad") is None
        assert await auth.identity("bad") is None
        assert kube.calls == 2
        now[0] += 120  # the positive verdict (60 s) expired, the negative one (300 s) not
        await auth.identity("good")
        await auth.identity("bad")
        assert kube.calls == 3

    asyncio.run(run())
