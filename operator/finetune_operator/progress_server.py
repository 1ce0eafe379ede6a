"""Progress reports from training pods, without giving the pods any Kubernetes API access.

The trainer POSTs its progress JSON to `/v1/namespaces/{ns}/finetunejobs/{name}/progress` with a
projected ServiceAccount token (audience `finetune-operator`, short-lived, renewed by the kubelet).
The operator checks it with the TokenReview API and accepts the report only from the live pod of
the FineTuneJob's current Job (`source_refusal`): the token's pod uid is the pod's, whose controller
is, by uid, the Job the operator's own watch shows controlled by that FineTuneJob; finished pods and
finished jobs are refused. Verdicts are cached per token (good ones for a minute, bad ones for five),
and every source address has a request budget (`RateLimiter`) spent before any TokenReview, so
neither a steady stream of reports nor a flood of garbage tokens costs more than a few API calls.
A report's checkpoint URIs must lie under the job's own storage prefix (`uri_refusal`).

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

from finetune_operator import admission, events
from finetune_operator.kube import ApiError, ConflictError, Kube, NotFoundError
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.status import is_newer_report, parse_time, progress_patch

log = logging.getLogger(__name__)

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
VERDICT_TTL_SECONDS = 60.0
NEGATIVE_TTL_SECONDS = 300.0
"""A token refused once stays refused: a bound token only becomes invalid, never valid."""
MAX_CACHED_VERDICTS = 10_000
FINISHED_PHASES = ("Succeeded", "Failed")
FINISHED_POD_PHASES = ("Succeeded", "Failed")
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


@dataclass(frozen=True)
class Identity:
    """Whom a token was issued to: a pod (by name and uid) in a namespace."""

    namespace: str
    pod: str
    pod_uid: str


@dataclass
class Verdict:
    identity: Identity | None
    """None: the token is not valid for us (cached too, so a flood of bad tokens costs no reviews)."""
    expires: float


@dataclass
class Authenticator:
    """TokenReview, with a short cache of every verdict, good and bad, per token digest."""

    kube: Kube
    audience: str
    clock: Callable[[], float] = time.monotonic
    on_review: Callable[[], None] = lambda: None
    """Called for every TokenReview made (finetune_operator_token_reviews_total)."""
    _cache: dict[str, Verdict] = field(default_factory=dict)

    async def identity(self, token: str) -> Identity | None:
        """The pod the token was issued for, or None when it is not a pod-bound token for us."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(digest)
        now = self.clock()
        if cached and cached.expires > now:
            return cached.identity
        self.on_review()
        review = await self.kube.token_review(token, self.audience)
        found = review_identity(review, self.audience)
        self._remember(digest, Verdict(found, now + (VERDICT_TTL_SECONDS if found else NEGATIVE_TTL_SECONDS)))
        return found

    def _remember(self, digest: str, verdict: Verdict) -> None:
        if len(self._cache) >= MAX_CACHED_VERDICTS:
            now = self.clock()
            self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
            while len(self._cache) >= MAX_CACHED_VERDICTS:  # all still valid: drop the oldest
                self._cache.pop(next(iter(self._cache)))
        self._cache[digest] = verdict


def review_identity(review: dict[str, Any], audience: str) -> Identity | None:
    """The pod of a TokenReview's status: a ServiceAccount token bound to exactly one pod (the
    kubelet's projected tokens are; a token from the TokenRequest API without a bound pod is not),
    issued for `audience`."""
    if not review.get("authenticated") or audience not in (review.get("audiences") or [audience]):
        return None
    user = review.get("user") or {}
    parts = str(user.get("username", "")).split(":")
    extra = user.get("extra") or {}
    names, uids = extra.get(POD_NAME_EXTRA) or [], extra.get(POD_UID_EXTRA) or []
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or len(names) != 1 or len(uids) != 1:
        return None
    return Identity(parts[2], names[0], uids[0])


def source_refusal(
    who: Identity,
    namespace: str,
    pod: dict[str, Any] | None,
    ftj: dict[str, Any] | None,
    job: dict[str, Any] | None,
) -> str | None:
    """Why the pod `who` may not report for the FineTuneJob `ftj` whose current Job is `job` (the
    Job as the operator's own watch or a read of it shows it, controlled by this very FineTuneJob),
    or None. Only the live pod of that Job may: the pod's uid is the token's (not an earlier pod of
    the same name), its controller is that Job by uid (labels and names are anyone's to copy; a
    uid is the API server's), it has not finished, and neither has the job."""
    if who.namespace != namespace:
        return "the token is for a pod of another namespace"
    if ftj is None or job is None:
        return "the job has no current Job"
    if ((ftj.get("status") or {}).get("phase")) in FINISHED_PHASES:
        return "the job has finished"
    if pod is None or (pod.get("metadata") or {}).get("uid") != who.pod_uid:
        return "the token's pod does not exist"
    meta = pod["metadata"]
    job_uid = (job.get("metadata") or {}).get("uid")
    owners = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    if meta.get("namespace") != namespace or not any(
        r.get("kind") == "Job" and r.get("uid") == job_uid for r in owners
    ):
        return "the token's pod does not belong to this job's Job"
    if (pod.get("status") or {}).get("phase") in FINISHED_POD_PHASES:
        return "the token's pod has finished"
    return None


