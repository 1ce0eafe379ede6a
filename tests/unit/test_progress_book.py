"""The report book and the wake-up of the reconcile: the endpoint buffers the newest report per
job and pokes the job's reconcile (the only status writer) at once for a checkpoint, phase or
evaluation change, otherwise once statusWriteIntervalSeconds have passed since the last write. A
report is never dropped, only coalesced: one that arrives during a reconcile re-runs it (the dirty
flag), and any reconcile (a Job's completion, a resync) writes the newest buffered report."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from finetune_operator.config import OperatorConfig
from finetune_operator.handlers import Controller
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.progress_server import (
    Authenticator,
    Entry,
    Identity,
    ProgressBook,
    ProgressService,
    RateLimiter,
    Verdict,
    write_wait,
)

KEY = ("ns", "j")
CKPT = {"uri": "s3://b/ns/j/checkpoints/step-00000004/", "step": 4, "time": "2025-03-01T12:00:00Z"}


def report(sequence: int, **fields: Any) -> dict[str, Any]:
    return {
        "sequence": sequence,
        "reportedAt": f"2025-03-01T12:00:{sequence:02d}Z",
        "step": sequence,
        **fields,
    }


WRITTEN = report(1, phase="training", checkpoint=CKPT, evalStep=0)
WAITS: dict[str, tuple[dict[str, Any], dict[str, Any] | None, float, float | None]] = {
    "never written": (WRITTEN, None, 0.0, 0.0),
    "already written": (WRITTEN, WRITTEN, 0.0, None),
    "a new checkpoint": (
        report(2, phase="training", checkpoint={**CKPT, "step": 8}, evalStep=0),
        WRITTEN,
        0.1,
        0.0,
    ),
    "a phase change": (report(2, phase="exporting", checkpoint=CKPT, evalStep=0), WRITTEN, 0.1, 0.0),
    "an evaluation": (report(2, phase="training", checkpoint=CKPT, evalStep=2), WRITTEN, 0.1, 0.0),
    "figures only, early": (report(2, phase="training", checkpoint=CKPT, evalStep=0), WRITTEN, 0.5, 1.5),
    "figures only, due": (report(2, phase="training", checkpoint=CKPT, evalStep=0), WRITTEN, 2.5, 0.0),
}


@pytest.mark.parametrize(("newest", "written", "elapsed", "wait"), WAITS.values(), ids=WAITS.keys())
def test_write_wait(
    newest: dict[str, Any], written: dict[str, Any] | None, elapsed: float, wait: float | None
) -> None:
    assert write_wait(Entry(newest, written, 100.0), 100.0 + elapsed, 2.0) == wait


def test_the_book_keeps_the_newest_and_marks_the_report_that_was_written() -> None:
    book = ProgressBook()
    assert book.offer(KEY, report(2))
    assert not book.offer(KEY, report(1)), "an older report (a late retry) replaces nothing"
    read = book.latest(KEY)
    assert read is not None
    assert book.offer(KEY, report(3))  # arrives while the write of `read` is in flight
    book.mark_written(KEY, read, time.monotonic())
    assert book.wait(KEY, time.monotonic(), 0.0) == 0.0, "the newer report is still to be written"
    book.forget(KEY)
    assert book.latest(KEY) is None and book.wait(KEY, 0.0, 0.0) is None


class Reconciles(Controller):
    """The real queue (poke, the dirty flag, the slots) around a reconcile that does what the real
    one does with the book: read the newest report, write it (here: record it; the first write
    waits for `gate`, a status write in flight), mark it written."""

    def __init__(self, book: ProgressBook) -> None:
        super().__init__(OperatorConfig(), None, OperatorMetrics(), book)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.wrote: list[int] = []

    async def reconcile(self, key: tuple[str, str]) -> None:
        read = self.book.latest(key)
        assert read is not None
        if not self.wrote:
            await self.gate.wait()
        self.wrote.append(read["sequence"])
        self._applied(key, read)


def endpoint(book: ProgressBook, controller: Controller, interval: float) -> ProgressService:
    """The endpoint's buffering and wake-up (authentication is test_progress_auth's)."""
    return ProgressService(
        None,  # type: ignore[arg-type]
        OperatorMetrics(),
        book,
        controller,
        interval=interval,
        storage_prefix=lambda _: "s3://b/ns/j/",
        limiter=None,  # type: ignore[arg-type]
    )


async def settle(controller: Controller) -> None:
    while controller._tasks:
        await asyncio.gather(*controller._tasks)


def test_a_report_arriving_during_a_reconcile_is_written_by_a_second_run() -> None:
    async def scenario() -> list[int]:
        book = ProgressBook()
        controller = Reconciles(book)
        service = endpoint(book, controller, 60.0)
        book.offer(KEY, report(1))
        service.wake(KEY)  # never written: at once
        await asyncio.sleep(0.01)  # the reconcile has read report 1 and is writing it
        book.offer(KEY, report(2, samples=[{"prompt": "p", "before": "a", "after": "b"}]))
        controller.poke(KEY)  # what any wake-up does now: the key is running, so it is marked dirty
        controller.gate.set()
        await settle(controller)
        assert book.wait(KEY, time.monotonic(), 60.0) is None, "status has the newest report"
        return controller.wrote

    assert asyncio.run(scenario()) == [1, 2]


def test_a_throttled_report_is_written_once_the_interval_has_passed() -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        book = ProgressBook()
        controller = Reconciles(book)
        controller.gate.set()
        service = endpoint(book, controller, 0.3)
        book.offer(KEY, report(1))
        service.wake(KEY)
        await settle(controller)
        book.offer(KEY, report(2))  # figures only, just after a write: held back
        service.wake(KEY)
        book.offer(KEY, report(3))
        service.wake(KEY)  # one timer per job, not one per report
        await asyncio.sleep(0.1)
        early = list(controller.wrote)
        await asyncio.sleep(0.4)
        await settle(controller)
        return early, controller.wrote

    early, wrote = asyncio.run(scenario())
    assert early == [1]
    assert wrote == [1, 3], "coalesced to the newest, written once"


def test_a_held_back_report_goes_out_with_the_next_reconcile_whatever_woke_it() -> None:
    """The trainer's last report (with the samples) can arrive just before its pod ends: the Job's
    completion wakes the reconcile, which writes it; the timer then finds nothing left to write."""

    async def scenario() -> list[int]:
        book = ProgressBook()
        controller = Reconciles(book)
        controller.gate.set()
        service = endpoint(book, controller, 0.2)
        book.offer(KEY, report(1))
        service.wake(KEY)
        await settle(controller)
        book.offer(KEY, report(2, samples=[{"prompt": "p", "before": "a", "after": "b"}]))
        service.wake(KEY)  # held back by the interval
        controller.poke(KEY)  # the Job completed (a watch event)
        await settle(controller)
        await asyncio.sleep(0.3)  # the timer fires: status already shows report 2
        await settle(controller)
        return controller.wrote

    assert asyncio.run(scenario()) == [1, 2]


POD = {
    "metadata": {
        "name": "j-abcde",
        "namespace": "ns",
        "uid": "pod-uid",
        "ownerReferences": [{"kind": "Job", "name": "j", "uid": "job-uid", "controller": True}],
    },
    "status": {"phase": "Running"},
}
FTJ = {"metadata": {"name": "j", "namespace": "ns", "uid": "ftj-uid"}, "status": {"phase": "Running"}}
JOB = {"metadata": {"name": "j", "namespace": "ns", "uid": "job-uid"}}


class Standby(Reconciles):
    """What a replica without the Lease knows of the job (it reads them from the API)."""

    async def pod_lookup(self, namespace: str, name: str) -> dict[str, Any] | None:
        return POD if (namespace, name) == ("ns", "j-abcde") else None

    async def job_lookup(self, namespace: str, name: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        return (FTJ, JOB) if (namespace, name) == KEY else None


def test_a_standby_checks_and_keeps_a_report_but_answers_503() -> None:
    """A standby does not reconcile: 503, so the trainer sends again and a live leader writes it.
    It still checks the report like the leader and keeps it: when the leader has died (the e2e
    kills one as a trainer finishes), the standby takes over and its first reconcile writes the
    trainer's last report. A report it refuses is kept nowhere."""

    async def scenario() -> None:
        book = ProgressBook()
        metrics = OperatorMetrics()
        auth = Authenticator(None, "finetune-operator")  # type: ignore[arg-type]
        who = Identity("ns", "j-abcde", "pod-uid")
        auth._remember(hashlib.sha256(b"t").hexdigest(), Verdict(who, time.monotonic() + 60))
        controller = Standby(book)
        service = ProgressService(
            auth,
            metrics,
            book,
            controller,
            interval=1.0,
            storage_prefix=lambda _: "s3://b/ns/j/",
            limiter=RateLimiter(100.0, 100.0),
            leading=lambda: False,
        )
        url = "/v1/namespaces/ns/finetunejobs/j/progress"
        async with TestClient(TestServer(service.app())) as client:
            answer = await client.post(url, json=report(1), headers={"Authorization": "Bearer t"})
            assert answer.status == 503 and answer.headers.get("Retry-After") == "1"
            assert "standby" in (await answer.json())["error"]
            kept = book.latest(KEY)
            assert kept is not None and (kept["sequence"], kept["step"]) == (1, 1)
            assert not controller._tasks, "a standby wakes no reconcile"
            bad = await client.post(url, json=report(2, loss="x"), headers={"Authorization": "Bearer t"})
            assert bad.status == 400 and book.latest(KEY) is kept
        counted = metrics.registry.get_sample_value(
            "finetune_operator_progress_reports_total", {"result": "standby"}
        )
        assert counted == 1

    asyncio.run(scenario())
