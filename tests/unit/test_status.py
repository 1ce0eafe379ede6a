"""Status derivation: phases, conditions, failure messages, preemption counting, stale progress,
storage credentials that fail, and summary URIs outside the job's prefix."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from finetune_operator.credentials import CredentialsError
from finetune_operator.events import uris_dropped_event
from finetune_operator.status import (
    credentials_status,
    derive_status,
    final_outputs,
    invalid_status,
    progress_patch,
    transition,
)
from finetune_trainer.errors import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
T0 = "2025-03-01T11:00:00Z"


def ftj(status: dict | None = None, generation: int = 1, **spec: object) -> dict:
    return {
        "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": generation},
        "spec": {"model": {"hub": "unsloth/x"}, "data": {"hub": "o/d"}, **spec},
        "status": status or {},
    }


def job(suspend: bool = False, conditions: list | None = None, **spec: object) -> dict:
    return {
        "metadata": {"name": "j", "namespace": "ns"},
        "spec": {"suspend": suspend, "backoffLimit": 3, **spec},
        "status": {"conditions": conditions or []},
    }


def cond(kind: str, reason: str = "", status: str = "True") -> dict:
    return {"type": kind, "status": status, "reason": reason, "lastTransitionTime": T0}


def pod(
    uid: str = "p1",
    *,
    phase: str = "Running",
    running: bool = True,
    exit_code: int | None = None,
    message: str | None = None,
    conditions: list | None = None,
    created: str = T0,
) -> dict:
    state: dict = {}
    if running:
        state = {"running": {"startedAt": created}}
    elif exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "message": message, "startedAt": created}}
    return {
        "metadata": {"name": f"j-{uid}", "uid": uid, "creationTimestamp": created},
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


def apply(obj: dict, patch: dict) -> dict:
    return {**obj, "status": {**obj["status"], **patch}}


def by_type(status: dict) -> dict:
    return {c["type"]: c for c in status["conditions"]}


def test_lifecycle_pending_running_succeeded() -> None:
    f = ftj()
    p = derive_status(f, None, [], None, NOW)
    assert p["phase"] == "Pending"
    f = apply(f, p)
    p = derive_status(f, job(), [pod(phase="Pending", running=False)], None, NOW)
    assert "phase" not in p and p["jobName"] == "j" and by_type(p)["Running"]["reason"] == "PodPending"
    f = apply(f, p)
    p = derive_status(f, job(), [pod()], None, NOW)
    assert p["phase"] == "Running" and p["startTime"] == T0
    assert transition(f["status"], p) == ("Pending", "Running")
    f = apply(f, p)
    summary = {
        "exitReason": "Completed",
        "steps": 60,
        "finalLoss": 1.2,
        "artifacts": [{"name": "adapter", "uri": "s3://b/a", "sizeBytes": 10, "sha256": "ab" * 32}],
    }
    done = pod(phase="Succeeded", running=False, exit_code=0, message=json.dumps(summary))
    p = derive_status(f, job(conditions=[cond("Complete")]), [done], None, NOW)
    assert p["phase"] == "Succeeded"
    assert p["completionTime"] == T0
    assert p["summary"] == {"exitReason": "Completed", "steps": 60, "finalLoss": 1.2}
    assert p["artifacts"] == summary["artifacts"]
    conds = by_type(apply(f, p)["status"])
    assert conds["Succeeded"]["status"] == "True" and conds["Ready"]["status"] == "True"
    assert conds["Running"]["status"] == "False"


def test_no_change_no_patch_and_transition_times_kept() -> None:
    f = apply(ftj(), derive_status(ftj(), job(), [pod()], None, NOW))
    assert derive_status(f, job(), [pod()], None, NOW + timedelta(minutes=5)) == {}
    running_since = by_type(f["status"])["Running"]["lastTransitionTime"]
    later = NOW + timedelta(hours=1)
    f2 = apply(f, derive_status(f, job(suspend=True), [], None, later))
    assert by_type(f2["status"])["Running"]["lastTransitionTime"] != running_since
    assert (
        by_type(f2["status"])["Failed"]["lastTransitionTime"]
        == by_type(f["status"])["Failed"]["lastTransitionTime"]
    )


def test_conditions_carry_observed_generation() -> None:
    f = apply(ftj(), derive_status(ftj(), job(), [pod()], None, NOW))
    f["metadata"]["generation"] = 2
    p = derive_status(f, job(), [pod()], None, NOW)
    assert p["observedGeneration"] == 2
    assert {c["observedGeneration"] for c in p["conditions"]} == {2}


def test_suspended_and_kueue_queued() -> None:
    p = derive_status(ftj(suspend=True), job(suspend=True), [pod()], None, NOW)
    assert (p["phase"], by_type(p)["Suspended"]["reason"]) == ("Suspended", "Suspending")
    p = derive_status(ftj(suspend=True), job(suspend=True), [], None, NOW)
    assert (p["phase"], by_type(p)["Suspended"]["reason"]) == ("Suspended", "Suspended")
    p = derive_status(ftj(queueName="q"), job(suspend=True), [], None, NOW)
    assert (p["phase"], by_type(p)["Running"]["reason"]) == ("Queued", "WorkloadPending")


def queued_job(suspend: bool, queue: str = "team-a") -> dict:
    j = job(suspend=suspend)
    j["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": queue}
    return j


def workload(*conditions: dict) -> dict:
    return {"metadata": {"name": "job-j-1"}, "status": {"conditions": list(conditions)}}


def kcond(kind: str, status: str, reason: str, message: str) -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": T0}


PREEMPTED = (
    "Preempted to accommodate a workload (UID: w2, JobUID: j2) due to prioritization in the ClusterQueue"
)


def test_kueue_lifecycle_queued_running_preempted_queued_running() -> None:
    """A job whose Job carries a queue label (the platform's default queue here: the spec names
    none) through Kueue's states, as its Workload shows them."""
    f = ftj()
    # Waiting: Kueue's own reason and message.
    wait = kcond(
        "QuotaReserved",
        "False",
        "Pending",
        "couldn't assign flavors to pod set main: "
        "insufficient unused quota for nvidia.com/gpu in flavor gpu, 1 more needed",
    )
    p = derive_status(f, queued_job(True), [], None, NOW, workload=workload(wait))
    assert p["phase"] == "Queued" and by_type(p)["Running"]["reason"] == "Pending"
    assert "LocalQueue team-a" in p["message"] and "1 more needed" in p["message"]
    f = apply(f, p)
    # Admitted: Kueue unsuspends the Job, the pod runs.
    admitted = workload(
        kcond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpu"),
        kcond("Admitted", "True", "Admitted", "The workload is admitted"),
    )
    t1 = NOW + timedelta(seconds=30)
    p = derive_status(f, queued_job(False), [pod()], None, t1, workload=admitted)
    assert p["phase"] == "Running" and p["usage"]["queuedSeconds"] == 30.0
    assert transition(f["status"], p) == ("Queued", "Running")
    f = apply(f, p)
    # Preempted: Evicted (reason Preempted) while the pod stops; the Event carries Kueue's message.
    evicted = workload(*admitted["status"]["conditions"], kcond("Evicted", "True", "Preempted", PREEMPTED))
    t2 = t1 + timedelta(seconds=100)
    stopping = pod(phase="Running")
    p = derive_status(f, queued_job(True), [stopping], None, t2, workload=evicted)
    assert p["phase"] == "Preempted" and by_type(p)["Running"]["reason"] == "Preempted"
    assert PREEMPTED in p["message"] and p["preemptions"] == 1
    assert p["usage"] == {"gpuSeconds": 100.0, "queuedSeconds": 30.0, "accountedAt": "2025-03-01T12:02:10Z"}
    f = apply(f, p)
    assert derive_status(f, queued_job(True), [stopping], None, t2, workload=evicted) == {}  # counted once
    # The pod is gone, the quota released: Queued again (still evicted: says it resumes).
    requeued = workload(
        kcond("QuotaReserved", "False", "Pending", PREEMPTED),
        kcond("Evicted", "True", "Preempted", PREEMPTED),
    )
    t3 = t2 + timedelta(seconds=5)
    p = derive_status(f, queued_job(True), [], None, t3, workload=requeued)
    assert p["phase"] == "Queued" and "resumes from its checkpoint" in p["message"]
    assert p["usage"]["gpuSeconds"] == 100.0 and "preemptions" not in p  # unchanged
    f = apply(f, p)
    # Admitted again: Running; nothing counted twice, time queued added.
    t4 = t3 + timedelta(seconds=20)
    p = derive_status(f, queued_job(False), [pod("p2")], None, t4, workload=admitted)
    assert p["phase"] == "Running" and p["usage"]["queuedSeconds"] == 50.0
    assert f["status"]["preemptions"] == 1 and "preemptions" not in p