def uri_refusal(report: dict[str, Any], prefix: str) -> str | None:
    """The first URI in a report that is not under the job's own storage prefix, or None: status
    must never point at another tenant's data, whatever a pod claims."""
    entries = [("checkpoint.uri", report.get("checkpoint"))]
    entries.append(("bestCheckpoint.uri", report.get("bestCheckpoint")))
    history = report.get("checkpoints")
    if isinstance(history, list):
        entries += [(f"checkpoints[{i}].uri", e) for i, e in enumerate(history)]
    for where, entry in entries:
        if not isinstance(entry, dict) or "uri" not in entry:
            continue
        uri = entry["uri"]
        if not isinstance(uri, str) or not admission.within(uri, prefix):
            return f"{where} {str(uri)[:200]!r} is not under the job's storage prefix {prefix}"
    return None


@dataclass
class RateLimiter:
    """A token bucket per source address: `burst` requests at once, then `rate` per second. Checked
    before any TokenReview, so a flood from one source costs at most burst + rate x seconds."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, source: str) -> bool:
        now = self.clock()
        tokens, at = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if len(self._buckets) >= MAX_CACHED_VERDICTS and source not in self._buckets:
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < self.burst / self.rate}
        if tokens < 1:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1, now)
        return True


class ProgressService:
    """The HTTP endpoint and the writer loop."""

    def __init__(
        self,
        kube: Kube,
        authenticator: Authenticator,
        metrics: OperatorMetrics,
        interval: float,
        pod_lookup: Callable[[str, str], Awaitable[dict[str, Any] | None]],
        *,
        job_lookup: Callable[[str, str], Awaitable[tuple[dict[str, Any], dict[str, Any]] | None]],
        storage_prefix: Callable[[dict[str, Any]], str],
        limiter: RateLimiter,
    ) -> None:
        self.kube = kube
        self.auth = authenticator
        self.metrics = metrics
        self.interval = interval
        self.pod_lookup = pod_lookup
        self.job_lookup = job_lookup
        self.storage_prefix = storage_prefix
        self.limiter = limiter
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
        refused, found = await self._authorize(request, namespace, name)
        if refused is not None:
            return refused
        assert found is not None
        ftj = found[0]
        key = (namespace, name)
        report = self.read_report(key, await request.read())
        if isinstance(report, web.Response):
            return report
        outside = uri_refusal(report, self.storage_prefix(ftj))
        if outside is not None:
            return self._reject("forbidden", 403, outside)
        if not self.book.offer(key, report):
            self.metrics.progress_reports.labels("stale").inc()
            return web.json_response({"accepted": False, "reason": "stale"}, status=200)
        self.metrics.progress_reports.labels("accepted").inc()
        self._wake.set()
        return web.json_response({"accepted": True}, status=202)

    async def _authorize(
        self, request: web.Request, namespace: str, name: str
    ) -> tuple[web.Response | None, tuple[dict[str, Any], dict[str, Any]] | None]:
        """(a refusal, None), or (None, (the FineTuneJob, its current Job)) when the request comes
        from the live pod of that Job: rate limit per source, TokenReview, then source_refusal."""
        if not self.limiter.allow(request.remote or ""):
            response = self._reject("limited", 429, "too many requests from this address")
            response.headers["Retry-After"] = "1"
            return response, None
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return self._reject("unauthorized", 401, "a bearer token is required"), None
        who = await self.auth.identity(header.removeprefix("Bearer ").strip())
        if who is None or who.namespace != namespace:
            return self._reject("unauthorized", 401, "the token is not valid for this job"), None
        found = await self.job_lookup(namespace, name)
        pod = await self.pod_lookup(namespace, who.pod)
        why = source_refusal(who, namespace, pod, *(found or (None, None)))
        if why is not None:
            log.info(
                "progress report refused: %s",
                why,
                extra={"fields": {"namespace": namespace, "name": name, "pod": who.pod}},
            )
            return self._reject("forbidden", 403, why), None
        return None, found

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
