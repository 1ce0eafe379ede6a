"""FineTuneJob status from what the cluster shows: pure functions, no API calls.

`derive_status` turns (FineTuneJob, its Job, the Job's pods, its Kueue Workload, the latest progress
report, now) into a merge patch for `.status`. The operator applies it with the FineTuneJob's
resourceVersion as a precondition, so a patch computed from an out-of-date object is refused
rather than undoing a newer write (and, in particular, a preemption is never counted twice).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_trainer.contract import MAX_CLOCK_SKEW
from finetune_trainer.errors import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED
from finetune_trainer.timestamps import rfc3339

from finetune_operator.admission import within
from finetune_operator.credentials import CredentialsError
from finetune_operator.jobbuilder import CONTAINER
from finetune_operator.naming import LABEL_KUEUE_QUEUE
from finetune_operator.refusals import PodCreateFailure

PREEMPTED_PODS_KEPT = 50
"""Pod uids remembered as already counted as preemptions (bounded; older pods are long gone)."""
PROGRESS_FIELDS = {
    "step": "step",
    "totalSteps": "totalSteps",
    "percent": "percent",
    "loss": "loss",
    "learningRate": "learningRate",
    "tokensPerSecond": "tokensPerSecond",
    "etaSeconds": "etaSeconds",
    "gpuMemoryGiB": "gpuMemoryGib",
    "gpuMemoryPerRankGiB": "gpuMemoryPerRankGib",
    "ranks": "ranks",
    "checkpointFailures": "checkpointFailures",
    "phase": "phase",
    "batchSize": "batchSize",
    "gradientAccumulationSteps": "gradientAccumulationSteps",
    "batchPlan": "batchPlan",
    "evalLoss": "evalLoss",
    "evalTokenAccuracy": "evalTokenAccuracy",
    "evalStep": "evalStep",
    "bestEvalLoss": "bestEvalLoss",
    "bestEvalStep": "bestEvalStep",
    "evalsSinceBest": "evalsSinceBest",
    "diverged": "diverged",
}
"""Report field -> status.progress field (besides updatedAt)."""
EVAL_FIELDS = ("evalLoss", "evalTokenAccuracy", "evalStep", "bestEvalLoss", "bestEvalStep", "evalsSinceBest")
ROUNDED = ("loss", "evalLoss", "bestEvalLoss", "evalTokenAccuracy")
HISTORY_LIMIT = 10
"""Checkpoints status lists (the API's limit; the trainer sends at most as many)."""
SAMPLES_LIMIT = 3
SAMPLE_CHARS = 200
MESSAGE_LIMIT = 1024
LOSS_DIGITS = 4
"""Decimals of the loss in status (what `kubectl get ftj` shows; the trainer's metrics keep all)."""
STARTING_PHASES = ("Starting", "Preflight", "Loading")
"""Trainer phases before the first step (the trainer's progress.ProgressState.phase)."""


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 time (with Z or an offset, any fraction), or None."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Observed:
    """The phase the cluster shows, with a CamelCase reason and a human message."""

    phase: str
    reason: str
    message: str


def _conditions(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def _true(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    cond = _conditions(obj).get(kind)
    return cond if cond and cond.get("status") == "True" else None


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
    return None


def _running(pod: dict[str, Any]) -> dict[str, Any] | None:
    if (pod.get("status") or {}).get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
        return None
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER and (cs.get("state") or {}).get("running"):
            return cs["state"]["running"]
    return None


def _by_age(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"].get("name"))
    )


def parse_summary(message: str | None) -> dict[str, Any] | None:
    """The trainer's JSON summary from a termination message; other text becomes {message: text}."""
    if not message:
        return None
    try:
        doc = json.loads(message)
    except ValueError:
        return {"message": message.strip()[:MESSAGE_LIMIT]}
    return doc if isinstance(doc, dict) else {"message": message.strip()[:MESSAGE_LIMIT]}


def _failure_text(term: dict[str, Any]) -> str:
    summary = parse_summary(term.get("message")) or {}
    text = str(summary.get("message") or term.get("reason") or "no message")
    return text[:MESSAGE_LIMIT]


def _last_terminated(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    for pod in reversed(_by_age(pods)):
        term = _terminated(pod)
        if term is not None:
            return term
    return None


def failure_message(job: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[str, str]:
    """(reason, message) for a failed Job, telling the user what to fix."""
    for pod in _by_age(pods):
        term = _terminated(pod)
        if term and term.get("exitCode") == EXIT_CONFIG_ERROR:
            return (
                "ConfigError",
                f"the job's configuration is wrong (fix the spec, create a new job): {_failure_text(term)}",
            )
    failed = _true(job, "Failed") or _true(job, "FailureTarget") or {}
    reason = failed.get("reason") or "JobFailed"
    if reason == "DeadlineExceeded":
        limit = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return (
            "DeadlineExceeded",
            f"the job ran longer than activeDeadlineSeconds ({limit}); raise it or train fewer steps",
        )
    term = _last_terminated(pods)
    detail = f"; last exit code {term.get('exitCode')}: {_failure_text(term)}" if term else ""
    if reason == "BackoffLimitExceeded":
        limit = (job.get("spec") or {}).get("backoffLimit")
        return reason, f"the trainer failed more often than backoffLimit ({limit}) allows{detail}"
    return reason, f"{failed.get('message') or 'the Job failed'}{detail}"


def queue_of(ftj: dict[str, Any], job: dict[str, Any] | None) -> str | None:
    """The Kueue LocalQueue the Job was created in (its label; the spec's when there is no Job)."""
    labels = ((job or {}).get("metadata") or {}).get("labels") or {}
    return labels.get(LABEL_KUEUE_QUEUE) or (ftj.get("spec") or {}).get("queueName")


def observe_kueue(
    ftj: dict[str, Any], queue: str, workload: dict[str, Any] | None, active: list[dict[str, Any]]
) -> Observed:
    """The phase of a job whose Job Kueue holds suspended, from its Workload's conditions (Kueue's
    own reasons): Preempted while an eviction stops its pod, else Queued with why it waits."""
    evicted = _true(workload, "Evicted")
    if evicted and (active or _true(workload, "QuotaReserved")):
        why = evicted.get("message") or evicted.get("reason") or "evicted"
        return Observed(
            "Preempted",
            evicted.get("reason") or "Evicted",
            f"Kueue evicted the job: {why}; the trainer checkpoints, then the job queues again"[
                :MESSAGE_LIMIT
            ],
        )
    if active:
        return Observed(
            "Preempted", "Suspending", "Kueue suspended the Job; the trainer checkpoints and stops"
        )
    reserved = _conditions(workload).get("QuotaReserved")
    where = f"LocalQueue {queue} (namespace {ftj['metadata'].get('namespace')})"
    if workload is None:
        return Observed(
            "Queued", "WorkloadPending", f"waiting for Kueue to create the job's Workload in {where}"
        )
    if reserved is None or reserved.get("status") == "True":
        return Observed("Queued", "Admitting", f"Kueue is admitting the job in {where}")
    reason = reserved.get("reason") or "Pending"
    detail = reserved.get("message") or "no quota yet"
    requeued = (
        " (evicted before: it resumes from its checkpoint)" if _conditions(workload).get("Evicted") else ""
    )
    if reason == "Inadmissible":
        return Observed(
            "Queued",
            reason,
            f"Kueue cannot admit the job: {detail}; create {where} or set spec.queueName{requeued}"[
                :MESSAGE_LIMIT
            ],
        )
    return Observed("Queued", reason, f"waiting for Kueue in {where}: {detail}{requeued}"[:MESSAGE_LIMIT])


def observe(
    ftj: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    workload: dict[str, Any] | None = None,
) -> Observed:
    """The phase of the FineTuneJob from its Job, pods and (with Kueue) Workload."""
    spec = ftj.get("spec") or {}
    if job is None:
        return Observed("Pending", "JobCreating", "creating the training Job")
    if _true(job, "Complete") or _true(job, "SuccessCriteriaMet"):
        return Observed("Succeeded", "Succeeded", "training and export finished")
    if _true(job, "Failed") or _true(job, "FailureTarget"):
        reason, message = failure_message(job, pods)
        return Observed("Failed", reason, message)
    active = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")]
    if (job.get("spec") or {}).get("suspend"):
        queue = queue_of(ftj, job)
        if queue and not spec.get("suspend"):
            return observe_kueue(ftj, queue, workload, active)
        if active:
            return Observed("Suspended", "Suspending", "suspended: the trainer is checkpointing and stopping")
        return Observed(
            "Suspended", "Suspended", "suspended; set spec.suspend to false to resume from the checkpoint"
        )
    if any(_running(p) for p in pods):
        return Observed("Running", "Training", "the trainer is running")
    if not active and pods:
        ended = _between_pods(job, _by_age(pods)[-1])
        if ended is not None:
            return ended
    waiting = _waiting_reason(active)
    return Observed("Pending", "PodPending", f"waiting for the training pod{waiting}")


def _between_pods(job: dict[str, Any], newest: dict[str, Any]) -> Observed | None:
    """The phase while the newest pod has ended and the Job controller has not yet acted on it (no
    Complete/Failed condition, no replacement pod): decided by how the pod ended, so the phase does
    not flap to Pending for the moment between a pod's end and the Job's verdict."""
    term = _terminated(newest)
    if _true(newest, "DisruptionTarget") or (term and term.get("exitCode") == EXIT_INTERRUPTED):
        return Observed(
            "Pending", "Rescheduling", "the training pod was preempted; a new pod resumes from the checkpoint"
        )
    if term is None:
        return None
    code = term.get("exitCode")
    if code == 0:
        return Observed("Running", "Finishing", "the trainer finished; waiting for the Job to complete")
    if code == EXIT_CONFIG_ERROR:
        return Observed(
            "Failed",
            "ConfigError",
            f"the job's configuration is wrong (fix the spec, create a new job): {_failure_text(term)}",
        )
    limit = (job.get("spec") or {}).get("backoffLimit")
    return Observed(
        "Pending",
        "Retrying",
        f"the trainer exited with code {code}: {_failure_text(term)}; the Job retries "
        f"(backoffLimit {limit}) from the checkpoint",
    )


def _waiting_reason(pods: list[dict[str, Any]]) -> str:
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason"):
                return f" ({waiting['reason']}: {waiting.get('message') or ''})".replace(": )", ")")
        sched = _conditions(pod).get("PodScheduled")
        if sched and sched.get("status") == "False":
            return f" (unschedulable: {sched.get('message') or sched.get('reason')})"
    return ""


def count_preemptions(status: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """(preemptions, counted pod uids): each pod with a DisruptionTarget condition counts once, ever."""
    counted = list(status.get("preemptedPods") or [])
    total = int(status.get("preemptions") or 0)
    for pod in _by_age(pods):
        uid = pod["metadata"].get("uid")
        if uid and uid not in counted and _true(pod, "DisruptionTarget"):
            counted.append(uid)
            total += 1
    return total, counted[-PREEMPTED_PODS_KEPT:]


def _start_time(status: dict[str, Any], pods: list[dict[str, Any]]) -> str | None:
    if status.get("startTime"):
        return status["startTime"]
    started = []
    for pod in pods:
        running = _running(pod)
        term = _terminated(pod)
        when = (running or {}).get("startedAt") or (term or {}).get("startedAt")
        if when:
            started.append(when)
    return min(started) if started else None


def _completion_time(job: dict[str, Any], observed: Observed, now: datetime) -> str:
    done = (job.get("status") or {}).get("completionTime")
    if not done:
        cond = _true(job, "Complete") or _true(job, "Failed") or _true(job, "FailureTarget") or {}
        done = cond.get("lastTransitionTime")
    return done or rfc3339(now)


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class FinalOutputs:
    """What the trainer's final summary puts into status."""

    summary: dict[str, Any] | None
    """Its scalar figures."""
    artifacts: list[Any]
    dropped: list[tuple[str, str]]
    """(status field, URI) of each URI left out because it is outside the job's storage prefix."""


def _is_uri(key: str, value: Any) -> bool:
    return isinstance(value, str) and (key.endswith("Uri") or _URI.match(value) is not None)


def final_outputs(pods: list[dict[str, Any]], succeeded: bool, prefix: str | None = None) -> FinalOutputs:
    """The final summary's scalar figures and its artifacts, from the newest terminated pod. With
    `prefix` (the job's storage prefix) without any URI outside it, as for a progress report's
    (progress_server.uri_refusal): the summary is the pod's own word, and status must never point
    at another tenant's data. A summary field is a URI when its name ends in `Uri` or its value has
    a scheme (`s3://...`)."""
    for pod in reversed(_by_age(pods)):
        term = _terminated(pod)
        if term is None or (succeeded and term.get("exitCode") != 0):
            continue
        doc = parse_summary(term.get("message"))
        if doc is None:
            return FinalOutputs(None, [], [])
        scalars = {k: v for k, v in doc.items() if v is None or isinstance(v, str | int | float | bool)}
        artifacts = [
            {k: a[k] for k in ("name", "uri", "sizeBytes", "sha256")}
            for a in doc.get("artifacts") or []
            if isinstance(a, dict) and all(k in a for k in ("name", "uri", "sizeBytes", "sha256"))
        ]
        if prefix is None:
            return FinalOutputs(scalars, artifacts, [])
        dropped = [(f"summary.{k}", v) for k, v in scalars.items() if _is_uri(k, v) and not within(v, prefix)]
        dropped += [
            (f"artifacts[{i}].uri", str(a["uri"]))
            for i, a in enumerate(artifacts)
            if not (isinstance(a["uri"], str) and within(a["uri"], prefix))
        ]
        fields = {f for f, _ in dropped}
        scalars = {k: v for k, v in scalars.items() if f"summary.{k}" not in fields}
        artifacts = [a for i, a in enumerate(artifacts) if f"artifacts[{i}].uri" not in fields]
        return FinalOutputs(scalars, artifacts, dropped)
    return FinalOutputs(None, [], [])


def _condition(
    old: dict[str, dict[str, Any]],
    kind: str,
    *,
    true: bool,
    observed: Observed,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    status = "True" if true else "False"
    previous = old.get(kind)
    changed = previous is None or previous.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": observed.reason,
        "message": observed.message,
        "lastTransitionTime": rfc3339(now) if changed else previous.get("lastTransitionTime", rfc3339(now)),
        "observedGeneration": generation,
    }


def conditions_for(
    old: list[dict[str, Any]],
    observed: Observed,
    progress: dict[str, Any] | None,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Conditions per API conventions: each type always present, lastTransitionTime kept while its
    status does not change."""
    previous = {c.get("type"): c for c in old}
    phase = observed.phase
    out = [
        _condition(
            previous, "Ready", true=phase == "Succeeded", observed=observed, generation=generation, now=now
        ),
        _condition(
            previous, "Running", true=phase == "Running", observed=observed, generation=generation, now=now
        ),
        _condition(
            previous,
            "Suspended",
            true=phase == "Suspended",
            observed=observed,
            generation=generation,
            now=now,
        ),
        _condition(
            previous,
            "Succeeded",
            true=phase == "Succeeded",
            observed=observed,
            generation=generation,
            now=now,
        ),
        _condition(
            previous, "Failed", true=phase == "Failed", observed=observed, generation=generation, now=now
        ),
    ]
    failures = int((progress or {}).get("checkpointFailures") or 0)
    if failures or "CheckpointsFailing" in previous:
        failing = Observed(
            phase,
            "UploadFailed" if failures else "UploadOk",
            f"{failures} checkpoint uploads failed; the trainer keeps retrying"
            if failures
            else "checkpoints succeed",
        )
        out.append(
            _condition(
                previous,
                "CheckpointsFailing",
                true=failures > 0,
                observed=failing,
                generation=generation,
                now=now,
            )
        )
    return out


def is_newer_report(
    report: dict[str, Any], progress: dict[str, Any] | None, now: datetime | None = None
) -> bool:
    """Whether `report` is newer than what status.progress already shows (by the trainer's
    reportedAt; reports without a time never replace timed ones). A status time later than `now`
    plus the contract's clock skew is no time at all: written before reports were checked (a
    report dated 9999-12-31), it would otherwise make every real report look stale, forever."""
    reported = parse_time(report.get("reportedAt"))
    if reported is None:
        return False
    current = parse_time((progress or {}).get("updatedAt"))
    if current is not None and now is not None and current > now + MAX_CLOCK_SKEW:
        return True
    return current is None or reported > current


def progress_from_report(report: dict[str, Any]) -> dict[str, Any]:
    """status.progress from a trainer report (percent computed when the trainer left it out). A
    field the report leaves null keeps its value (a merge patch): a diverged loss leaves the last
    finite loss in place beside `diverged: true`."""
    progress = {
        ours: report[theirs] for theirs, ours in PROGRESS_FIELDS.items() if report.get(theirs) is not None
    }
    if "percent" not in progress and report.get("totalSteps"):
        progress["percent"] = round(100.0 * int(report.get("step") or 0) / int(report["totalSteps"]), 2)
    for key in ROUNDED:
        if isinstance(progress.get(key), float):
            progress[key] = round(progress[key], LOSS_DIGITS)
    progress["updatedAt"] = report["reportedAt"]
    return progress


def _record(entry: Any) -> dict[str, Any] | None:
    """A checkpoint of the trainer's history as status.checkpoints lists it; None when malformed."""
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("step"), int)
        or not isinstance(entry.get("uri"), str)
    ):
        return None
    out: dict[str, Any] = {"step": entry["step"], "uri": entry["uri"][:MESSAGE_LIMIT]}
    for key in ("trainLoss", "evalLoss"):
        if isinstance(entry.get(key), int | float) and not isinstance(entry.get(key), bool):
            out[key] = round(float(entry[key]), LOSS_DIGITS)
    if isinstance(entry.get("time"), str):
        out["time"] = entry["time"]
    return out


def _sample(entry: Any) -> dict[str, Any] | None:
    if not isinstance(entry, dict):
        return None
    out: dict[str, Any] = {
        k: str(entry[k])[:SAMPLE_CHARS]
        for k in ("prompt", "before", "after")
        if isinstance(entry.get(k), str)
    }
    if isinstance(entry.get("gguf"), dict):
        out["gguf"] = {str(k)[:16]: str(v)[:SAMPLE_CHARS] for k, v in list(entry["gguf"].items())[:6]}
    return out


def evaluation_from_report(report: dict[str, Any]) -> dict[str, Any]:
    """status.checkpoints, status.bestCheckpoint and status.samples from a report, where it has them."""
    out: dict[str, Any] = {}
    if isinstance(report.get("checkpoints"), list):
        records = [r for r in map(_record, report["checkpoints"]) if r is not None]
        out["checkpoints"] = sorted(records, key=lambda r: r["step"], reverse=True)[:HISTORY_LIMIT]
    best = _record(report.get("bestCheckpoint"))
    if best is not None:
        out["bestCheckpoint"] = best
    if isinstance(report.get("samples"), list) and report["samples"]:
        out["samples"] = [x for x in map(_sample, report["samples"][:SAMPLES_LIMIT]) if x is not None]
    return out


def checkpoint_from_report(report: dict[str, Any], current: dict[str, Any] | None) -> dict[str, Any] | None:
    """The report's newest complete checkpoint when it differs from status.checkpoint, else None."""
    ckpt = report.get("checkpoint")
    if not isinstance(ckpt, dict) or not all(ckpt.get(k) is not None for k in ("uri", "step", "time")):
        return None
    new = {"uri": ckpt["uri"], "step": int(ckpt["step"]), "time": ckpt["time"]}
    return None if current and {k: current.get(k) for k in new} == new else new


def checkpoint_from_summary(
    summary: dict[str, Any] | None, current: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The final summary's last complete checkpoint when status shows an older one (the trainer's
    last progress report, which carries it, is lost when the operator is down as the pod ends)."""
    if not summary or not summary.get("checkpointUri") or not isinstance(summary.get("checkpointStep"), int):
        return None
    if current and int(current.get("step") or 0) >= summary["checkpointStep"]:
        return None
    when = summary.get("checkpointTime") or summary.get("finishedAt")
    return {"uri": summary["checkpointUri"], "step": summary["checkpointStep"], "time": when}


def progress_patch(
    status: dict[str, Any], report: dict[str, Any] | None, now: datetime | None = None
) -> dict[str, Any]:
    """status fields a report changes (progress, checkpoint); empty when the report is stale.

    A pod that has not begun training (it reports step 0 while it loads and resumes) does not rewind
    the training figures a previous pod reached: only the trainer's phase and the time change until
    it trains again."""
    if not report or not is_newer_report(report, status.get("progress"), now):
        return {}
    progress = progress_from_report(report)
    current = status.get("progress") or {}
    # A pod that has not yet read its checkpoint's evaluations reports none: the job's eval figures
    # stay (they do not go away with a pod; an EvalLossImproved event must not fire again).
    progress |= {k: current[k] for k in EVAL_FIELDS if k in current and k not in progress}
    if report.get("phase") in STARTING_PHASES and int(current.get("step") or 0) > progress.get("step", 0):
        progress = {**current, "phase": progress.get("phase"), "updatedAt": progress["updatedAt"]}
    patch: dict[str, Any] = {"progress": progress}
    checkpoint = checkpoint_from_report(report, status.get("checkpoint"))
    if checkpoint:
        patch["checkpoint"] = checkpoint
    patch |= {k: v for k, v in evaluation_from_report(report).items() if status.get(k) != v}
    return patch


_SECRET_NAME = re.compile(r"""[Ss]ecret (?:[a-z0-9-]+/)?["']?([a-z0-9][a-z0-9.-]*)""")


def cannot_start(pods: list[dict[str, Any]]) -> tuple[str, datetime | None] | None:
    """(the kubelet's message, since when) while a pending pod cannot start its trainer because a
    Secret or a key it names is missing (CreateContainerConfigError; the kubelet keeps retrying)."""
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Pending" or pod["metadata"].get("deletionTimestamp"):
            continue
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") == "CreateContainerConfigError":
                since = parse_time(status.get("startTime") or pod["metadata"].get("creationTimestamp"))
                return str(waiting.get("message") or waiting["reason"])[:MESSAGE_LIMIT], since
    return None


def secret_missing(
    ftj: dict[str, Any],
    pods: list[dict[str, Any]],
    now: datetime,
    grace: float,
    secret_fields: dict[str, str],
) -> Observed | None:
    """Failed (SecretMissing) once a pod has been unable to start for `grace` seconds for want of a
    Secret or key; the message names the Secret and the spec field that refers to it (only names:
    a Secret's values never reach status)."""
    stuck = cannot_start(pods)
    if stuck is None or stuck[1] is None or (now - stuck[1]).total_seconds() < grace:
        return None
    message, _ = stuck
    match = _SECRET_NAME.search(message)
    field = secret_fields.get(match.group(1)) if match else None
    where = f" (named by {field})" if field else ""
    return Observed(
        "Failed",
        "SecretMissing",
        f"the training pod cannot start: {message}{where}; create the Secret in namespace "
        f"{ftj['metadata'].get('namespace')}, then create the job again",
    )


def gpus_of(ftj: dict[str, Any]) -> int:
    """GPUs the job's pod requests (spec.resources.gpus, default 1)."""
    gpus = ((ftj.get("spec") or {}).get("resources") or {}).get("gpus", 1)
    return int(gpus) if isinstance(gpus, int) else 1


def usage_rates(phase: str | None, gpus: int) -> tuple[float, float]:
    """(GPU-seconds, queued seconds) accrued per second in `phase`."""
    return (float(gpus) if phase == "Running" else 0.0, 1.0 if phase == "Queued" else 0.0)


def usage_now(status: dict[str, Any], gpus: int, now: datetime) -> dict[str, float]:
    """status.usage brought up to `now`: the time since accountedAt counts for the phase status
    shows (the phase that held all that time, as every phase change is written with its usage)."""
    now = now.replace(microsecond=0)  # accountedAt has whole seconds: the intervals tile exactly
    usage = status.get("usage") or {}
    gpu_seconds = float(usage.get("gpuSeconds") or 0.0)
    queued = float(usage.get("queuedSeconds") or 0.0)
    since = parse_time(usage.get("accountedAt"))
    if since is not None and now > since:
        elapsed = (now - since).total_seconds()
        gpu_rate, queue_rate = usage_rates(status.get("phase"), gpus)
        gpu_seconds += gpu_rate * elapsed
        queued += queue_rate * elapsed
    return {"gpuSeconds": round(gpu_seconds, 1), "queuedSeconds": round(queued, 1)}


def pod_create_failed(failure: PodCreateFailure, now: datetime, grace: float) -> Observed:
    """Pending while the Job controller cannot create the pod (the reason and the field to fix in
    status, not only in the Job's Events), Failed once that has lasted `grace` seconds."""
    since = parse_time(failure.since) or now
    waited = (now - since).total_seconds()
    if waited >= grace:
        return Observed(
            "Failed",
            failure.reason,
            f"the training pod could not be created for {waited:.0f}s: {failure.message}; fix "
            f"{failure.field}, then create the job again",
        )
    return Observed(
        "Pending",
        failure.reason,
        f"the training pod cannot be created: {failure.message}; fix {failure.field} (the job fails "
        f"if this lasts {grace:.0f}s, at {rfc3339(since + timedelta(seconds=grace))})",
    )


def derive_status(
    ftj: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    progress_report: dict[str, Any] | None,
    now: datetime,
    *,
    workload: dict[str, Any] | None = None,
    secret_grace: float | None = None,
    secret_fields: dict[str, str] | None = None,
    pod_failure: PodCreateFailure | None = None,
    pod_grace: float = 300.0,
    storage_prefix: str | None = None,
) -> dict[str, Any]:
    """A merge patch for `.status` (empty when nothing changed). `pods` are the Job's pods;
    `workload` its Kueue Workload, if any; `progress_report` the newest report from the trainer
    (ignored when not newer than status). With `secret_grace`, a pod unable to start for want of a
    Secret that long fails the job (`secret_fields`: Secret name -> the spec field naming it, for
    the message). `pod_failure`: why the Job controller cannot create the pod
    (refusals.pod_create_failure), failing the job after `pod_grace` seconds. `storage_prefix`: the
    job's own; URIs of the final summary outside it stay out of status (final_outputs).

    status.usage (GPU-seconds, time queued) is brought up to now whenever the patch writes anything
    else, and always at a phase change, so it never costs a write of its own."""
    status = dict(ftj.get("status") or {})
    generation = ftj["metadata"].get("generation")
    observed = observe(ftj, job, pods, workload)
    if observed.phase == "Pending" and secret_grace is not None:
        observed = secret_missing(ftj, pods, now, secret_grace, secret_fields or {}) or observed
    if observed.reason == "PodPending" and not pods and pod_failure is not None:
        observed = pod_create_failed(pod_failure, now, pod_grace)
    new: dict[str, Any] = {**progress_patch(status, progress_report, now)}
    progress = new.get("progress", status.get("progress"))
    new["phase"] = observed.phase
    new["message"] = observed.message
    new["observedGeneration"] = generation
    if job is not None:
        new["jobName"] = job["metadata"]["name"]
    new["conditions"] = conditions_for(status.get("conditions") or [], observed, progress, generation, now)
    preemptions, counted = count_preemptions(status, pods)
    evicted = _true(workload, "Evicted")
    if evicted and evicted.get("lastTransitionTime") != status.get("lastEvictionTime"):
        # Kueue deletes the pod through the Job's suspend (no DisruptionTarget): each eviction of the
        # Workload counts once, by its time, even when the pod was gone before a reconcile saw it.
        preemptions += 1
        new["lastEvictionTime"] = evicted.get("lastTransitionTime")
    new["preemptions"] = preemptions
    if counted:
        new["preemptedPods"] = counted
    start = _start_time(status, pods)
    if start:
        new["startTime"] = start
    if observed.phase in ("Succeeded", "Failed") and job is not None:
        new["completionTime"] = status.get("completionTime") or _completion_time(job, observed, now)
        if not status.get("summary"):
            final = final_outputs(pods, observed.phase == "Succeeded", storage_prefix)
            if final.summary:
                new["summary"] = final.summary
            if final.artifacts:
                new["artifacts"] = final.artifacts
    summary = new.get("summary") or status.get("summary") or {}
    final_checkpoint = checkpoint_from_summary(summary, status.get("checkpoint"))
    if observed.phase in ("Succeeded", "Failed") and final_checkpoint:
        new["checkpoint"] = final_checkpoint
    stopped = early_stop(observed, summary)
    if stopped is not None:
        new["message"] = stopped.message
        new["conditions"] = conditions_for(status.get("conditions") or [], stopped, progress, generation, now)
    if observed.phase == "Succeeded" and progress and progress.get("totalSteps"):
        # The last report may predate the final step (or never have arrived, when the operator was
        # down as the trainer finished); the Job's success and the trainer's summary are
        # authoritative, so step and loss never disagree with the summary. An early stop ends
        # before totalSteps: the summary's steps say where.
        total = int(progress["totalSteps"])
        step = summary["steps"] if isinstance(summary.get("steps"), int) else total
        final = {"step": step, "percent": round(100.0 * step / total, 2), "etaSeconds": 0}
        loss = summary.get("finalLoss")
        if isinstance(loss, int | float):
            final["loss"] = round(float(loss), LOSS_DIGITS)
        new["progress"] = {**progress, **final}
    patch = {k: v for k, v in new.items() if status.get(k) != v}
    if patch:
        patch["usage"] = {**usage_now(status, gpus_of(ftj), now), "accountedAt": rfc3339(now)}
    return patch


def early_stop(observed: Observed, summary: dict[str, Any]) -> Observed | None:
    """Succeeded, reason EarlyStopped, with the trainer's reason, when early stopping ended it."""
    if observed.phase != "Succeeded" or summary.get("exitReason") != "early-stopped":
        return None
    reason = str(summary.get("stopReason") or "eval loss stopped improving")[:MESSAGE_LIMIT]
    return Observed("Succeeded", "EarlyStopped", f"training and export finished; {reason}")


def invalid_status(
    ftj: dict[str, Any], field: str, message: str, now: datetime, reason: str = "InvalidSpec"
) -> dict[str, Any]:
    """Status patch for a job refused before any Job exists (operator limits: InvalidSpec; the
    platform's policy: NotAllowed), naming the field."""
    status = ftj.get("status") or {}
    generation = ftj["metadata"].get("generation")
    observed = Observed("Failed", reason, f"{field}: {message}")
    new = {
        "phase": "Failed",
        "message": observed.message,
        "observedGeneration": generation,
        "conditions": conditions_for(status.get("conditions") or [], observed, None, generation, now),
        "completionTime": status.get("completionTime") or rfc3339(now),
    }
    return {k: v for k, v in new.items() if status.get(k) != v}


def create_refused_status(ftj: dict[str, Any], field: str, message: str, now: datetime) -> dict[str, Any]:
    """Status patch while the API server refuses to create the Job for a reason that may pass (a
    quota on Jobs, an admission webhook): Pending, reason JobCreateRefused, naming the field."""
    status = ftj.get("status") or {}
    generation = ftj["metadata"].get("generation")
    observed = Observed("Pending", "JobCreateRefused", f"{message}; retrying (fix {field})")
    new = {
        "phase": "Pending",
        "message": observed.message,
        "observedGeneration": generation,
        "conditions": conditions_for(status.get("conditions") or [], observed, None, generation, now),
    }
    return {k: v for k, v in new.items() if status.get(k) != v}


def credentials_observed(error: CredentialsError, now: datetime, grace: float) -> Observed:
    """Pending while the job's storage credentials cannot be issued or written (the operator
    retries), Failed once that has lasted `grace` seconds (podCreateGraceSeconds: no pod can start
    without them, as with a pod the Job controller cannot create)."""
    since = error.since or now
    waited = (now - since).total_seconds()
    if waited >= grace:
        message = (
            f"the job's storage credentials could not be provided for {waited:.0f}s: {error.message}; "
            "then create the job again"
        )
        return Observed("Failed", error.reason, message[:MESSAGE_LIMIT])
    deadline = rfc3339(since + timedelta(seconds=grace))
    message = f"{error.message}; retrying (the job fails if this lasts {grace:.0f}s, at {deadline})"
    return Observed("Pending", error.reason, message[:MESSAGE_LIMIT])


def credentials_status(
    ftj: dict[str, Any], error: CredentialsError, now: datetime, grace: float
) -> dict[str, Any]:
    """Status patch for a job without a Job whose storage credentials failed: Pending with the
    reason and what to fix, Failed once that has lasted `grace` seconds."""
    status = ftj.get("status") or {}
    generation = ftj["metadata"].get("generation")
    observed = credentials_observed(error, now, grace)
    new = {
        "phase": observed.phase,
        "message": observed.message,
        "observedGeneration": generation,
        "conditions": conditions_for(status.get("conditions") or [], observed, None, generation, now),
    }
    if observed.phase == "Failed":
        new["completionTime"] = status.get("completionTime") or rfc3339(now)
    return {k: v for k, v in new.items() if status.get(k) != v}


def transition(old: dict[str, Any], patch: dict[str, Any]) -> tuple[str | None, str | None] | None:
    """(old phase, new phase) when `patch` changes the phase, else None (for events and metrics)."""
    if "phase" in patch and patch["phase"] != old.get("phase"):
        return old.get("phase"), patch["phase"]
    return None