def test_kueue_missing_local_queue_names_it() -> None:
    missing = kcond("QuotaReserved", "False", "Inadmissible", "LocalQueue nosuch doesn't exist")
    p = derive_status(
        ftj(queueName="nosuch"), queued_job(True, "nosuch"), [], None, NOW, workload=workload(missing)
    )
    assert p["phase"] == "Queued" and by_type(p)["Running"]["reason"] == "Inadmissible"
    assert "LocalQueue nosuch doesn't exist" in p["message"]
    assert "create LocalQueue nosuch (namespace ns)" in p["message"]


def test_usage_is_written_only_with_other_changes() -> None:
    f = apply(ftj(), derive_status(ftj(), job(), [pod()], None, NOW))
    assert f["status"]["usage"] == {
        "gpuSeconds": 0.0,
        "queuedSeconds": 0.0,
        "accountedAt": "2025-03-01T12:00:00Z",
    }
    later = NOW + timedelta(seconds=40, microseconds=700_000)
    assert derive_status(f, job(), [pod()], None, later) == {}  # nothing else changed: no write
    report = {"step": 3, "totalSteps": 10, "loss": 1.5, "reportedAt": "2025-03-01T12:00:40Z"}
    p = derive_status(f, job(), [pod()], report, later)
    assert p["usage"]["gpuSeconds"] == 40.0  # 1 GPU x 40 s (whole seconds: intervals tile exactly)
    f2 = ftj(resources={"gpus": 4})
    f2 = apply(f2, derive_status(f2, job(), [pod()], None, NOW))
    assert derive_status(f2, job(), [pod()], report, later)["usage"]["gpuSeconds"] == 160.0


