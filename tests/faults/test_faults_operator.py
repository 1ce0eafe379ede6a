"""Faults around the operator, short forms (the long forms, at 1,000 jobs, are
`benchmarks/operator/bench.py --fault ...`): the operator SIGKILLed during a burst of creations,
the API server restarted mid-run, and status repaired by the periodic resync after the event that
should have updated it was lost (a status write refused, a Job's events no longer delivered) or
after status was overwritten by someone else.

Every test checks: no FineTuneJob controls two Jobs, every FineTuneJob has its Job, and status
converges within one resync period (faults.env.RESYNC_SECONDS) of the fault ending.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from faults.env import RESYNC_SECONDS, FaultEnv, duplicate_jobs, ftj, wait
from localkube import kwokpods
from localkube.rest import HttpError, Rest

pytestmark = pytest.mark.cluster

SLACK = 5.0
"""Seconds on top of one resync period: the poll interval, a reconcile and a watch delivery on a
busy 2-CPU machine (shared with other test runs)."""


def assert_one_job_each(env: FaultEnv, ns: str, count: int) -> None:
    jobs = env.jobs(ns)
    assert duplicate_jobs(jobs) == {}, "a FineTuneJob controls more than one Job"
    uids = {o["metadata"]["uid"] for o in env.ftjs(ns).values()}
    refs = [r for j in jobs for r in j["metadata"].get("ownerReferences") or []]
    owned = {r["uid"] for r in refs if r.get("controller")}
    assert len(uids) == count and owned == uids, f"{len(uids - owned)} FineTuneJob(s) without a Job"


def one_pod_each(env: FaultEnv, ns: str) -> dict[str, int]:
    """Training pods per Job (a second trainer on one checkpoint prefix would be a duplicate)."""
    count: dict[str, int] = {}
    for pod in env.pods(ns):
        job = (pod["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name", "")
        count[job] = count.get(job, 0) + 1
    return count


def test_operator_sigkill_during_a_burst_of_creations(faults: FaultEnv) -> None:
    env, n = faults, 30
    ns = env.namespace("sigkill")
    names = [f"burst-{i:02d}" for i in range(n)]
    killed = threading.Event()

    def kill_after_some_jobs() -> None:
        wait("the first Jobs", lambda: len(env.jobs(ns)) >= 5, 60, 0.05)
        env.operator.kill()
        killed.set()

    killer = threading.Thread(target=kill_after_some_jobs)
    killer.start()
    env.create(ns, [ftj(name) for name in names], threads=4)
    killer.join()
    assert killed.is_set()
    jobs_while_down = len(env.jobs(ns))
    assert jobs_while_down < n, "every Job existed before the kill: the fault hit nothing"

    env.operator.start()
    ready = time.monotonic()
    wait("a Job for every job", lambda: len(env.jobs(ns)) >= n, RESYNC_SECONDS + SLACK)
    created = time.monotonic() - ready
    # The pods are the Job controller's, the scheduler's and kwok's (slow on a busy machine); from
    # the moment they all run, status must follow within one resync period.
    wait(
        "every pod running",
        lambda: sum(p["status"].get("phase") == "Running" for p in env.pods(ns)) >= n,
        120,
    )
    running = time.monotonic()
    wait("every job Running", lambda: env.all_in(ns, "Running", n), RESYNC_SECONDS + SLACK)
    converged = time.monotonic() - running
    assert_one_job_each(env, ns, n)
    assert set(one_pod_each(env, ns).values()) == {1}

    for name in names:
        env.complete(ns, name)
    wait("every job Succeeded", lambda: env.all_in(ns, "Succeeded", n), 60)
    assert_one_job_each(env, ns, n)
    print(
        f"killed with {jobs_while_down}/{n} Jobs created; every Job {created:.1f}s after the restart, "
        f"status Running {converged:.1f}s after the last pod ran"
    )


def test_api_server_restart_mid_run(faults: FaultEnv) -> None:
    env, n = faults, 8
    ns = env.namespace("apiserver")
    names = [f"run-{i}" for i in range(n)]
    env.create(ns, [ftj(name) for name in names])
    wait("every job Running", lambda: env.all_in(ns, "Running", n), 60)
    pid = env.operator.proc.pid if env.operator.proc else None
    errors_before = env.metric("finetune_operator_reconcile_errors_total")

    # Pods end while the API server is down (the kubelet reports it once it is back): half the
    # jobs complete, one is preempted.
    pods = {name: env.pod_of(ns, name) for name in names}
    env.cluster.control_plane.restart_apiserver(down_seconds=3.0)
    back = time.monotonic()
    rest = Rest(env.cluster.kubeconfig)  # new connections to the new API server process
    for name in names[: n // 2]:
        kwokpods.complete(rest, pods[name], '{"exitReason": "completed"}')
    kwokpods.preempt(rest, pods[names[-1]])

    def cluster_settled() -> bool:
        """The Job controller, scheduler and kwok are back too: Jobs complete, replacement running."""
        complete = 0
        for job in env.jobs(ns):
            conds = job.get("status", {}).get("conditions") or []
            complete += any(c["type"] == "Complete" and c["status"] == "True" for c in conds)
        return complete == n // 2 and env.pod_of(ns, names[-1]) is not None

    def converged() -> bool:
        phases = env.phases(ns)
        done = all(phases[name] == "Succeeded" for name in names[: n // 2])
        preempted = env.get(ns, names[-1]).get("status", {}).get("preemptions") == 1
        return done and preempted and phases[names[-1]] == "Running"

    wait("the controllers to catch up", cluster_settled, 120)
    settled = time.monotonic()
    wait("status after the restart", converged, RESYNC_SECONDS + SLACK)
    took = time.monotonic() - settled
    assert env.operator.proc is not None and env.operator.proc.pid == pid, "the operator restarted"
    assert env.healthy()
    assert_one_job_each(env, ns, n)
    print(
        f"API server back after {settled - back:.1f}s of catching up, status {took:.1f}s later; errors: "
        f"{env.metric('finetune_operator_reconcile_errors_total') - errors_before:.0f}"
    )


POLICY = "fault-refuse-status"


def refuse_status_writes(rest: Rest, ns: str) -> None:
    """Every status write to FineTuneJobs in `ns` refused (a ValidatingAdmissionPolicy): the
    operator's reconcile fails, and nothing about the job changes to tell it when to try again."""
    base = "/apis/admissionregistration.k8s.io/v1"
    rest.request(
        "POST",
        f"{base}/validatingadmissionpolicies",
        {
            "metadata": {"name": POLICY},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["finetune.dev"],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": ["finetunejobs/status"],
                        }
                    ]
                },
                "validations": [{"expression": "false", "message": "fault injection: status refused"}],
            },
        },
    )
    rest.request(
        "POST",
        f"{base}/validatingadmissionpolicybindings",
        {
            "metadata": {"name": POLICY},
            "spec": {
                "policyName": POLICY,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}},
            },
        },
    )


