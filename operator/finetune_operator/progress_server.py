"""Progress reports from training pods, without giving the pods any Kubernetes API access.

The trainer POSTs its progress JSON to `/v1/namespaces/{ns}/finetunejobs/{name}/progress` with a
projected ServiceAccount token (audience `finetune-operator`, short-lived, renewed by the kubelet).
The operator checks it with the TokenReview API and accepts the report only if the token was
issued for a pod, in that namespace, that belongs to that FineTuneJob's Job. Verdicts are cached
per token for a minute, so a steady stream of reports costs no API calls.

Reports are buffered (`ProgressBook`) and written to status at most every
`statusWriteIntervalSeconds` per job, at once when the checkpoint or the trainer's phase changes.
Every replica accepts reports (the Service spreads them); writes are conditional on the
resourceVersion they were computed from and never replace a newer report (status.py), so two
replicas cannot undo each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from finetune_trainer.contract import ReportError, parse_report

from finetune_operator import events
from finetune_operator.kube import ApiError, ConflictError, Kube, NotFoundError
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.naming import LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY, job_name, short_name
from finetune_operator.status import is_newer_report, parse_time, progress_patch

log = logging.getLogger(__name__)

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
VERDICT_TTL_SECONDS = 60.0
MAX_BODY_BYTES = 64 * 1024
MESSAGE_LIMIT = 512
REFUSALS_LOGGED = 10_000
"""(job, field) pairs whose refusal was logged (bounded; beyond it refusals are only counted)."""

Key = tuple[str, str]


@dataclass
class Entry:
    """The newest report of one job and what has been written of it."""

    report: dict[str, Any]
    written: dict[str, Any] | None = None
    written_at: float = 0.0


def write_due(entry: Entry, now: float, interval: float) -> bool:
    """Whether the buffered report should be written now: a checkpoint or phase change at once,
    anything else once `interval` has passed since the last write."""
    report, written = entry.report, entry.written
    if written is report:
        return False
    if written is None:
        return True
    if (report.get("checkpoint") or {}).get("step") != (written.get("checkpoint") or {}).get("step"):
        return True
    if report.get("phase") != written.get("phase"):
        return True
    if report.get("evalStep") != written.get("evalStep"):
        return True  # an evaluation: rare, and what a person watching the job waits for
    return now - entry.written_at >= interval


def newer(report: dict[str, Any], than: dict[str, Any]) -> bool:
    """Order of two reports: by reportedAt, then by sequence."""
    a, b = parse_time(report.get("reportedAt")), parse_time(than.get("reportedAt"))
    if a is None or b is None or a == b:
        return int(report.get("sequence") or 0) > int(than.get("sequence") or 0)
    return a > b


class ProgressBook:
    """Latest report per job, in memory."""

    def __init__(self) -> None:
        self.entries: dict[Key, Entry] = {}

    def offer(self, key: Key, report: dict[str, Any]) -> bool:
        """Keep `report` if it is newer than the buffered one; False when it is stale."""
        entry = self.entries.get(key)
        if entry is not None and not newer(report, entry.report):
            return False
        if entry is None:
            self.entries[key] = Entry(report)
        else:
            entry.report = report
        return True

    def latest(self, key: Key) -> dict[str, Any] | None:
        entry = self.entries.get(key)
        return entry.report if entry else None

    def due(self, now: float, interval: float) -> list[Key]:
        return [k for k, e in self.entries.items() if write_due(e, now, interval)]

    def mark_written(self, key: Key, report: dict[str, Any], now: float) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            entry.written, entry.written_at = report, now

    def forget(self, key: Key) -> None:
        self.entries.pop(key, None)


@dataclass
class Verdict:
    namespace: str
    pod: str
    expires: float


@dataclass
class Authenticator:
    """TokenReview plus the pod-belongs-to-job check, with a short verdict cache."""

    kube: Kube
    audience: str
    clock: Callable[[], float] = time.monotonic
    _cache: dict[str, Verdict] = field(default_factory=dict)

    async def pod_for(self, token: str) -> tuple[str, str] | None:
        """(namespace, pod name) the token was issued for, or None when it is not valid for us."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(digest)
        now = self.clock()
        if cached and cached.expires > now:
            return cached.namespace, cached.pod
        review = await self.kube.token_review(token, self.audience)
        if not review.get("authenticated") or self.audience not in (
            review.get("audiences") or [self.audience]
        ):
            return None
        user = review.get("user") or {}
        parts = str(user.get("username", "")).split(":")
        pods = (user.get("extra") or {}).get(POD_NAME_EXTRA) or []
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or len(pods) != 1:
            return None
        if len(self._cache) > 10_000:
            self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
        self._cache[digest] = Verdict(parts[2], pods[0], now + VERDICT_TTL_SECONDS)
        return parts[2], pods[0]