def test_config_error_names_the_field_from_the_termination_message() -> None:
    message = json.dumps({"exitReason": "ConfigError", "message": "spec.data.path: no such file /x.jsonl"})
    failed = pod(phase="Failed", running=False, exit_code=EXIT_CONFIG_ERROR, message=message)
    p = derive_status(ftj(), job(conditions=[cond("Failed", "PodFailurePolicy")]), [failed], None, NOW)
    assert p["phase"] == "Failed"
    assert by_type(p)["Failed"]["reason"] == "ConfigError"
    assert "spec.data.path: no such file /x.jsonl" in p["message"]


def test_backoff_and_deadline_messages() -> None:
    crash = pod(phase="Failed", running=False, exit_code=1, message="CUDA out of memory")
    p = derive_status(ftj(), job(conditions=[cond("Failed", "BackoffLimitExceeded")]), [crash], None, NOW)
    assert "backoffLimit (3)" in p["message"] and "exit code 1: CUDA out of memory" in p["message"]
    p = derive_status(
        ftj(), job(conditions=[cond("Failed", "DeadlineExceeded")], activeDeadlineSeconds=600), [], None, NOW
    )
    assert by_type(p)["Failed"]["reason"] == "DeadlineExceeded" and "(600)" in p["message"]


def test_preemption_counted_once_per_pod_across_restarts() -> None:
    evicted = pod(
        "p1", phase="Failed", running=False, exit_code=EXIT_INTERRUPTED, conditions=[cond("DisruptionTarget")]
    )
    f = ftj()
    p = derive_status(f, job(), [evicted], None, NOW)
    assert p["preemptions"] == 1 and p["phase"] == "Pending"
    f = apply(f, p)
    # Seen again (another event, or a restarted operator reading status): not recounted.
    assert "preemptions" not in derive_status(f, job(), [evicted], None, NOW)
    p = derive_status(f, job(), [evicted, pod("p2", created="2025-03-01T11:30:00Z")], None, NOW)
    assert "preemptions" not in p and p["phase"] == "Running"
    f = apply(f, p)
    evicted2 = pod("p2", phase="Failed", running=False, exit_code=143, conditions=[cond("DisruptionTarget")])
    assert derive_status(f, job(), [evicted2], None, NOW)["preemptions"] == 2
    # A pod that simply failed (no DisruptionTarget) is no preemption.
    crashed = pod("p3", phase="Failed", running=False, exit_code=1)
    assert "preemptions" not in derive_status(f, job(), [evicted, crashed], None, NOW)


