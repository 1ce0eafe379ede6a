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

Accepted reports are buffered (`ProgressBook`, the newest per job) and the job's reconcile is woken
(`Reconciler.poke`): at once when the checkpoint, the trainer's phase or the evaluation changes,
otherwise once `statusWriteIntervalSeconds` have passed since the last write of a report. This
module never writes status: the reconcile alone does (handlers.py), reading the newest buffered
report, so a report is never dropped, only coalesced with the ones after it. Only the replica that
reconciles (the Lease holder) accepts reports. A standby checks and buffers them like the leader
(its book is written by its own reconciles if it takes over, as when the leader died just before a
trainer's last report) but answers 503, so the trainer sends again and a live leader gets it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web
from finetune_trainer.contract import ReportError, parse_report

from finetune_operator import admission
from finetune_operator.kube import Kube
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.status import parse_time

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
    """The newest report of one job and the last one a status write applied."""

    report: dict[str, Any]
    written: dict[str, Any] | None = None
    written_at: float = 0.0


def write_wait(entry: Entry, now: float, interval: float) -> float | None:
    """Seconds until the buffered report should be written (0: now), or None when status already
    has it: a checkpoint, phase or evaluation change at once, anything else once `interval` has
    passed since the last write."""
    report, written = entry.report, entry.written
    if written is report:
        return None
    if written is None:
        return 0.0
    if (report.get("checkpoint") or {}).get("step") != (written.get("checkpoint") or {}).get("step"):
        return 0.0
    if report.get("phase") != written.get("phase"):
        return 0.0
    if report.get("evalStep") != written.get("evalStep"):
        return 0.0  # an evaluation: rare, and what a person watching the job waits for
    return max(0.0, interval - (now - entry.written_at))


def newer(report: dict[str, Any], than: dict[str, Any]) -> bool:
    """Order of two reports: by reportedAt, then by sequence."""
    a, b = parse_time(report.get("reportedAt")), parse_time(than.get("reportedAt"))
    if a is None or b is None or a == b:
        return int(report.get("sequence") or 0) > int(than.get("sequence") or 0)
    return a > b


class ProgressBook:
    """The newest report per job, in memory, and which of them status already shows. Filled by the
    endpoint, read and marked by the reconcile (the only status writer)."""

    def __init__(self) -> None:
        self.entries: dict[Key, Entry] = {}
        self._refusals_logged: set[tuple[Key, str]] = set()

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

    def wait(self, key: Key, now: float, interval: float) -> float | None:
        """write_wait of the job's buffered report; None when there is none."""
        entry = self.entries.get(key)
        return write_wait(entry, now, interval) if entry is not None else None

    def mark_written(self, key: Key, report: dict[str, Any], now: float) -> None:
        """Status now shows `report` (or a newer one): the report the reconcile read, not the
        newest, which may have arrived during the write and still has to be written."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.written, entry.written_at = report, now

    def first_refusal(self, key: Key, field: str) -> bool:
        """Whether a refused report of `key` breaking `field` is the first such (to be logged);
        bounded: beyond REFUSALS_LOGGED pairs, none is."""
        if (key, field) in self._refusals_logged or len(self._refusals_logged) >= REFUSALS_LOGGED:
            return False
        self._refusals_logged.add((key, field))
        return True

    def forget(self, key: Key) -> None:
        self.entries.pop(key, None)
        self._refusals_logged = {k for k in self._refusals_logged if k[0] != key}


class Reconciler(Protocol):
    """The controller as the endpoint sees it: its caches, to tell whether a pod may report, and its
    queue, to wake a job's reconcile (handlers.Controller)."""

    async def pod_lookup(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def job_lookup(self, namespace: str, name: str) -> tuple[dict[str, Any], dict[str, Any]] | None: ...

    def poke(self, key: Key) -> None: ...


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
    """The HTTP endpoint: authenticate, validate, buffer, wake the reconcile."""

    def __init__(
        self,
        authenticator: Authenticator,
        metrics: OperatorMetrics,
        book: ProgressBook,
        reconciler: Reconciler,
        *,
        interval: float,
        storage_prefix: Callable[[dict[str, Any]], str],
        limiter: RateLimiter,
        leading: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.auth = authenticator
        self.metrics = metrics
        self.book = book
        self.reconciler = reconciler
        self.interval = interval
        self.storage_prefix = storage_prefix
        self.limiter = limiter
        self.leading = leading
        """Whether this replica reconciles (holds the Lease, or runs without leader election)."""
        self.clock = clock
        self._timers: dict[Key, asyncio.TimerHandle] = {}

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
        if not self.leading():
            # Kept, and written if this replica takes over (a leader that died: the e2e kills one),
            # but a standby does not reconcile: 503, so the trainer sends again and a live leader
            # (the Service's next connection) writes it.
            response = self._reject("standby", 503, "this replica is a standby; send again")
            response.headers["Retry-After"] = "1"
            return response
        self.metrics.progress_reports.labels("accepted").inc()
        self.wake(key)
        return web.json_response({"accepted": True}, status=202)

    def wake(self, key: Key) -> None:
        """Poke the job's reconcile when its buffered report is due, else once it will be (one timer
        per job; when it fires, the wait is asked again: a reconcile meanwhile may have written the
        report, or written an older one and so moved the time of the last write)."""
        wait = self.book.wait(key, self.clock(), self.interval)
        if wait is None:
            return
        if wait <= 0:
            self.reconciler.poke(key)
        elif key not in self._timers:
            self._timers[key] = asyncio.get_running_loop().call_later(wait, self._timer_fired, key)

    def _timer_fired(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.wake(key)

    async def _authorize(
        self, request: web.Request, namespace: str, name: str
    ) -> tuple[web.Response | None, tuple[dict[str, Any], dict[str, Any]] | None]:
        """(a refusal, None), or (None, (the FineTuneJob, its current Job)) when the request comes
        from the live pod of that Job: the rate limit per source, TokenReview, then source_refusal."""
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
        found = await self.reconciler.job_lookup(namespace, name)
        pod = await self.reconciler.pod_lookup(namespace, who.pod)
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
            if self.book.first_refusal(key, e.field):
                log.warning(
                    "progress report refused: %s",
                    str(e)[:MESSAGE_LIMIT],
                    extra={"fields": {"namespace": key[0], "name": key[1], "field": e.field}},
                )
            return self._reject("invalid", 400, str(e)[:MESSAGE_LIMIT], field=e.field)

    def _reject(self, result: str, status: int, message: str, field: str | None = None) -> web.Response:
        self.metrics.progress_reports.labels(result).inc()
        return web.json_response({"error": message, **({"field": field} if field else {})}, status=status)