def pod_belongs(pod: dict[str, Any], namespace: str, name: str) -> bool:
    """Whether `pod` is a training pod of the FineTuneJob `namespace/name`."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    owners = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    return (
        meta.get("namespace") == namespace
        and labels.get(LABEL_MANAGED_BY) == MANAGED_BY
        and labels.get(LABEL_JOB) == short_name(name)
        and any(r.get("kind") == "Job" and r.get("name") == job_name(name) for r in owners)
    )


class ProgressService:
    """The HTTP endpoint and the writer loop."""

    def __init__(
        self,
        kube: Kube,
        authenticator: Authenticator,
        metrics: OperatorMetrics,
        interval: float,
        pod_lookup: Callable[[str, str], Awaitable[dict[str, Any] | None]],
    ) -> None:
        self.kube = kube
        self.auth = authenticator
        self.metrics = metrics
        self.interval = interval
        self.pod_lookup = pod_lookup
        self.book = ProgressBook()
        self._objects: dict[Key, dict[str, Any]] = {}
        self._written: dict[Key, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals_logged: set[tuple[Key, str]] = set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/namespaces/{namespace}/finetunejobs/{name}/progress", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return self._reject("unauthorized", 401, "a bearer token is required")
        who = await self.auth.pod_for(header.removeprefix("Bearer ").strip())
        if who is None or who[0] != namespace:
            return self._reject("unauthorized", 401, "the token is not valid for this job")
        pod = await self.pod_lookup(namespace, who[1])
        if pod is None or not pod_belongs(pod, namespace, name):
            return self._reject("unauthorized", 403, "the token's pod does not belong to this job")
        key = (namespace, name)
        report = self.read_report(key, await request.read())
        if isinstance(report, web.Response):
            return report
        if not self.book.offer(key, report):
            self.metrics.progress_reports.labels("stale").inc()
            return web.json_response({"accepted": False, "reason": "stale"}, status=200)
        self.metrics.progress_reports.labels("accepted").inc()
        self._wake.set()
        return web.json_response({"accepted": True}, status=202)

    def read_report(self, key: Key, body: bytes) -> dict[str, Any] | web.Response:
        """The report in `body` as the contract's plain dict, or a 400 naming the first field that
        breaks the contract (contract.ProgressReport). A refused report touches nothing: not the
        buffer, not status. Logged once per job and field: a trainer that keeps sending the same
        bad report every few seconds does not flood the log (the refusal metric counts them all)."""
        try:
            return parse_report(body, datetime.now(UTC)).wire()
        except ReportError as e:
            if (key, e.field) not in self._refusals_logged and len(self._refusals_logged) < REFUSALS_LOGGED:
                self._refusals_logged.add((key, e.field))
                log.warning(
                    "progress report refused: %s",
                    str(e)[:MESSAGE_LIMIT],
                    extra={"fields": {"namespace": key[0], "name": key[1], "field": e.field}},
                )
            return self._reject("invalid", 400, str(e)[:MESSAGE_LIMIT], field=e.field)

    def _reject(self, result: str, status: int, message: str, field: str | None = None) -> web.Response:
        self.metrics.progress_reports.labels(result).inc()
        return web.json_response({"error": message, **({"field": field} if field else {})}, status=status)

    async def run_writer(self) -> None:
        """Write due reports to status, forever."""
        while True:
            for key in self.book.due(time.monotonic(), self.interval):
                try:
                    await self.write(key)
                except Exception:
                    log.exception(
                        "progress write failed", extra={"fields": {"namespace": key[0], "name": key[1]}}
                    )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    async def write(self, key: Key) -> None:
        """Write the buffered report of `key` if status does not already show a newer one."""
        report = self.book.latest(key)
        if report is None:
            return
        for _ in range(3):
            obj = self._objects.get(key)
            if obj is None:
                try:
                    obj = await self.kube.get_ftj(*key)
                except NotFoundError:
                    self.forget(key)
                    return
            status = obj.get("status") or {}
            patch = progress_patch(status, report, datetime.now(UTC))
            if not patch:
                self.book.mark_written(key, report, time.monotonic())
                return
            try:
                new = await self.kube.patch_ftj_status(*key, patch, obj["metadata"]["resourceVersion"])
                new["metadata"].pop("managedFields", None)  # kept per job: only what writes need
                self._objects[key] = new
                self._written[key] = new["metadata"]
            except ConflictError:
                self._objects.pop(key, None)
                continue
            except NotFoundError:
                self.forget(key)
                return
            except ApiError as e:
                if e.status != 422:
                    raise
                # The API server's schema refuses what the contract let through (they drifted):
                # drop this report rather than retry it every second; the next one may pass.
                self.book.mark_written(key, report, time.monotonic())
                log.warning(
                    "progress write refused by the API server, report dropped: %s",
                    str(e)[:MESSAGE_LIMIT],
                    extra={"fields": {"namespace": key[0], "name": key[1]}},
                )
                return
            self.book.mark_written(key, report, time.monotonic())
            self.observe_checkpoint(key, status, patch)
            self.announce(new, status, patch)
            return

    def observe_checkpoint(self, key: Key, old_status: dict[str, Any], patch: dict[str, Any]) -> None:
        """Count a checkpoint that a status write just recorded, with its upload time when the
        trainer reported one. Called for every status write (this writer's and the reconcile's,
        which carries the same report), so a checkpoint is counted whichever wrote it first."""
        new = patch.get("checkpoint")
        if not new or new.get("step") == (old_status.get("checkpoint") or {}).get("step"):
            return
        self.metrics.checkpoints.inc()
        ckpt = (self.book.latest(key) or {}).get("checkpoint") or {}
        if ckpt.get("step") == new.get("step") and isinstance(ckpt.get("uploadSeconds"), int | float):
            self.metrics.checkpoint_duration.observe(ckpt["uploadSeconds"])

    def announce(self, obj: dict[str, Any], old_status: dict[str, Any], patch: dict[str, Any]) -> None:
        """Post the Events a status write calls for about the eval loss (events.evaluation_events).
        Called for every status write, this writer's and the reconcile's, like observe_checkpoint."""
        for event in events.evaluation_events(obj, old_status, patch, datetime.now(UTC)):
            task = asyncio.get_running_loop().create_task(events.post(self.kube, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def wrote(self, key: Key) -> str | None:
        """resourceVersion of the object as this service's last status write left it."""
        return (self._written.get(key) or {}).get("resourceVersion")

    def note_status(self, key: Key, obj: dict[str, Any]) -> None:
        """A newer object seen elsewhere (watch, another write): use it as the base of the next write."""
        self._objects[key] = obj
        report = self.book.latest(key)
        progress = (obj.get("status") or {}).get("progress")
        if report is not None and not is_newer_report(report, progress, datetime.now(UTC)):
            self.book.mark_written(key, report, time.monotonic())

    def forget(self, key: Key) -> None:
        self.book.forget(key)
        self._refusals_logged = {k for k in self._refusals_logged if k[0] != key}
        self._objects.pop(key, None)
        self._written.pop(key, None)