def report(step: int, at: str, sequence: int = 1, checkpoint: dict | None = None) -> dict:
    return {
        "phase": "Training",
        "step": step,
        "totalSteps": 60,
        "loss": 1.5,
        "learningRate": 2e-4,
        "tokensPerSecond": 100.0,
        "etaSeconds": 30.0,
        "gpuMemoryGiB": 1.5,
        "checkpoint": checkpoint,
        "checkpointFailures": 0,
        "sequence": sequence,
        "reportedAt": at,
    }


def test_progress_from_reports_and_stale_reports_ignored() -> None:
    f = apply(ftj(), derive_status(ftj(), job(), [pod()], None, NOW))
    ckpt = {"uri": "s3://b/ns/j/step-00000010", "step": 10, "time": "2025-03-01T11:59:00Z"}
    p = derive_status(f, job(), [pod()], report(12, "2025-03-01T11:59:30.5Z", 7, ckpt), NOW)
    assert p["progress"]["step"] == 12 and p["progress"]["percent"] == 20.0
    assert p["progress"]["gpuMemoryGib"] == 1.5 and p["progress"]["phase"] == "Training"
    assert p["progress"]["updatedAt"] == "2025-03-01T11:59:30.5Z"
    assert p["checkpoint"] == ckpt
    f = apply(f, p)
    # An older report (delayed, or from a replica that received it late) changes nothing.
    assert derive_status(f, job(), [pod()], report(11, "2025-03-01T11:59:25Z", 6), NOW) == {}
    assert progress_patch(f["status"], report(13, "2025-03-01T11:59:30.5Z", 8)) == {}
    assert progress_patch(f["status"], {"step": 99}) == {}
    # A resumed pod's first report is newer, even with a lower step and sequence.
    p = progress_patch(f["status"], report(10, "2025-03-01T12:01:00Z", 1, ckpt))
    assert p["progress"]["step"] == 10 and "checkpoint" not in p


def test_batch_plan_reaches_status() -> None:
    """The step split is decided in the pod (`microBatches: auto`); status shows the choice and why."""
    f = apply(ftj(), derive_status(ftj(), job(), [pod()], None, NOW))
    plan = {
        "batchSize": 8,
        "gradientAccumulationSteps": 1,
        "batchPlan": "8 rows per step (batchSize 2 x gradientAccumulationSteps 4) run as 1 micro-batch",
    }
    p = derive_status(f, job(), [pod()], {**report(3, "2025-03-01T11:59:30Z"), **plan}, NOW)
    assert {k: p["progress"][k] for k in plan} == plan


def test_checkpoint_failures_condition() -> None:
    f = apply(ftj(), derive_status(ftj(), job(), [pod()], None, NOW))
    bad = {**report(5, "2025-03-01T11:59:30Z"), "checkpointFailures": 2}
    p = derive_status(f, job(), [pod()], bad, NOW)
    assert by_type(p)["CheckpointsFailing"]["status"] == "True"


def test_succeeded_shows_full_progress() -> None:
    f = apply(ftj(), {"phase": "Running", "progress": {"step": 58, "totalSteps": 60, "updatedAt": T0}})
    done = pod(phase="Succeeded", running=False, exit_code=0, message="{}")
    p = derive_status(f, job(conditions=[cond("Complete")]), [done], None, NOW)
    assert p["progress"]["step"] == 60 and p["progress"]["percent"] == 100.0


