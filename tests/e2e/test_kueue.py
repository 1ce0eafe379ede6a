"""FineTuneJobs under the real Kueue manager (localkube.kueue), on the test kubelet with the real
trainer on the tiny CPU model (it asks for 1 nvidia.com/gpu, which the test node advertises).

A ClusterQueue with a quota of 1 GPU. `first` and `second` (same spec, low priority) are submitted
together: `second` stays Queued until `first` has finished. Once `second` trains, `urgent` (a higher
WorkloadPriorityClass) preempts it: `second` shows Preempted (Kueue's preempting reason in an Event),
checkpoints on SIGTERM (0 steps lost), is Queued again, is re-admitted once `urgent` has finished,
resumes from that checkpoint and ends with the same final loss as `first`, which ran uninterrupted.
A job naming a LocalQueue that does not exist says so. The operator runs with the chart's
ServiceAccount (config.kueue.enabled=true), so its RBAC (Workloads get/list/watch) is proven too.

Times printed: submit to admission, preemption to pod gone, re-admission to resumed step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_install import installed_chart
from e2e.harness import (
    HOST_PROCESS_IMAGE,
    OperatorProcess,
    install_crd,
    last_step,
    log_lines,
    log_time,
    operator_config,
    steps,
    tiny_job,
    wait,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 24
EVERY = 4
TIMEOUT = 600
KUEUE = "kueue.x-k8s.io/v1beta2"


@pytest.fixture(scope="module")
def kueue_operator(
    cluster: Any, s3: Any, kueue: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(cluster)
    release_ns = cluster.new_namespace("finetune-kueue")
    workdir = tmp_path_factory.mktemp("operator-kueue")
    # As the lifecycle suite's operator: cluster-wide by explicit choice (the test makes its own
    # namespace), the admission policy knowing the host-process trainer image.
    values = (
        "--set",
        "config.kueue.enabled=true",
        "--set",
        "rbac.clusterWide=true",
        "--set",
        f"config.defaultImage={HOST_PROCESS_IMAGE}",
    )
    with installed_chart(cluster, workdir, *values, namespace=release_ns) as chart:
        proc = OperatorProcess(chart["sa"], operator_config(s3, kueue={"enabled": True}), workdir)
        proc.start()
        try:
            yield proc
        finally:
            proc.stop()


def quota(ns: str) -> list[dict[str, Any]]:
    """1 GPU for the test's namespace; a higher priority preempts within the ClusterQueue."""
    cq = f"gpu-{ns}"
    return [
        {"apiVersion": KUEUE, "kind": "ResourceFlavor", "metadata": {"name": "local-gpu"}},
        {
            "apiVersion": KUEUE,
            "kind": "ClusterQueue",
            "metadata": {"name": cq},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": "local-gpu",
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "16"},
                                    {"name": "memory", "nominalQuota": "64Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": "1"},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": KUEUE,
            "kind": "LocalQueue",
            "metadata": {"name": "gpu", "namespace": ns},
            "spec": {"clusterQueue": cq},
        },
        {"apiVersion": KUEUE, "kind": "WorkloadPriorityClass", "metadata": {"name": "ft-low"}, "value": 100},
        {
            "apiVersion": KUEUE,
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": "ft-high"},
            "value": 1000,
        },
    ]


