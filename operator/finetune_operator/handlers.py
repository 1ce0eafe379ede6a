"""The kopf wiring: watches feed one level-triggered reconcile per FineTuneJob.

kopf is used only for its watches, indexes and event queues: every handler here is an `on.event`
or `index` handler, which keep no state on the objects. kopf's change-detecting and spawning
handlers (on.create/update, timers, daemons) would write bookkeeping into the object and, for
timers, add a finalizer; the settings still point any bookkeeping at status.kopf rather than
metadata.annotations, so nothing the user (or Argo CD) manages ever changes.

Reconciles are per FineTuneJob, never concurrent for one job, and coalesced: a burst of events for
one job while it is being reconciled leads to one more reconcile, not one per event. A periodic
resync re-reconciles every job, repairing status after lost watch events.

The reconcile is the only writer of `.status`. The trainer's progress reports reach it through the
report book (progress_server.ProgressBook): the progress endpoint buffers the newest report per job
and pokes the job's reconcile, which derives the whole status from the FineTuneJob, its Job, pods
and that report, and writes it under one conflict policy (`_write_status`). A report that arrives
while the job's reconcile runs marks the job dirty, so the reconcile runs once more and writes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kopf

from finetune_operator import events
from finetune_operator.api import API_GROUP, API_VERSION, PLURAL, FineTuneJobSpec
from finetune_operator.config import OperatorConfig
from finetune_operator.credentials import CredentialsError, StorageCredentials, removal_due, uses_sts
from finetune_operator.jobbuilder import (
    InvalidJobError,
    build_job,
    is_owned_by,
    job_spec_patch,
    parse_spec,
    resolved_storage,
    secret_fields,
    validate_limits,
)
from finetune_operator.kube import ApiError, ConflictError, Kube, NotFoundError
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.naming import SELECTOR, job_name
from finetune_operator.progress_server import ProgressBook
from finetune_operator.refusals import PodCreateFailure, job_refusal, pod_create_failure
from finetune_operator.status import (
    cannot_start,
    create_refused_status,
    credentials_status,
    derive_status,
    final_outputs,
    invalid_status,
    parse_time,
    transition,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]
FTJ = (API_GROUP, API_VERSION, PLURAL)
STATUS_WRITE_ATTEMPTS = 3
GIVEN_UP = frozenset(
    {
        "SecretMissing",
        "PriorityClassNotFound",
        "ServiceAccountNotFound",
        "QuotaExceeded",
        "LimitRangeRefused",
        "PodCreateFailed",
    }
)
"""Failed reasons whose Job the operator deletes: its pod never started, it only holds a quota."""
POD_CREATE_PATIENCE_SECONDS = 5.0
"""A Job younger than this without a pod is not asked about: its controller is just slow."""
REPORTED_FIELDS = frozenset({"progress", "checkpoint", "checkpoints", "bestCheckpoint", "samples"})
"""Status fields that come from the trainer's reports (status.progress_patch)."""


def _owner(obj: Any, kind: str) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == kind:
            return ref.get("name")
    return None