def test_succeeded_progress_loss_is_the_summary_final_loss() -> None:
    """The trainer's last report can be lost (operator down as it finished): status must not show
    step 60 next to the loss of step 58."""
    f = apply(
        ftj(), {"phase": "Running", "progress": {"step": 58, "totalSteps": 60, "loss": 1.9, "updatedAt": T0}}
    )
    done = pod(phase="Succeeded", running=False, exit_code=0, message=json.dumps({"finalLoss": 1.23456789}))
    p = derive_status(f, job(conditions=[cond("Complete")]), [done], None, NOW)
    assert p["progress"]["loss"] == 1.2346 and p["summary"]["finalLoss"] == 1.23456789


def test_invalid_status_names_field() -> None:
    p = invalid_status(ftj(), "spec.resources.gpus", "5 GPUs requested; at most 4", NOW)
    assert p["phase"] == "Failed" and p["message"].startswith("spec.resources.gpus:")
    assert by_type(p)["Failed"]["reason"] == "InvalidSpec"


def test_resumed_pod_starting_does_not_rewind_progress() -> None:
    """A new pod reports step 0 while it imports, preflights and loads; status keeps the step the
    previous pod reached until the new one trains (then its resumed step shows, even if lower)."""
    f = apply(ftj(), {"phase": "Running", "progress": {**report(12, T0), "updatedAt": T0}})
    starting = {**report(0, "2025-03-01T11:30:00Z"), "phase": "Preflight", "loss": None, "totalSteps": None}
    p = progress_patch(f["status"], starting)
    assert p["progress"]["step"] == 12 and p["progress"]["loss"] == 1.5
    assert p["progress"]["phase"] == "Preflight" and p["progress"]["updatedAt"] == "2025-03-01T11:30:00Z"
    f = apply(f, p)
    p = progress_patch(f["status"], report(10, "2025-03-01T11:31:00Z"))
    assert p["progress"]["step"] == 10 and p["progress"]["phase"] == "Training"
    # A first pod's starting report shows as it is.
    assert progress_patch({}, starting)["progress"]["step"] == 0


def test_loss_rounded_for_kubectl() -> None:
    p = progress_patch({}, {**report(3, T0), "loss": 5.2855024337768555})
    assert p["progress"]["loss"] == 5.2855


def test_no_phase_flap_between_pod_end_and_job_verdict() -> None:
    """The Job controller sets Complete/Failed a moment after the pod ends; meanwhile the phase
    follows how the pod ended instead of falling back to Pending."""
    f = apply(ftj(), {"phase": "Running"})
    done = pod(phase="Succeeded", running=False, exit_code=0, message="{}")
    p = derive_status(f, job(), [done], None, NOW)
    assert "phase" not in p and by_type(p)["Running"]["reason"] == "Finishing"
    bad = pod(phase="Failed", running=False, exit_code=EXIT_CONFIG_ERROR, message="data.columns: no 'output'")
    p = derive_status(f, job(), [bad], None, NOW)
    assert p["phase"] == "Failed" and "data.columns: no 'output'" in p["message"]
    crashed = pod(phase="Failed", running=False, exit_code=1, message="RuntimeError: boom")
    p = derive_status(f, job(), [crashed], None, NOW)
    assert p["phase"] == "Pending" and by_type(p)["Running"]["reason"] == "Retrying"
    assert "code 1: RuntimeError: boom" in p["message"] and "backoffLimit 3" in p["message"]
    stopped = pod(phase="Failed", running=False, exit_code=EXIT_INTERRUPTED)
    assert by_type(derive_status(f, job(), [stopped], None, NOW))["Running"]["reason"] == "Rescheduling"
    # An old preempted pod does not hide that its replacement is simply pending.
    evicted = pod("p1", phase="Failed", running=False, exit_code=137, conditions=[cond("DisruptionTarget")])
    waiting = pod("p2", phase="Pending", running=False, created="2025-03-01T11:05:00Z")
    p = derive_status(f, job(), [evicted, waiting], None, NOW)
    assert by_type(p)["Running"]["reason"] == "PodPending"