def test_kueue_queues_preempts_and_resumes(  # noqa: PLR0917 - pytest fixtures
    cluster: Any, s3: Any, kueue: Any, kueue_operator: OperatorProcess, tiny_model_dir: Path, tiny_data: Path
) -> None:
    ns = cluster.namespace
    cluster.apply(s3.secret(ns), quota(ns))

    def job(name: str, priority: str, queue: str = "gpu", steps_: int = STEPS) -> dict[str, Any]:
        obj = tiny_job(
            name,
            tiny_model_dir,
            tiny_data,
            queueName=queue,
            workloadPriorityClassName=priority,
            resources={"gpus": 1},
        )
        obj["metadata"]["namespace"] = ns
        obj["spec"]["training"]["maxSteps"] = steps_
        obj["spec"]["checkpoint"]["everySteps"] = EVERY
        return obj

    def status(name: str) -> dict[str, Any]:
        return cluster.get("finetunejob", name, ns).get("status") or {}

    def reason(st: dict[str, Any]) -> str | None:
        return next((c["reason"] for c in st.get("conditions") or [] if c["type"] == "Running"), None)

    def pods(name: str) -> list[dict[str, Any]]:
        out = cluster.kubectl(
            "get", "pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={name}", "-o", "json"
        )
        return json.loads(out.stdout)["items"]

    def admitted(name: str) -> bool:
        """The Job exists (the operator creates it a moment after the FineTuneJob) and Kueue has
        unsuspended it."""
        found = cluster.kubectl("get", "job", name, "-n", ns, "-o", "json", check=False)
        return found.returncode == 0 and json.loads(found.stdout)["spec"].get("suspend") is False

    figures: dict[str, float] = {}
    t0 = time.monotonic()
    cluster.apply(job("first", "ft-low"), job("lost", "ft-low", queue="nosuch"))
    wait("first admitted", lambda: admitted("first"), 180, interval=0.1)
    figures["submit_to_admission_s"] = round(time.monotonic() - t0, 2)
    # Only now `second`: Kueue orders equal priorities by creation time, in whole seconds, so two
    # jobs created together may be admitted either way round (CI saw `second` go first).
    cluster.apply(job("second", "ft-low"))

    # The missing LocalQueue: Queued, in Kueue's words, naming the queue.
    lost = wait(
        "the job without a LocalQueue to say why",
        lambda: (s := status("lost")).get("phase") == "Queued" and reason(s) == "Inadmissible" and s,
        TIMEOUT,
    )
    assert "LocalQueue nosuch doesn't exist" in lost["message"], lost["message"]

    # `second` waits for `first`: Queued with Kueue's reason the whole time.
    seen_second: set[tuple[str | None, str | None]] = set()

    waiting_messages: set[str] = set()

    def job_finished(name: str) -> bool:
        job = cluster.get("job", name, ns)
        # SuccessCriteriaMet / FailureTarget come first (Kubernetes >= 1.31) and Kueue counts them.
        return any(c["type"] in {"Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"}
                   and c["status"] == "True"
                   for c in (job.get("status") or {}).get("conditions") or [])  # fmt: skip

    def kueue_state() -> dict[str, Any]:
        """What Kueue and the Job controller say about the namespace's Jobs (for a failure message)."""

        def items(kind: str) -> list[dict[str, Any]]:
            return json.loads(cluster.kubectl("get", kind, "-n", ns, "-o", "json").stdout)["items"]

        def conds(obj: dict[str, Any]) -> list[str]:
            return [
                f"{c['type']}={c['status']}({c.get('reason', '')})"
                for c in (obj.get("status") or {}).get("conditions") or []
            ]

        return {
            "jobs": {
                j["metadata"]["name"]: {
                    "uid": j["metadata"]["uid"],
                    "created": j["metadata"]["creationTimestamp"],
                    "suspend": j["spec"].get("suspend"),
                    "active": (j.get("status") or {}).get("active"),
                    "conditions": conds(j),
                }
                for j in items("jobs")
            },
            "workloads": {
                w["metadata"]["name"]: {
                    "owner": [r["name"] for r in w["metadata"].get("ownerReferences") or []],
                    "conditions": conds(w),
                    "admission": (w.get("status") or {}).get("admission"),
                }
                for w in items("workloads.kueue.x-k8s.io")
            },
        }

    def first_done() -> bool:
        # Read in this order: if `first`'s Job is still running after `second` was looked at, what
        # was seen of `second` was seen while `first` held the GPU. (Kueue frees the quota when the
        # Job finishes, a moment before `first`'s status says Succeeded.)
        second_admitted, s = admitted("second"), status("second")
        if not job_finished("first"):
            assert not second_admitted, f"second ran beside first: {json.dumps(kueue_state())}"
            seen_second.add((s.get("phase"), reason(s)))
            if reason(s) == "Pending":
                waiting_messages.add(s.get("message", ""))
        return status("first").get("phase") == "Succeeded"

    wait("first Succeeded", first_done, TIMEOUT, interval=0.5)
    assert {p for p, _ in seen_second} <= {None, "Queued"}, seen_second
    assert ("Queued", "Pending") in seen_second, seen_second  # Kueue's reason: no quota left
    assert any("insufficient unused quota for nvidia.com/gpu" in m for m in waiting_messages), (
        waiting_messages
    )
    wait("second admitted", lambda: admitted("second"), TIMEOUT)

    # `second` trains past a checkpoint; then `urgent` preempts it.
    wait(
        "second at step 6", lambda: ((status("second").get("progress") or {}).get("step") or 0) >= 6, TIMEOUT
    )
    [victim] = pods("second")
    victim_name = victim["metadata"]["name"]
    cluster.apply(job("urgent", "ft-high", steps_=8))
    t_preempt = time.monotonic()
    preempted = wait(
        "second Preempted",
        lambda: (s := status("second")).get("phase") == "Preempted" and s,
        120,
        interval=0.1,
    )
    assert "Preempted to accommodate a workload" in preempted["message"], preempted["message"]
    wait("the preempted pod gone", lambda: not pods("second"), 120, interval=0.1)
    figures["preemption_to_pod_gone_s"] = round(time.monotonic() - t_preempt, 2)
    requeued = wait(
        "second Queued again", lambda: (s := status("second")).get("phase") == "Queued" and s, 120
    )
    assert requeued["preemptions"] == 1
    events = json.loads(
        cluster.kubectl(
            "get", "events", "-n", ns, "--field-selector", "involvedObject.name=second", "-o", "json"
        ).stdout
    )["items"]
    assert any(e["reason"] == "Preempted" and "Preempted to accommodate" in e["message"] for e in events), [
        (e["reason"], e["message"]) for e in events
    ]
    old = log_lines(cluster.kubelet.log_path(ns, victim_name, "trainer"))

    # `urgent` finishes; `second` is admitted again and resumes from the SIGTERM checkpoint.
    wait("urgent Succeeded", lambda: status("urgent").get("phase") == "Succeeded", TIMEOUT)
    wait("second admitted again", lambda: admitted("second"), TIMEOUT, interval=0.1)
    t_readmit = time.time()
    [again] = wait(
        "the new pod", lambda: [p for p in pods("second") if p["metadata"]["name"] != victim_name], 120
    )
    log = cluster.kubelet.log_path(ns, again["metadata"]["name"], "trainer")
    lines = wait("a resumed step", lambda: (ls := log_lines(log)) and steps(ls) and ls, TIMEOUT, interval=0.2)
    resume = next(line for line in lines if line.get("event") == "resume")
    figures["readmission_to_resumed_step_s"] = round(log_time(steps(lines)[0]) - t_readmit, 2)
    figures["steps_lost"] = last_step(old) - (resume["step"] or 0)
    figures["resumed_from_step"] = resume["step"]
    assert resume["step"] >= 6 and figures["steps_lost"] == 0, (figures, resume)

    done = wait(
        "second Succeeded", lambda: (s := status("second")).get("phase") == "Succeeded" and s, TIMEOUT
    )
    first = status("first")
    assert done["summary"]["finalLoss"] == first["summary"]["finalLoss"], (done["summary"], first["summary"])
    # Usage for charging: second ran about as long as first, waited longer.
    assert (
        done["usage"]["gpuSeconds"] > 0 and done["usage"]["queuedSeconds"] > first["usage"]["queuedSeconds"]
    )
    # The counter follows status.usage (so it survives an operator restart).
    queued = {
        s.labels.get("name"): s.value
        for family in text_string_to_metric_families(kueue_operator.metrics())
        for s in family.samples
        if s.name == "finetune_operator_queued_seconds_total" and s.labels.get("namespace") == ns
    }
    assert queued.get("second") == pytest.approx(done["usage"]["queuedSeconds"], abs=1.0), queued
    print(f"\nKueue e2e figures: {json.dumps(figures)}")