def allow_status_writes(rest: Rest) -> None:
    base = "/apis/admissionregistration.k8s.io/v1"
    for kind in ("validatingadmissionpolicybindings", "validatingadmissionpolicies"):
        rest.request("DELETE", f"{base}/{kind}/{POLICY}")


def status_refused(env: FaultEnv, ns: str, name: str) -> bool:
    """Whether a status write is refused now (a no-op merge patch still passes admission)."""
    try:
        env.patch_status(ns, name, {})
    except HttpError as e:
        return "fault injection" in e.body
    return False


def test_resync_repairs_status_after_a_refused_write(faults: FaultEnv) -> None:
    """The pod completes while status writes are refused: the reconcile that event caused fails,
    and allowing writes again changes nothing about the job, so only the resync can repair it."""
    env = faults
    ns = env.namespace("lost")
    env.create(ns, [ftj("lost")])
    wait("Running", lambda: env.phases(ns).get("lost") == "Running", 60)
    refuse_status_writes(env.rest, ns)
    try:
        wait("the policy in force", lambda: status_refused(env, ns, "lost"), 30, 0.2)
        errors = env.metric("finetune_operator_reconcile_errors_total")
        env.complete(ns, "lost")
        wait(
            "the Job complete",
            lambda: any(
                c["type"] == "Complete" and c["status"] == "True"
                for c in env.jobs(ns)[0].get("status", {}).get("conditions") or []
            ),
            60,
        )
        wait(
            "the operator's refused write",
            lambda: env.metric("finetune_operator_reconcile_errors_total") > errors,
            30,
        )
        before = env.get(ns, "lost")
        assert before["status"]["phase"] == "Running"
    finally:
        allow_status_writes(env.rest)
    allowed = time.monotonic()
    wait("Succeeded", lambda: env.phases(ns).get("lost") == "Succeeded", RESYNC_SECONDS + SLACK)
    took = time.monotonic() - allowed
    after = env.get(ns, "lost")
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert_one_job_each(env, ns, 1)
    print(f"repaired {took:.1f}s after writes were allowed again (resync every {RESYNC_SECONDS:.0f}s)")


def test_resync_repairs_status_when_a_jobs_events_stop(faults: FaultEnv) -> None:
    """The Job loses the label the operator's Job watch selects on, so its later events (Complete)
    never reach the operator; the pod's do. The resync finds the Job by name (409 on create, then a
    read) and repairs status."""
    env = faults
    ns = env.namespace("unwatched")
    env.create(ns, [ftj("unwatched")])
    wait("Running", lambda: env.phases(ns).get("unwatched") == "Running", 60)
    env.cluster.kubectl("label", "job", "unwatched", "-n", ns, "app.kubernetes.io/managed-by-")
    env.complete(ns, "unwatched")
    completed = time.monotonic()
    wait("Succeeded", lambda: env.phases(ns).get("unwatched") == "Succeeded", RESYNC_SECONDS + SLACK + 5)
    took = time.monotonic() - completed
    assert_one_job_each(env, ns, 1)
    print(f"Succeeded {took:.1f}s after the pod completed, the Job's events unseen")


def test_status_overwritten_by_someone_else_is_put_back(faults: FaultEnv) -> None:
    env = faults
    ns = env.namespace("overwritten")
    env.create(ns, [ftj("overwritten")])
    wait("Running", lambda: env.phases(ns).get("overwritten") == "Running", 60)
    env.preempt(ns, "overwritten")
    wait("preemption counted", lambda: env.get(ns, "overwritten")["status"].get("preemptions") == 1, 60)
    wait("Running again", lambda: env.phases(ns).get("overwritten") == "Running", 60)
    truth: dict[str, Any] = env.get(ns, "overwritten")["status"]

    env.patch_status(ns, "overwritten", {"phase": "Failed", "message": "tampered", "jobName": None})
    written = time.monotonic()

    def restored() -> bool:
        status = env.get(ns, "overwritten")["status"]
        keys = ("phase", "message", "jobName", "preemptions", "preemptedPods")
        return all(status.get(k) == truth.get(k) for k in keys)

    wait("status put back", restored, RESYNC_SECONDS + SLACK)
    assert time.monotonic() - written <= RESYNC_SECONDS + SLACK
    assert env.get(ns, "overwritten")["status"]["preemptions"] == 1  # not counted twice