def waiting_pod(message: str, created: str = T0) -> dict:
    p = pod(phase="Pending", running=False, created=created)
    p["status"]["containerStatuses"][0]["state"] = {
        "waiting": {"reason": "CreateContainerConfigError", "message": message}
    }
    return p


def test_a_missing_secret_fails_the_job_after_the_grace_period_naming_secret_and_field() -> None:
    stuck = waiting_pod('secret "hub-token" not found')  # the kubelet's words
    fields = {"hub-token": "spec.model.tokenSecretRef"}
    early = derive_status(ftj(), job(), [stuck], None, NOW, secret_grace=7200, secret_fields=fields)
    assert early["phase"] == "Pending"
    assert "CreateContainerConfigError" in early["message"]

    p = derive_status(ftj(), job(), [stuck], None, NOW, secret_grace=60, secret_fields=fields)
    assert p["phase"] == "Failed"
    assert by_type(p)["Failed"]["reason"] == "SecretMissing"
    assert 'secret "hub-token" not found (named by spec.model.tokenSecretRef)' in p["message"]
    assert "completionTime" in p


def test_a_missing_key_names_the_secret_too() -> None:
    stuck = waiting_pod("couldn't find key AWS_SECRET_ACCESS_KEY in Secret ns/finetune-s3")
    fields = {"finetune-s3": "spec.storage.credentialsSecret"}
    p = derive_status(ftj(), job(), [stuck], None, NOW, secret_grace=0, secret_fields=fields)
    assert p["phase"] == "Failed"
    assert "AWS_SECRET_ACCESS_KEY" in p["message"] and "spec.storage.credentialsSecret" in p["message"]


def test_without_a_grace_period_a_missing_secret_only_waits() -> None:
    p = derive_status(ftj(), job(), [waiting_pod('secret "s" not found')], None, NOW)
    assert p["phase"] == "Pending"


def test_final_checkpoint_from_the_summary() -> None:
    """Status shows the last checkpoint even when the report carrying it never arrived."""
    old = {"uri": "s3://b/ns/j/checkpoints/step-00000036/", "step": 36, "time": T0}
    f = apply(
        ftj(),
        {"phase": "Running", "checkpoint": old, "progress": {"step": 38, "totalSteps": 40, "updatedAt": T0}},
    )
    summary = {
        "finalLoss": 1.5,
        "checkpointUri": "s3://b/ns/j/checkpoints/step-00000040/",
        "checkpointStep": 40,
        "checkpointTime": "2025-03-01T11:59:00Z",
    }
    done = pod(phase="Succeeded", running=False, exit_code=0, message=json.dumps(summary))
    p = derive_status(f, job(conditions=[cond("Complete")]), [done], None, NOW)
    assert p["checkpoint"] == {"uri": summary["checkpointUri"], "step": 40, "time": "2025-03-01T11:59:00Z"}
    # Already shown (the report arrived): nothing to change.
    f = apply(f, {"checkpoint": p["checkpoint"]})
    assert "checkpoint" not in derive_status(f, job(conditions=[cond("Complete")]), [done], None, NOW)


def history_entry(step: int, eval_loss: float | None) -> dict:
    return {
        "step": step,
        "trainLoss": 2.0,
        "evalLoss": eval_loss,
        "time": T0,
        "uri": f"s3://b/ns/j/checkpoints/step-{step:08d}/",
    }


def test_eval_figures_checkpoint_history_and_best_reach_status() -> None:
    f = apply(ftj(), derive_status(ftj(), job(), [pod()], None, NOW))
    history = [history_entry(s, 3.0 - s / 10) for s in range(2, 30, 2)]  # 14, oldest first
    evals = {
        "evalLoss": 1.23456789,
        "evalStep": 28,
        "bestEvalLoss": 1.2,
        "bestEvalStep": 28,
        "evalsSinceBest": 0,
    }
    sent = {
        **report(28, "2025-03-01T11:59:30Z"),
        **evals,
        "checkpoints": history,
        "bestCheckpoint": history[-1],
    }
    p = derive_status(f, job(), [pod()], sent, NOW)
    assert p["progress"]["evalLoss"] == 1.2346 and p["progress"]["bestEvalStep"] == 28
    assert [c["step"] for c in p["checkpoints"]] == list(range(28, 8, -2))  # the newest 10, newest first
    assert p["checkpoints"][0] == {**history[-1], "evalLoss": 0.2}
    assert p["bestCheckpoint"]["step"] == 28
    # A malformed entry is dropped, not written.
    bad = {**sent, "reportedAt": "2025-03-01T11:59:40Z", "checkpoints": [{"step": "x"}, history[0]]}
    assert [c["step"] for c in progress_patch(apply(f, p)["status"], bad)["checkpoints"]] == [2]