class Slots:
    """`size` reconcile slots handed out by priority (lower first), then in order of asking: a
    job still waiting for its Job goes before status updates of jobs that have one, so a burst of
    new jobs gets its Jobs (and its pods scheduled) first."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self._waiting:
            self.free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed over just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():
                turn.set_result(None)
                return
        self.free += 1


class Controller:
    """Caches (kopf indexes for Jobs and Pods, a dict of FineTuneJobs) and the reconcile loop."""

    def __init__(self, cfg: OperatorConfig, kube: Kube, metrics: OperatorMetrics, book: ProgressBook):
        self.cfg = cfg
        self.kube = kube
        self.metrics = metrics
        self.book = book
        """The trainers' newest reports, filled by the progress endpoint, written by the reconcile."""
        self.ftjs: dict[Key, dict[str, Any]] = {}
        self.job_index: Any = None
        self.pod_index: Any = None
        self.workload_index: Any = None
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = Slots(cfg.max_concurrent_reconciles)
        self._specs: dict[Key, tuple[tuple[str, int], FineTuneJobSpec | InvalidJobError]] = {}
        self._failures: dict[Key, tuple[int, str]] = {}
        """Consecutive failed reconciles and the last error, per job."""
        self._backoff_until: dict[Key, float] = {}
        self._retry_timers: dict[Key, asyncio.TimerHandle] = {}
        """The one pending retry per job: two reconciles failing back to back (a poke arriving
        during the first) once left two timers, each re-arming itself: twice the tries, forever."""
        self.credentials = StorageCredentials(cfg, kube) if cfg.storage.sts.enabled else None
        """Per-job scoped storage credentials (storage.sts), else None."""

    def bind(self, kwargs: dict[str, Any]) -> None:
        """Keep kopf's index objects (they are the same objects on every call)."""
        self.job_index = kwargs["finetune_jobs_index"]
        self.pod_index = kwargs["finetune_pods_index"]
        self.workload_index = kwargs.get("finetune_workloads_index")

    def _job(self, key: Key) -> dict[str, Any] | None:
        store = self.job_index.get((key[0], job_name(key[1]))) if self.job_index is not None else None
        return dict(next(iter(store))) if store else None

    def _pods(self, namespace: str, job: dict[str, Any]) -> list[dict[str, Any]]:
        store = (
            self.pod_index.get((namespace, job["metadata"]["name"])) if self.pod_index is not None else None
        )
        uid = job["metadata"].get("uid")
        pods = [dict(p) for p in store or []]
        return [
            p
            for p in pods
            if any(r.get("uid") == uid for r in p.get("metadata", {}).get("ownerReferences") or [])
        ]

    def _workload(self, namespace: str, job: dict[str, Any]) -> dict[str, Any] | None:
        """The Kueue Workload owned by `job` (read-only, from the watch), if Kueue made one."""
        if self.workload_index is None:
            return None
        uid = job["metadata"].get("uid")
        store = self.workload_index.get((namespace, job["metadata"]["name"])) or []
        owned = [w for w in store if w["metadata"].get("jobUID") == uid]
        return dict(max(owned, key=lambda w: w["metadata"].get("creationTimestamp") or "")) if owned else None

    async def pod_lookup(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A pod for the progress endpoint: from the cache (leader) or the API (standby). The Job
        controller names a pod `<job>-<5 characters>`, so its Job's entry is looked at first: a
        scan of every pod for every report made the reports of N jobs cost N^2."""
        if self.pod_index is not None:
            guess = self.pod_index.get((namespace, name.rsplit("-", 1)[0])) or []
            for store in (guess, *self.pod_index.values()):
                for pod in store:
                    meta = pod.get("metadata", {})
                    if meta.get("name") == name and meta.get("namespace") == namespace:
                        return dict(pod)
        try:
            return await self.kube.get_pod(namespace, name)
        except NotFoundError:
            return None

    async def job_lookup(self, namespace: str, name: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(the FineTuneJob, its current Job) for the progress endpoint, or None when it has no Job
        it controls: from the caches (leader) or the API (standby). The Job is the one the watch
        shows (its uid the API server's), never one named by a pod."""
        key = (namespace, name)
        ftj = self.ftjs.get(key)
        job = self._job(key)
        try:
            if ftj is None:
                ftj = await self.kube.get_ftj(namespace, name)
            if job is None and self.job_index is None:
                job = await self.kube.get_job(namespace, job_name(name))
        except NotFoundError:
            return None
        if job is None or not is_owned_by(job, ftj):
            return None
        return ftj, job

    # -- triggers ---------------------------------------------------------------------------

    def ftj_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self.ftjs.pop(key, None)
            self._specs.pop(key, None)
            self._failures.pop(key, None)
            self._backoff_until.pop(key, None)
            if (timer := self._retry_timers.pop(key, None)) is not None:
                timer.cancel()
            self.metrics.forget(*key)
            self.book.forget(key)
            if self.credentials is not None:
                self.credentials.forget(*key)
            return
        known = self.ftjs.get(key)
        if known is not None and known["metadata"].get("generation") != meta.get("generation"):
            self._backoff_until.pop(key, None)  # the user changed the spec (suspend, ...): act now
        self.ftjs[key] = body
        self.metrics.observe_job(*key, body.get("status") or {})
        if known is not None and meta.get("resourceVersion") == known["metadata"].get("resourceVersion"):
            return  # our own status write coming back: nothing to reconcile (a third of all events)
        self.poke(key)

    def owned_event(self, body: dict[str, Any], kind: str) -> None:
        namespace = body["metadata"]["namespace"]
        if kind in ("Pod", "Workload"):
            job = _owner(body, "Job")
            job_obj = next(iter(self.job_index.get((namespace, job)) or []), None) if job else None
            name = _owner(job_obj, "FineTuneJob") if job_obj else None
        else:
            name = _owner(body, "FineTuneJob")
        if name and (namespace, name) in self.ftjs:
            self.poke((namespace, name))

    def poke(self, key: Key) -> None:
        """Reconcile `key` soon; coalesced with a reconcile already running for it, and held back
        while the key's last reconcile failed and its retry is not yet due (see _failed)."""
        if self._backoff_until.get(key, 0.0) > time.monotonic():
            return
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        task = asyncio.get_running_loop().create_task(self._loop(key, time.perf_counter()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _loop(self, key: Key, poked: float) -> None:
        """Reconcile `key` in one of maxConcurrentReconciles slots (a burst of jobs queues here, so a
        reconcile's duration is its own work, and the wait is measured apart), again while pokes
        arrived during the previous reconcile."""
        try:
            while True:
                await self._slots.acquire(0 if self._needs_job(key) else 1)
                try:
                    self.metrics.reconcile_queue.observe(time.perf_counter() - poked)
                    self._dirty.discard(key)
                    started = time.perf_counter()
                    try:
                        await self.reconcile(key)
                        self._failures.pop(key, None)
                    except Exception as e:
                        self.metrics.reconcile_errors.inc()
                        self._failed(key, e)
                    finally:
                        self.metrics.reconcile_duration.observe(time.perf_counter() - started)
                finally:
                    self._slots.release()
                if key not in self._dirty:
                    return
                poked = time.perf_counter()
        finally:
            self._running.discard(key)

    def _failed(self, key: Key, error: Exception) -> None:
        """A reconcile raised: retry after 1, 2, 4, ... seconds (at most reconcileBackoffMaxSeconds),
        ignoring the pokes of watch events and resyncs meanwhile (an edit of the spec still goes
        through at once), and log the error only when it differs from the previous one."""
        count, last = self._failures.get(key, (0, ""))
        text = f"{type(error).__name__}: {error}"[:300]
        delay = min(2.0**count, self.cfg.reconcile_backoff_max_seconds)
        if text != last:
            log.exception(
                "reconcile failed; retrying in %.0fs, then less often while it keeps failing so",
                delay,
                extra={"fields": _fields(key)},
            )
        self._failures[key] = (count + 1, text)
        self._backoff_until[key] = time.monotonic() + delay
        if (timer := self._retry_timers.pop(key, None)) is not None:
            timer.cancel()
        self._retry_timers[key] = asyncio.get_running_loop().call_later(delay, self._retry, key)

    def _retry(self, key: Key) -> None:
        self._retry_timers.pop(key, None)
        self._backoff_until.pop(key, None)
        if key in self.ftjs:
            self.poke(key)

    def _needs_job(self, key: Key) -> bool:
        """Whether the job is waiting for its Job to be created (reconciled first)."""
        ftj = self.ftjs.get(key)
        phase = ((ftj or {}).get("status") or {}).get("phase")
        return ftj is not None and phase not in ("Succeeded", "Failed") and self._job(key) is None

    async def resync(self) -> None:
        """Re-reconcile every job every resyncSeconds, forever."""
        while True:
            await asyncio.sleep(self.cfg.resync_seconds)
            for key in list(self.ftjs):
                self.poke(key)

    # -- the reconcile ----------------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        ftj = self.ftjs.get(key)
        if ftj is None or ftj["metadata"].get("deletionTimestamp"):
            return
        phase = (ftj.get("status") or {}).get("phase")
        spec = self._spec(key, ftj)
        job = self._job(key)
        if isinstance(spec, InvalidJobError) and (job is None or not is_owned_by(job, ftj)):
            # Refused before a Job exists. A job whose Job exists goes on below whatever its spec
            # says now (the operator's limits may have changed since): its status keeps telling
            # the truth about the pod, and suspend keeps working.
            field, message, reason = spec.field, spec.message, spec.reason
            await self._write_status(
                key, ftj, lambda obj: invalid_status(obj, field, message, _now(), reason=reason)
            )
            return
        renewal: CredentialsError | None = None
        try:
            await self._storage_credentials(ftj, phase)
        except CredentialsError as e:
            if job is None:
                await self._credentials_failed(key, ftj, e)
                return
            renewal = e  # a renewal: the credentials it holds still work, its status goes on
        await self._reconcile_job(key, ftj, phase, spec, job)
        if renewal is not None:
            raise renewal  # retried with backoff

    async def _credentials_failed(self, key: Key, ftj: dict[str, Any], error: CredentialsError) -> None:
        """The job's credentials could not be provided before its Job exists: status says why and
        the reconcile is retried with backoff (raised) until that has lasted podCreateGraceSeconds;
        then the job has Failed with that reason, and no Job is made."""
        grace = self.cfg.pod_create_grace_seconds
        status = await self._write_status(
            key,
            ftj,
            lambda obj: credentials_status(obj, error, _now(), grace),
        )
        if status.get("phase") != "Failed":
            raise error

    async def _reconcile_job(
        self,
        key: Key,
        ftj: dict[str, Any],
        phase: str | None,
        spec: FineTuneJobSpec | InvalidJobError,
        job: dict[str, Any] | None,
    ) -> None:
        """Create or adopt the Job, keep its mutable spec in step, and derive status from it."""
        if job is None and phase in ("Succeeded", "Failed"):
            return  # nothing left to observe (the Job was deleted): the final status stands
        if (
            job is not None
            and phase == "Failed"
            and (given_up := _reason(ftj.get("status") or {})) in GIVEN_UP
        ):
            # Failed because its pod could never be created, and its Job deleted (or being so): the
            # final status stands. Observed again, a Job the cache still holds after the delete reads
            # as Pending (it has no Failed condition), and once it is gone a new one would be made:
            # the job failed and started again every grace period.
            await self._delete_given_up(key, job, given_up)
            return
        if job is None:
            try:
                job = await self._create_or_adopt(key, ftj, build_job(ftj, self.cfg))
            except InvalidJobError as e:
                # What only the built Job shows (its manifest annotation over the API server's size
                # limit): refused like a spec the operator refuses, never retried.
                field, message, reason = e.field, e.message, e.reason
                await self._write_status(
                    key, ftj, lambda obj: invalid_status(obj, field, message, _now(), reason=reason)
                )
                return
            except ApiError as e:
                refusal = job_refusal(e.status, e.body)
                if not refusal.permanent:
                    # A quota on Jobs, an admission webhook down: said in status, retried with backoff.
                    await self._write_status(
                        key,
                        ftj,
                        lambda obj: create_refused_status(obj, refusal.field, refusal.message, _now()),
                    )
                    raise
                await self._write_status(
                    key, ftj, lambda obj: invalid_status(obj, refusal.field, refusal.message, _now())
                )
                log.info(
                    "Job create refused: %s: %s",
                    refusal.field,
                    refusal.message,
                    extra={"fields": _fields(key)},
                )
                return
            if job is None:
                return
        if job is not None and not is_owned_by(job, ftj):
            message = (
                f"a Job named {job['metadata']['name']} exists that this FineTuneJob does not own; delete it"
            )
            await self._write_status(
                key, ftj, lambda obj: invalid_status(obj, "metadata.name", message, _now())
            )
            return
        if job is not None and phase not in ("Succeeded", "Failed"):
            patch = job_spec_patch(ftj, job, None if isinstance(spec, InvalidJobError) else spec)
            if patch:
                job = await self.kube.patch_job(key[0], job["metadata"]["name"], patch)
        pods = self._pods(key[0], job) if job is not None else []
        workload = self._workload(key[0], job) if job is not None else None
        report = self.book.latest(key)
        secrets = secret_fields(ftj, self.cfg) if cannot_start(pods) else {}
        grace = self.cfg.secret_missing_grace_seconds
        pod_failure = await self._pod_create_failure(key, job, pods, phase)
        prefix = resolved_storage(ftj, self.cfg)["uri"]

        def compute(obj: dict[str, Any]) -> dict[str, Any]:
            return derive_status(
                obj,
                job,
                pods,
                report,
                _now(),
                workload=workload,
                secret_grace=grace,
                secret_fields=secrets,
                pod_failure=pod_failure,
                pod_grace=self.cfg.pod_create_grace_seconds,
                storage_prefix=prefix,
            )

        status = await self._write_status(
            key, ftj, compute, report=report, job=job, pods=pods, workload=workload
        )
        reason = _reason(status)
        if job is not None and status.get("phase") == "Failed" and reason in GIVEN_UP:
            await self._delete_given_up(key, job, reason)

    async def _delete_given_up(self, key: Key, job: dict[str, Any], reason: str | None) -> None:
        """Its pod can never start: stop holding the GPU (the final status stands, see above). A
        Job already gone (the cache lagging behind the delete) answers 404, ignored."""
        with contextlib.suppress(NotFoundError, ConflictError):
            await self.kube.delete_job(key[0], job["metadata"]["name"], job["metadata"]["uid"])
            log.info(
                "deleted Job %s: its pod cannot start (%s)",
                job["metadata"]["name"],
                reason,
                extra={"fields": _fields(key)},
            )

    async def _storage_credentials(self, ftj: dict[str, Any], phase: str | None) -> None:
        """Scoped credentials: issued before the Job is made, renewed while the job runs (this is
        called on every reconcile, the periodic resync included), deleted when it has finished."""
        if self.credentials is None:
            return
        storage = resolved_storage(ftj, self.cfg)
        if not uses_sts(storage.get("credentialsSecret"), self.cfg):
            return
        if phase in ("Succeeded", "Failed"):
            completed = parse_time((ftj.get("status") or {}).get("completionTime"))
            if removal_due(completed, _now(), self.cfg.storage.sts.duration_seconds):
                await self.credentials.remove(ftj)
        else:
            await self.credentials.ensure(ftj, storage["uri"])

    async def _pod_create_failure(
        self, key: Key, job: dict[str, Any] | None, pods: list[dict[str, Any]], phase: str | None
    ) -> PodCreateFailure | None:
        """Why the Job controller cannot create the pod, from the Job's FailedCreate Events; asked
        only of a Job that should have a pod and has had none for a few seconds (one list call per
        reconcile of such a job: at most once a resync while it waits)."""
        if job is None or pods or phase in ("Succeeded", "Failed") or (job.get("spec") or {}).get("suspend"):
            return None
        created = parse_time(job["metadata"].get("creationTimestamp"))
        if created is None or (_now() - created).total_seconds() < POD_CREATE_PATIENCE_SECONDS:
            return None
        return pod_create_failure(await self.kube.list_events(key[0], job["metadata"]["uid"]))

    def _spec(self, key: Key, ftj: dict[str, Any]) -> FineTuneJobSpec | InvalidJobError:
        """The parsed spec, or why it cannot run here; computed once per uid and generation (a
        reconcile runs on every event of the job, its Job and its pods)."""
        meta = ftj["metadata"]
        version = (meta.get("uid", ""), int(meta.get("generation") or 0))
        cached = self._specs.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            spec: FineTuneJobSpec | InvalidJobError = parse_spec(ftj)
            validate_limits(spec, key[0], self.cfg)
        except InvalidJobError as e:
            spec = e
        self._specs[key] = (version, spec)
        return spec

    async def _create_or_adopt(
        self, key: Key, ftj: dict[str, Any], desired: dict[str, Any]
    ) -> dict[str, Any] | None:
        try:
            job = await self.kube.create_job(key[0], desired)
            log.info("created Job %s", desired["metadata"]["name"], extra={"fields": _fields(key)})
            return job
        except ConflictError:
            try:
                job = await self.kube.get_job(key[0], desired["metadata"]["name"])
            except NotFoundError:
                return None  # deleted in between: the next event retries
            log.info(
                "Job %s already exists; adopting it",
                desired["metadata"]["name"],
                extra={"fields": _fields(key)},
            )
            return job

    async def _write_status(
        self,
        key: Key,
        ftj: dict[str, Any],
        compute: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        report: dict[str, Any] | None = None,
        job: dict[str, Any] | None = None,
        pods: list[dict[str, Any]] | None = None,
        workload: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Compute and write a status patch conditional on the object's resourceVersion: the one
        conflict policy of every status write. On conflict read the object again and recompute (so
        e.g. a preemption is never counted twice); after STATUS_WRITE_ATTEMPTS conflicts in a row
        raise, so the reconcile is retried with its backoff. `report`, the trainer's report that
        `compute` reads, is marked written in the book once status shows it (or shows newer);
        one the API server refuses is dropped, and the rest of the patch written without it.
        Returns the status as written (or as it stood, when nothing needed writing)."""
        obj = ftj
        without_report = False
        for _ in range(STATUS_WRITE_ATTEMPTS):
            patch = compute(obj)
            if without_report:
                patch = {k: v for k, v in patch.items() if k not in REPORTED_FIELDS}
            if not patch:
                self._applied(key, report)
                return obj.get("status") or {}
            try:
                new = await self.kube.patch_ftj_status(*key, patch, obj["metadata"]["resourceVersion"])
            except ApiError as e:
                if e.status != 422 or without_report or not patch.keys() & REPORTED_FIELDS:
                    raise
                # What the trainer reported cannot be written (the contract and the CRD's schema
                # drifted): the phase and conditions still are; the next report may pass.
                log.warning(
                    "status write refused with the trainer's figures, writing it without them: %s",
                    str(e)[:512],
                    extra={"fields": _fields(key)},
                )
                without_report = True
                continue
            except ConflictError:
                try:
                    obj = await self.kube.get_ftj(*key)
                except NotFoundError:
                    return {}
                continue
            except NotFoundError:
                return {}
            self._applied(key, report)
            self._after_write(
                key, obj, new, patch, report=report, job=job, pods=pods or [], workload=workload
            )
            return new.get("status") or {}
        raise ConflictError(
            f"status of {key[0]}/{key[1]}: {STATUS_WRITE_ATTEMPTS} conflicting writes in a row"
        )

    def _applied(self, key: Key, report: dict[str, Any] | None) -> None:
        if report is not None:
            self.book.mark_written(key, report, time.monotonic())

    def _after_write(
        self,
        key: Key,
        old: dict[str, Any],
        new: dict[str, Any],
        patch: dict[str, Any],
        *,
        report: dict[str, Any] | None,
        job: dict[str, Any] | None,
        pods: list[dict[str, Any]],
        workload: dict[str, Any] | None = None,
    ) -> None:
        new = slim_ftj(new)
        if key in self.ftjs:
            self.ftjs[key] = new
        old_status = old.get("status") or {}
        self.metrics.observe_checkpoint(old_status, patch, report)
        for event in events.evaluation_events(new, old_status, patch, _now()):
            self._post(event)
        added = int(patch.get("preemptions", old_status.get("preemptions") or 0)) - int(
            old_status.get("preemptions") or 0
        )
        if added > 0:
            self.metrics.preemptions.inc(added)
        self.metrics.observe_job(*key, new.get("status") or {})
        moved = transition(old_status, patch)
        if moved:
            conditions = patch.get("conditions") or [{}]
            reason = conditions[0].get("reason") or "Unknown"  # every condition carries the reason
            message = patch.get("message") or ""
            log.info(
                "phase %s -> %s: %s",
                moved[0],
                moved[1],
                message,
                extra={"fields": {**_fields(key), "phase": moved[1], "reason": reason}},
            )
            self._post(events.transition_event(new, moved, reason, message, _now()))
        if pods and patch.keys() & {"summary", "artifacts"}:
            # The final summary's first write: say which of its URIs status left out, and why.
            prefix = resolved_storage(new, self.cfg)["uri"]
            final = final_outputs(pods, (new.get("status") or {}).get("phase") == "Succeeded", prefix)
            dropped = events.uris_dropped_event(new, final.dropped, prefix, _now())
            if dropped is not None:
                self._post(dropped)

    def _post(self, event: dict[str, Any]) -> None:
        """Post an Event in the background (a status write never waits for one)."""
        task = asyncio.get_running_loop().create_task(events.post(self.kube, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _reason(status: dict[str, Any]) -> str | None:
    """The reason of the status's Failed condition."""
    return next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Failed"), None)


def _now() -> datetime:
    return datetime.now(UTC)


def _fields(key: Key) -> dict[str, str]:
    return {"namespace": key[0], "name": key[1]}


# -- kopf registration ----------------------------------------------------------------------


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kopf builds one (a deep copy of the whole object, pods' job manifest included)
    on every watch event, for change-detecting handlers to compare against. This operator has none
    (only on.event and index handlers), so nothing is ever compared or stored; skipping the copy
    halves kopf's CPU per event (benchmarks/operator)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


def register(registry: kopf.OperatorRegistry, cfg: OperatorConfig) -> None:
    """Register the handlers on `registry`; the Controller arrives through kopf's `memo`."""

    @kopf.on.startup(registry=registry)
    def settings(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.posting.enabled = False  # our own Events, one per transition; not kopf's per-handler ones
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.index("batch", "v1", "jobs", labels=SELECTOR, registry=registry, id="finetune_jobs_index")
    async def finetune_jobs_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, Any]:
        return {(namespace, name): slim_job(body)}

    @kopf.index("v1", "pods", labels=SELECTOR, registry=registry, id="finetune_pods_index")
    async def finetune_pods_index(namespace: str, body: kopf.Body, **_: Any) -> dict[Key, Any] | None:
        job = _owner(body, "Job")
        return {(namespace, job): slim_pod(body)} if job else None

    if cfg.kueue.enabled:
        version = cfg.kueue.workload_api_version

        @kopf.index(
            "kueue.x-k8s.io",
            version,
            "workloads",
            registry=registry,
            id="finetune_workloads_index",
            when=lambda body, **_: _owner(body, "Job") is not None,
        )
        async def finetune_workloads_index(
            namespace: str, body: kopf.Body, **_: Any
        ) -> dict[Key, Any] | None:
            job = _owner(body, "Job")
            return {(namespace, job): slim_workload(body)} if job else None

        @kopf.on.event(
            "kueue.x-k8s.io",
            version,
            "workloads",
            registry=registry,
            when=lambda body, **_: _owner(body, "Job") is not None,
        )
        async def workload_event(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
            controller: Controller = memo["controller"]
            controller.bind(kwargs)
            controller.owned_event(_plain(body), "Workload")

    @kopf.on.event(*FTJ, registry=registry)
    async def ftj_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        controller: Controller = memo["controller"]
        controller.bind(kwargs)
        controller.ftj_event(type, slim_ftj(body))

    @kopf.on.event("batch", "v1", "jobs", labels=SELECTOR, registry=registry)
    async def job_event(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        controller: Controller = memo["controller"]
        controller.bind(kwargs)
        controller.owned_event(_plain(body), "Job")

    @kopf.on.event("v1", "pods", labels=SELECTOR, registry=registry)
    async def pod_event(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        controller: Controller = memo["controller"]
        controller.bind(kwargs)
        controller.owned_event(_plain(body), "Pod")


def _plain(body: Any) -> dict[str, Any]:
    """A kopf Body as the plain dict the pure functions take (nested values are already plain)."""
    return {k: body[k] for k in body}


# What the caches keep of each object: what reconciles, status and the progress endpoint read. A
# Job's pod template and a pod's annotations carry the whole job manifest, and managedFields
# repeats every field's owner; kept whole, 1,000 jobs took 313 MiB (benchmarks/operator).
_META = ("name", "namespace", "uid", "resourceVersion", "generation", "labels", "ownerReferences")
_META_TIMES = ("creationTimestamp", "deletionTimestamp")


def _slim_meta(meta: dict[str, Any], annotations: bool) -> dict[str, Any]:
    keep = {k: meta[k] for k in (*_META, *_META_TIMES) if k in meta}
    if annotations and "annotations" in meta:
        keep["annotations"] = meta["annotations"]
    return keep


def slim_ftj(body: Any) -> dict[str, Any]:
    """A FineTuneJob without metadata.managedFields."""
    out = _plain(body)
    out["metadata"] = {k: v for k, v in (out.get("metadata") or {}).items() if k != "managedFields"}
    return out


def slim_job(body: Any) -> dict[str, Any]:
    """A Job without its pod template (and managedFields): name, owner, the mutable spec, status."""
    spec = {k: v for k, v in (body.get("spec") or {}).items() if k != "template"}
    return {
        "metadata": _slim_meta(body.get("metadata") or {}, False),
        "spec": spec,
        "status": body.get("status"),
    }


def slim_workload(body: Any) -> dict[str, Any]:
    """What status reads of a Kueue Workload: its owner (and the owner's uid, from Kueue's
    job-uid label), queue, priority, admission's ClusterQueue and conditions."""
    meta = _slim_meta(body.get("metadata") or {}, False)
    meta["jobUID"] = (meta.get("labels") or {}).get("kueue.x-k8s.io/job-uid") or next(
        (r.get("uid") for r in meta.get("ownerReferences") or [] if r.get("controller")), None
    )
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return {
        "metadata": meta,
        "spec": {k: spec[k] for k in ("queueName", "priority", "priorityClassName") if k in spec},
        "status": {
            "conditions": status.get("conditions") or [],
            "clusterQueue": (status.get("admission") or {}).get("clusterQueue"),
        },
    }


def slim_pod(body: Any) -> dict[str, Any]:
    """A pod's identity, node, container resources and status (no annotations, no managedFields)."""
    spec = body.get("spec") or {}
    containers = [
        {"name": c.get("name"), "resources": c.get("resources") or {}} for c in spec.get("containers") or []
    ]
    return {
        "metadata": _slim_meta(body.get("metadata") or {}, False),
        "spec": {"nodeName": spec.get("nodeName"), "containers": containers},
        "status": body.get("status") or {},
    }