def test_a_resumed_pod_without_evaluations_yet_keeps_the_eval_figures() -> None:
    progress = {"step": 20, "totalSteps": 60, "evalLoss": 1.5, "bestEvalLoss": 1.4, "updatedAt": T0}
    f = apply(ftj(), {"phase": "Running", "progress": progress})
    p = progress_patch(f["status"], report(20, "2025-03-01T12:00:30Z"))
    assert p["progress"]["evalLoss"] == 1.5 and p["progress"]["bestEvalLoss"] == 1.4


def test_early_stop_succeeds_with_the_reason_and_the_steps_it_ran() -> None:
    progress = {"step": 30, "totalSteps": 60, "updatedAt": T0}
    f = apply(ftj(), {"phase": "Running", "progress": progress})
    reason = "stopped early at step 30: eval loss did not improve for 3 evaluations (best 1.2 at step 18)"
    summary = {"exitReason": "early-stopped", "stopReason": reason, "steps": 30, "finalLoss": 0.5}
    done = pod(phase="Succeeded", running=False, exit_code=0, message=json.dumps(summary))
    p = derive_status(f, job(conditions=[cond("Complete")]), [done], None, NOW)
    assert p["phase"] == "Succeeded" and reason in p["message"]
    assert by_type(p)["Succeeded"]["reason"] == "EarlyStopped" and by_type(p)["Ready"]["status"] == "True"
    assert p["progress"]["step"] == 30 and p["progress"]["percent"] == 50.0


def test_kueue_eviction_counts_once_even_when_the_pod_was_gone_unseen() -> None:
    """The operator may first look after the evicted pod is gone: the job is then Queued at once,
    and the eviction still counts (once, by the Evicted condition's time)."""
    f = apply(
        ftj(queueName="gpu"), derive_status(ftj(queueName="gpu"), queued_job(False), [pod()], None, NOW)
    )
    evicted = kcond("Evicted", "True", "Preempted", PREEMPTED)
    requeued = workload(kcond("QuotaReserved", "False", "Pending", PREEMPTED), evicted)
    p = derive_status(f, queued_job(True), [], None, NOW, workload=requeued)
    assert p["phase"] == "Queued" and p["preemptions"] == 1 and p["lastEvictionTime"] == T0
    f = apply(f, p)
    assert "preemptions" not in derive_status(f, queued_job(True), [pod("p2")], None, NOW, workload=requeued)
    # A second eviction, later, counts again.
    again = workload({**evicted, "lastTransitionTime": "2025-03-01T11:30:00Z"})
    assert derive_status(f, queued_job(True), [], None, NOW, workload=again)["preemptions"] == 2


def test_data_parallel_progress_shows_each_ranks_gpu_memory() -> None:
    f = apply(ftj(), derive_status(ftj(), job(), [pod()], None, NOW))
    sent = {**report(5, "2025-03-01T11:59:30Z"), "gpuMemoryGiB": 21.5, "gpuMemoryPerRankGiB": [21.5, 20.9]}
    p = derive_status(f, job(), [pod()], {**sent, "ranks": 2}, NOW)
    assert p["progress"]["ranks"] == 2
    assert p["progress"]["gpuMemoryPerRankGib"] == [21.5, 20.9]
    assert p["progress"]["gpuMemoryGib"] == 21.5


def test_storage_credentials_failing_is_pending_with_the_reason_then_failed_after_the_grace() -> None:
    error = CredentialsError(
        "StorageCredentialsFailed",
        "storage.sts: AssumeRole of arn:minio:iam:::role/finetune-operator at http://minio:9000 failed "
        "(InvalidClientTokenId: The security token included in the request is invalid)",
        since=NOW - timedelta(seconds=100),
    )
    p = credentials_status(ftj(), error, NOW, grace=300)
    assert p["phase"] == "Pending" and "completionTime" not in p
    assert by_type(p)["Failed"] == {**by_type(p)["Failed"], "status": "False", "reason": error.reason}
    assert (
        p["message"]
        == f"{error.message}; retrying (the job fails if this lasts 300s, at 2025-03-01T12:03:20Z)"
    )
    # Retried while it lasts: the same message (its deadline fixed by `since`), nothing to write.
    f = apply(ftj(), p)
    assert credentials_status(f, error, NOW + timedelta(seconds=60), grace=300) == {}

    done = credentials_status(f, error, NOW + timedelta(seconds=200), grace=300)
    assert done["phase"] == "Failed" and done["completionTime"] == "2025-03-01T12:03:20Z"
    assert by_type(done)["Failed"]["status"] == "True"
    assert by_type(done)["Failed"]["reason"] == "StorageCredentialsFailed"
    assert done["message"] == (
        f"the job's storage credentials could not be provided for 300s: {error.message}; "
        "then create the job again"
    )


def test_summary_uris_outside_the_jobs_prefix_stay_out_of_status_and_are_named() -> None:
    own = "s3://b/jobs/ns/j"
    summary = {
        "exitReason": "completed",
        "finalLoss": 1.2,
        "adapterUri": "s3://b/jobs/ns/other/export/adapter/",  # another job of the namespace
        "mergedUri": f"{own}/export/merged/",
        "exportedTo": "s3://b/jobs/team-b/b1/export/",  # any field holding a URI
        "checkpointUri": f"{own}/../b1/checkpoints/step-00000040/",
        "checkpointStep": 40,
        "message": "done",
        "artifacts": [
            {"name": "adapter", "uri": f"{own}/export/adapter/", "sizeBytes": 10, "sha256": "ab" * 32},
            {
                "name": "gguf",
                "uri": "s3://b/jobs/ns/j0/export/model.gguf",
                "sizeBytes": 9,
                "sha256": "cd" * 32,
            },
            {"name": "merged", "uri": f"{own}/export/merged/", "sizeBytes": 8, "sha256": "ef" * 32},
        ],
    }
    done = pod(phase="Succeeded", running=False, exit_code=0, message=json.dumps(summary))
    final = final_outputs([done], True, own)
    assert final.dropped == [
        ("summary.adapterUri", summary["adapterUri"]),
        ("summary.exportedTo", summary["exportedTo"]),
        ("summary.checkpointUri", summary["checkpointUri"]),
        ("artifacts[1].uri", "s3://b/jobs/ns/j0/export/model.gguf"),
    ]
    p = derive_status(ftj(), job(conditions=[cond("Complete")]), [done], None, NOW, storage_prefix=own)
    assert p["phase"] == "Succeeded"
    assert p["summary"] == {
        "exitReason": "completed",
        "finalLoss": 1.2,
        "mergedUri": f"{own}/export/merged/",
        "checkpointStep": 40,
        "message": "done",
    }
    assert [a["name"] for a in p["artifacts"]] == ["adapter", "merged"]
    assert "checkpoint" not in p  # the summary's checkpoint pointed elsewhere
    # Without a prefix (nothing to check against) the summary is shown as the trainer wrote it.
    assert final_outputs([done], True).dropped == []

    warning = uris_dropped_event(ftj(), final.dropped, own, NOW)
    assert warning is not None and warning["type"] == "Warning" and warning["reason"] == "UriOutsideJobPrefix"
    assert warning["message"].startswith(
        f"left out of status: summary.adapterUri '{summary['adapterUri']}', "
    )
    assert warning["message"].endswith(
        f"artifacts[1].uri 's3://b/jobs/ns/j0/export/model.gguf': not under the job's storage prefix {own}"
    )
    assert uris_dropped_event(ftj(), [], own, NOW) is None
