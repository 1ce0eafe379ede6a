"""The operator end to end: real control plane, test kubelet, moto S3, the real trainer on the tiny
CPU model, the operator as a process (`python -m finetune_operator run`).

Each FineTuneJob's story is a *scenario*: a thread that applies the job and acts on it at the right
moment (evicts its pod after a checkpoint, suspends it, kills the operator, deletes it), recording
what it saw and when. The module fixture starts the scenarios of every selected test at once, so
the jobs train side by side (most of a trainer's time is imports and model loading, which overlap
well); each test then waits for its scenario and checks what it recorded. Figures (apply to pod
running, eviction to resumed training, steps lost) are printed and written to
out/e2e-figures.json.

Moments are taken from the trainer's own log (the pod's container log on the test kubelet), which
is exact, rather than from status, which is written at most every statusWriteIntervalSeconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import yaml
from e2e.harness import (
    REPO,
    OperatorProcess,
    Recorder,
    Seen,
    checkpoints_done,
    first_seen,
    last_step,
    log_lines,
    log_time,
    pod_running,
    steps,
    tiny_job,
    wait,
)
from prometheus_client.parser import text_string_to_metric_families
from trainer_fixtures import alpaca_rows, write_jsonl

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 16
HAPPY_STEPS = 40
"""The plain run trains longer: status is written every 2 s, and progress must show mid-run."""
EVERY = 4
"""checkpoint.everySteps: the most steps a hard kill may cost."""
GRACE = 30
SCENARIO_TIMEOUT = 900.0
"""Seconds for one scenario, with every other scenario's trainer sharing the CPU."""
EXIT_CONFIG_ERROR = 78
FIGURES = REPO / "out" / "e2e-figures.json"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"


# -- the scenario machinery -------------------------------------------------------------------


@dataclass
class Env:
    cluster: Any
    s3: Any
    operator: OperatorProcess
    recorder: Recorder
    model: Path
    data: Path
    tmp: Path

    def metrics(self) -> str:
        """/metrics of the operator now (retried while a scenario restarts it)."""

        def fetch() -> str | None:
            try:
                return self.operator.metrics()
            except OSError:
                return None

        return wait("operator /metrics", fetch, timeout=120, interval=0.5)


def e2e_job(name: str, env: Env, steps: int = STEPS, **spec: Any) -> dict[str, Any]:
    """A short job: STEPS steps of batch 2, a checkpoint every EVERY steps, no activation
    checkpointing (nothing to save on this model; faster on the CPU)."""
    sections: dict[str, Any] = {
        "lora": {"r": 8, "alpha": 16, "gradientCheckpointing": "false"},
        "training": {
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "maxSteps": steps,
            "warmupSteps": 2,
            "learningRate": 1e-3,
            "optimizer": "adamw_torch",
        },
        "checkpoint": {"everySteps": EVERY, "keepLast": 2, "gracePeriodSeconds": GRACE},
    }
    sections.update(spec)
    return tiny_job(name, env.model, env.data, **sections)


class Scenario:
    """One FineTuneJob's story, driven in a thread; `facts` is what it measured and saw."""

    def __init__(self, name: str, drive: Callable[[Scenario], None], env: Env, **spec: Any) -> None:
        self.name = name
        self.drive = drive
        self.env = env
        self.job = e2e_job(name, env, **spec)
        self.ns = ""
        self.facts: dict[str, Any] = {}
        self.applied_at = 0.0
        self.applied_wall = 0.0
        self.error: tuple[type[BaseException], BaseException, TracebackType | None] | None = None
        self.thread = threading.Thread(target=self._run, name=f"scenario-{name}", daemon=True)

    def start(self) -> None:
        cluster = self.env.cluster
        self.ns = cluster.new_namespace(self.name)
        cluster.apply(self.env.s3.secret(self.ns))
        self.job["metadata"]["namespace"] = self.ns
        self.thread.start()

    def _run(self) -> None:
        try:
            self.drive(self)
        except BaseException:
            self.error = sys.exc_info()  # type: ignore[assignment]

    def result(self) -> Scenario:
        self.thread.join(SCENARIO_TIMEOUT)
        if self.thread.is_alive():
            raise TimeoutError(f"scenario {self.name} still running after {SCENARIO_TIMEOUT:.0f}s")
        if self.error is not None:
            raise self.error[1].with_traceback(self.error[2])
        return self

    # -- acting and observing ---------------------------------------------------------------

    def apply(self) -> None:
        self.applied_at, self.applied_wall = time.monotonic(), time.time()
        self.env.cluster.apply(self.job)

    def kubectl(self, *args: str, check: bool = True) -> Any:
        return self.env.cluster.kubectl(*args, "-n", self.ns, check=check)

    def patch_spec(self, **spec: Any) -> None:
        self.kubectl("patch", "ftj", self.name, "--type=merge", "-p", json.dumps({"spec": spec}))

    def status(self) -> dict[str, Any]:
        return self.env.recorder.status(self.ns, self.name)

    def history(self) -> list[Seen]:
        return self.env.recorder.history(self.ns, self.name)

    def wait_status(self, what: str, pred: Callable[[dict[str, Any]], Any], timeout: float = 600) -> Any:
        return wait(f"{self.name}: {what}", lambda: pred(self.status()), timeout=timeout)

    def wait_phase(self, phase: str, timeout: float = 600) -> dict[str, Any]:
        def reached(status: dict[str, Any]) -> dict[str, Any] | None:
            if status.get("phase") == "Failed" and phase != "Failed":
                raise AssertionError(f"{self.name} failed: {status.get('message')}")
            return status if status.get("phase") == phase else None

        return self.wait_status(f"phase {phase}", reached, timeout)

    def pod_history(self) -> dict[str, list[Seen]]:
        return self.env.recorder.pod_history(self.ns, self.name)

    def wait_pod_running(self, exclude: tuple[str, ...] = (), timeout: float = 300) -> tuple[str, Seen]:
        """A pod (not in `exclude`) that reached phase Running, and when it was first seen so."""

        def running() -> tuple[str, Seen] | None:
            for name, versions in self.pod_history().items():
                seen = first_seen(versions, pod_running) if name not in exclude else None
                if seen is not None:
                    return name, seen
            return None

        return wait(f"{self.name}: a running pod", running, timeout=timeout)

    def log(self, pod: str) -> list[dict[str, Any]]:
        return log_lines(self.env.cluster.kubelet.log_path(self.ns, pod, "trainer"))

    def wait_log(
        self, pod: str, what: str, pred: Callable[[list[dict[str, Any]]], Any], timeout: float = 600
    ) -> Any:
        return wait(f"{self.name}/{pod}: {what}", lambda: pred(self.log(pod)), timeout=timeout, interval=0.1)

    def wait_disruptable(self, pod: str) -> int:
        """Wait until `pod` completed a checkpoint and trained a step past it; the checkpoint's step."""

        def ready(lines: list[dict[str, Any]]) -> int | None:
            done = checkpoints_done(lines)
            return done[-1] if done and last_step(lines) > done[-1] else None

        return self.wait_log(pod, "a checkpoint and a step after it", ready)

    def pod_gone(self, pod: str) -> bool:
        versions = self.pod_history().get(pod) or []
        return bool(versions) and versions[-1].deleted

    def pod_ended(self, pod: str) -> dict[str, Any] | None:
        """The trainer container's terminated state, once the pod has ended (or was removed)."""
        versions = self.pod_history().get(pod) or []
        for seen in reversed(versions):
            for cs in (seen.obj.get("status") or {}).get("containerStatuses") or []:
                if "terminated" in (cs.get("state") or {}):
                    return cs["state"]["terminated"]
        return None

    def timeline(self, **marks: float) -> None:
        for key, value in marks.items():
            self.facts[key] = round(value, 2)


# -- the scenarios ----------------------------------------------------------------------------


def started(s: Scenario) -> str:
    """Apply, wait for the first pod to run and train a step; record the start-up figures."""
    s.apply()
    pod, seen = s.wait_pod_running()
    lines = s.wait_log(pod, "a training step", lambda lines: lines if steps(lines) else None)
    s.timeline(
        apply_to_pod_running_s=seen.at - s.applied_at,
        apply_to_first_step_s=log_time(steps(lines)[0]) - s.applied_wall,
    )
    return pod


def evict_and_resume(s: Scenario, graceful: bool, meanwhile: Callable[[], None] = lambda: None) -> None:
    """Evict the first pod a step after a checkpoint (with its grace period, or SIGKILL at once),
    then follow the replacement to its first resumed step (`meanwhile` runs once it is running)."""
    first = started(s)
    checkpoint = s.wait_disruptable(first)
    s.facts["checkpoint_before_eviction"] = checkpoint
    evicted_at, evicted_wall = time.monotonic(), time.time()
    s.env.cluster.kubelet.evict(s.ns, first, grace_seconds=None if graceful else 0)
    second, seen = s.wait_pod_running(exclude=(first,))
    meanwhile()
    lines = s.wait_log(second, "a resumed training step", lambda lines: lines if steps(lines) else None)
    resume = next(line for line in lines if line.get("event") == "resume")
    old = s.log(first)
    s.facts |= {
        "pods": [first, second],
        "last_step_before_eviction": last_step(old),
        "first_pod_checkpoints": checkpoints_done(old),
        "first_pod_exit": s.pod_ended(first),
        "resumed_from_step": resume["step"],
        "first_resumed_step": steps(lines)[0]["step"],
        "steps_lost": last_step(old) - (resume["step"] or 0),
    }
    history = s.pod_history()
    ended = first_seen(history[first], lambda pod: pod["status"].get("phase") in ("Failed", "Succeeded"))
    s.timeline(
        # The old pod's grace: finishing the step, the emergency checkpoint and its upload.
        eviction_to_pod_ended_s=(ended.at if ended else history[first][-1].at) - evicted_at,
        # The Job controller's pod-failure backoff (10 s after the first failure, ignored or not).
        eviction_to_new_pod_s=history[second][0].at - evicted_at,
        eviction_to_pod_running_s=seen.at - evicted_at,
        eviction_to_resumed_step_s=log_time(steps(lines)[0]) - evicted_wall,
    )


def drive_happy(s: Scenario) -> None:
    pod = started(s)
    s.facts["pods"] = [pod]
    s.wait_status(
        "progress while training",
        lambda st: st.get("phase") == "Running" and (st.get("progress") or {}).get("step"),
    )
    s.facts["metrics_during"] = s.env.metrics()
    s.facts["status_during"] = s.status()
    s.wait_status("a checkpoint in status", lambda st: st.get("checkpoint"))
    s.facts["metrics_checkpointed"] = s.env.metrics()
    s.wait_status(
        "eval loss and the checkpoint history while training",
        lambda st: (
            st.get("phase") == "Running"
            and (st.get("progress") or {}).get("evalLoss") is not None
            and st.get("checkpoints")
        ),
    )
    s.facts["yaml_mid_run"] = yaml.safe_load(s.kubectl("get", "ftj", s.name, "-o", "yaml").stdout)
    s.wait_phase("Succeeded")
    s.facts["metrics_after"] = s.env.metrics()
    s.facts["events"] = events_of(s)


def drive_evict_kill(s: Scenario) -> None:
    """Evicted with no grace at all (SIGTERM, SIGKILL 50 ms later), as a spot reclaim can be."""
    evict_and_resume(s, graceful=False)
    s.wait_phase("Succeeded")


def drive_evict_then_kill_operator(s: Scenario) -> None:
    """Evicted with the pod's grace period (SIGTERM: the trainer checkpoints the step it reached);
    then SIGKILL the operator while the replacement pod starts (the trainer needs tens of seconds to
    load; once it trains, these 16 steps take seconds), and start it again: the status it had (the
    preemption above all) must survive, no second Job appear, and the new process carry on."""
    before: dict[str, Any] = {}

    def kill_and_restart() -> None:
        s.wait_status("one preemption counted", lambda st: st.get("preemptions") == 1)
        s.facts["metrics_preempted"] = s.env.metrics()  # the process that counted the preemption
        s.facts["job_before"] = job_identity(s)
        before.update(s.status())
        operator = s.env.operator
        operator.kill()
        killed = time.monotonic()
        time.sleep(3)  # the new pod loads on; its progress reports fail meanwhile
        operator.start()
        s.timeline(operator_down_s=time.monotonic() - killed)

    evict_and_resume(s, graceful=True, meanwhile=kill_and_restart)
    s.wait_status(
        "progress written by the restarted operator",
        lambda st: (st.get("progress") or {}).get("step", 0) > before["progress"]["step"],
    )
    s.facts["status_before_kill"] = before
    s.facts["status_after_restart"] = s.status()
    s.wait_phase("Succeeded")
    s.facts["job_after"] = job_identity(s)
    s.facts["jobs"] = [
        j["metadata"]["name"] for j in json.loads(s.kubectl("get", "jobs", "-o", "json").stdout)["items"]
    ]


def drive_suspend(s: Scenario) -> None:
    first = started(s)
    s.wait_disruptable(first)
    s.patch_spec(suspend=True)
    suspended_at = time.monotonic()
    s.wait_status(
        "suspended with no pod",
        lambda st: st.get("phase") == "Suspended" and not s.env.recorder.pods(s.ns, s.name),
    )
    s.timeline(suspend_to_pod_gone_s=time.monotonic() - suspended_at)
    s.facts["status_suspended"] = s.status()
    s.facts["first_pod_exit"] = s.pod_ended(first)
    time.sleep(3)
    s.facts["pods_while_suspended"] = [p["metadata"]["name"] for p in s.env.recorder.pods(s.ns, s.name)]
    s.facts["job_suspended"] = json.loads(s.kubectl("get", "job", s.name, "-o", "json").stdout)["spec"].get(
        "suspend"
    )
    s.patch_spec(suspend=False)
    resumed_at = time.monotonic()
    second, seen = s.wait_pod_running(exclude=(first,))
    lines = s.wait_log(second, "a resumed training step", lambda lines: lines if steps(lines) else None)
    old = s.log(first)
    s.facts |= {
        "pods": [first, second],
        "last_step_before_suspend": last_step(old),
        "first_pod_checkpoints": checkpoints_done(old),
        "resumed_from_step": next(line for line in lines if line.get("event") == "resume")["step"],
    }
    s.timeline(unsuspend_to_pod_running_s=seen.at - resumed_at)
    s.wait_phase("Succeeded")


def drive_delete(s: Scenario) -> None:
    first = started(s)
    s.wait_disruptable(first)
    s.facts["job_before"] = job_identity(s)
    s.kubectl("delete", "ftj", s.name, "--wait=false")
    deleted_at = time.monotonic()

    def gone() -> bool:
        job = s.kubectl("get", "job", s.name, check=False)
        return job.returncode != 0 and "NotFound" in job.stderr and s.pod_gone(first)

    wait(f"{s.name}: Job and pod garbage-collected", gone, timeout=120, interval=0.5)
    s.timeline(delete_to_job_and_pod_gone_s=time.monotonic() - deleted_at)
    s.facts["first_pod_exit"] = s.pod_ended(first)
    s.facts["ftj_gone"] = s.kubectl("get", "ftj", s.name, check=False).returncode != 0
    s.facts["metrics_after_delete"] = s.env.metrics()


def drive_config_error(s: Scenario) -> None:
    s.apply()
    s.wait_phase("Failed", timeout=300)
    time.sleep(3)  # a retry would have created a pod by now
    s.facts["pods"] = list(s.pod_history())
    s.facts["pod_exit"] = s.pod_ended(s.facts["pods"][0]) if s.facts["pods"] else None
    s.facts["job"] = json.loads(s.kubectl("get", "job", s.name, "-o", "json").stdout)
    s.facts["events"] = events_of(s)


def job_identity(s: Scenario) -> dict[str, Any]:
    job = json.loads(s.kubectl("get", "job", s.name, "-o", "json").stdout)
    return {"name": job["metadata"]["name"], "uid": job["metadata"]["uid"]}


def events_of(s: Scenario) -> list[dict[str, Any]]:
    items = json.loads(s.kubectl("get", "events", "-o", "json").stdout)["items"]
    mine = [e for e in items if e["involvedObject"].get("kind") == "FineTuneJob"]
    return sorted(mine, key=lambda e: int(e["metadata"]["resourceVersion"]))  # timestamps have 1 s steps


# -- the fixture that runs them side by side --------------------------------------------------


def no_output_column(env: Env) -> dict[str, Any]:
    rows = [{"instruction": r["instruction"], "response": r["output"]} for r in alpaca_rows(8)]
    return {"data": {"path": str(write_jsonl(env.tmp / "no-output.jsonl", rows))}}


SCENARIOS: dict[str, tuple[Callable[[Scenario], None], Callable[[Env], dict[str, Any]]]] = {
    # GPU-seconds are counted for GPUs requested: the test kubelet's node has 8 (fake) GPUs and the
    # trainer, seeing no CUDA, trains on the CPU.
    "happy": (
        drive_happy,
        lambda env: {
            "resources": {"gpus": 1},
            "steps": HAPPY_STEPS,
            "data": {"path": str(env.data), "validation": {"fraction": 0.125}},
            "evaluation": {"everySteps": EVERY},
            "samples": {"prompts": ["Tell me about sleep."], "maxNewTokens": 8},
        },
    ),
    "evict-kill": (drive_evict_kill, lambda env: {}),
    "evict-term": (drive_evict_then_kill_operator, lambda env: {}),
    "suspend": (drive_suspend, lambda env: {}),
    "delete": (drive_delete, lambda env: {}),
    "bad-column": (drive_config_error, no_output_column),
    "bad-model": (
        drive_config_error,
        lambda env: {"model": {"path": str(env.tmp / "no-such-model"), "maxSeqLength": 256}},
    ),
}
USES = {
    "test_job_runs_pending_running_succeeded_with_live_progress": ["happy"],
    "test_eviction_resumes_from_the_checkpoint": ["evict-kill", "evict-term"],
    "test_config_error_fails_at_once_naming_the_field": ["bad-column", "bad-model"],
    "test_suspend_stops_the_pod_and_resume_continues": ["suspend"],
    "test_operator_killed_mid_job_loses_nothing": ["evict-term"],
    "test_deleting_the_job_removes_job_and_pods_keeps_s3": ["delete"],
    "test_metrics_after_jobs": ["happy", "evict-term"],
}


@pytest.fixture(scope="module")
def scenarios(
    request: pytest.FixtureRequest,
    *,
    cluster: Any,
    s3: Any,
    operator: OperatorProcess,
    recorder: Recorder,
    tiny_model_dir: Path,
    tiny_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """Start the scenarios the selected tests of this module use, all at once."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    wanted = sorted({name for test in selected for name in USES.get(test, [])}, key=list(SCENARIOS).index)
    env = Env(cluster, s3, operator, recorder, tiny_model_dir, tiny_data, tmp_path_factory.mktemp("e2e"))
    started_at = time.monotonic()
    running: dict[str, Scenario] = {}
    for name in wanted:
        drive, spec = SCENARIOS[name]
        running[name] = Scenario(name, drive, env, **spec(env))
        running[name].start()
    yield running
    for scenario in running.values():
        scenario.thread.join(SCENARIO_TIMEOUT)
    figures = {
        "scenarios_wall_s": round(time.monotonic() - started_at, 1),
        **{
            name: {k: v for k, v in s.facts.items() if k.endswith("_s") or k in FIGURE_KEYS}
            for name, s in running.items()
        },
    }
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\ne2e figures ({FIGURES}):\n{json.dumps(figures, indent=2)}")


FIGURE_KEYS = {"steps_lost", "resumed_from_step", "last_step_before_eviction", "checkpoint_before_eviction"}


# -- the tests --------------------------------------------------------------------------------


def condition_time(status: dict[str, Any], kind: str) -> str:
    return next(c["lastTransitionTime"] for c in status["conditions"] if c["type"] == kind)


def status_steps(history: list[Seen]) -> list[int]:
    return [
        v.obj["status"]["progress"]["step"]
        for v in history
        if not v.deleted and ((v.obj.get("status") or {}).get("progress") or {}).get("step") is not None
    ]


def most_gone_back(values: list[int]) -> int:
    """The largest drop of a sequence below the highest value before it."""
    high, drop = 0, 0
    for value in values:
        drop = max(drop, high - value)
        high = max(high, value)
    return drop


def phases(history: list[Seen]) -> list[str]:
    out: list[str] = []
    for v in history:
        phase = (v.obj.get("status") or {}).get("phase")
        if phase and (not out or out[-1] != phase):
            out.append(phase)
    return out


def s3_keys(s3: Any, prefix: str) -> dict[str, int]:
    keys: dict[str, int] = {}
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        keys |= {o["Key"]: o["Size"] for o in page.get("Contents", [])}
    return keys


def s3_bytes(s3: Any, key: str) -> bytes:
    return s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def checkpoint_steps(keys: dict[str, int], prefix: str) -> list[int]:
    return sorted(
        int(m.group(1))
        for k in keys
        if (m := re.fullmatch(re.escape(prefix) + r"checkpoints/step-0*(\d+)/manifest\.json", k))
    )


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def sample(text: str, metric: str, **labels: str) -> float | None:
    """The value of the sample `metric` with (at least) these labels, or None."""
    for name, have, value in samples(text):
        if name == metric and all(have.get(k) == v for k, v in labels.items()):
            return value
    return None


def test_job_runs_pending_running_succeeded_with_live_progress(
    scenarios: dict[str, Scenario], s3: Any
) -> None:
    s = scenarios["happy"].result()
    history = s.history()
    assert phases(history) == ["Pending", "Running", "Succeeded"]

    # Progress while training: every figure a person looks at, mid-run.
    live = [
        v.obj["status"]["progress"]
        for v in history
        if v.obj.get("status", {}).get("phase") == "Running"
        and 0 < (v.obj["status"].get("progress") or {}).get("step", 0) < HAPPY_STEPS
    ]
    assert live, "status never showed progress while training"
    for key in (
        "step",
        "totalSteps",
        "percent",
        "loss",
        "etaSeconds",
        "learningRate",
        "tokensPerSecond",
        "updatedAt",
    ):
        assert any(p.get(key) is not None for p in live), f"status.progress.{key} never shown while training"
    mid = live[len(live) // 2]
    assert mid["totalSteps"] == HAPPY_STEPS and mid["percent"] == pytest.approx(
        100 * mid["step"] / HAPPY_STEPS, abs=0.01
    )
    assert most_gone_back(status_steps(history)) == 0

    final = s.status()
    generation = s.history()[-1].obj["metadata"]["generation"]
    conditions = {c["type"]: c for c in final["conditions"]}
    assert all(c["observedGeneration"] == generation for c in conditions.values())
    assert conditions["Succeeded"]["status"] == "True" and conditions["Ready"]["status"] == "True"
    assert conditions["Running"]["status"] == "False" and conditions["Failed"]["status"] == "False"
    assert final["observedGeneration"] == generation
    assert final["progress"]["step"] == HAPPY_STEPS and final["progress"]["percent"] == 100
    assert final["startTime"] <= final["completionTime"]
    assert final["preemptions"] == 0

    # Events: one per transition, in order; and the eval loss's improvements.
    transitions = [e for e in s.facts["events"] if not e["reason"].startswith("EvalLoss")]
    moves = [e["message"].split(":")[0] for e in transitions]
    assert moves == ["New -> Pending", "Pending -> Running", "Running -> Succeeded"], s.facts["events"]
    assert {e["type"] for e in transitions} == {"Normal"}
    improved = [e for e in s.facts["events"] if e["reason"] == "EvalLossImproved"]
    assert improved and improved[0]["message"].startswith("eval loss "), s.facts["events"]

    # Mid-run, `kubectl get ftj -o yaml` shows the eval loss and the checkpoint history.
    mid = s.facts["yaml_mid_run"]["status"]
    assert mid["phase"] == "Running" and 0 < mid["progress"]["step"] < HAPPY_STEPS
    assert isinstance(mid["progress"]["evalLoss"], float) and mid["progress"]["evalStep"] >= 0
    assert mid["checkpoints"] and all(
        {"step", "trainLoss", "evalLoss", "time", "uri"} <= c.keys() for c in mid["checkpoints"]
    )
    assert mid["checkpoints"][0]["uri"].startswith(f"s3://{s3.bucket}/jobs/{s.ns}/{s.name}/checkpoints/")
    # At the end: the kept checkpoints (keepLast 2, plus the best when it is older), the best one,
    # the eval figures in the summary, and the first lines of the sample answers.
    kept = [c["step"] for c in final["checkpoints"]]
    assert kept[:2] == [HAPPY_STEPS, HAPPY_STEPS - EVERY]
    best = final["bestCheckpoint"]
    assert best["evalLoss"] == min(c["evalLoss"] for c in final["checkpoints"]) and best["step"] in kept
    assert final["summary"]["finalEvalLoss"] < final["summary"]["evalLossBefore"]
    [sample] = final["samples"]
    # (The tiny model's answers may be blank lines: what counts is that both were generated.)
    assert sample["prompt"] == "Tell me about sleep." and sample["before"] is not None
    assert sample["after"] is not None

    # The summary from the termination message.
    summary = final["summary"]
    assert summary["exitReason"] == "completed" and summary["steps"] == HAPPY_STEPS
    assert summary["finalLoss"] == pytest.approx(final["progress"]["loss"], abs=1e-3)

    # Checkpoints and the adapter in S3; artifacts in status with a checkable sha256 and size.
    prefix = f"jobs/{s.ns}/{s.name}/"
    keys = s3_keys(s3, prefix)
    # keepLast 2, and the best by eval loss when it is older than those.
    assert checkpoint_steps(keys, prefix)[-2:] == [HAPPY_STEPS - EVERY, HAPPY_STEPS]
    assert checkpoint_steps(keys, prefix) == sorted({*kept, best["step"]})
    assert final["checkpoint"]["step"] == HAPPY_STEPS
    assert final["checkpoint"]["uri"] == f"s3://{s3.bucket}/{prefix}checkpoints/step-{HAPPY_STEPS:08d}/"
    [adapter] = [a for a in final["artifacts"] if a["name"] == "adapter"]
    assert adapter["uri"] == f"s3://{s3.bucket}/{prefix}artifacts/adapter/"
    adapter_prefix = f"{prefix}artifacts/adapter/"
    sums = s3_bytes(s3, adapter_prefix + "SHA256SUMS")
    assert adapter["sha256"] == hashlib.sha256(sums).hexdigest()
    listed = dict(reversed(line.split("  ", 1)) for line in sums.decode().splitlines())
    assert "adapter_model.safetensors" in listed and "adapter_config.json" in listed
    for rel, sha in listed.items():
        assert hashlib.sha256(s3_bytes(s3, adapter_prefix + rel)).hexdigest() == sha, rel
    assert adapter["sizeBytes"] == sum(keys[adapter_prefix + rel] for rel in listed)


@pytest.mark.parametrize("kind", ["evict-kill", "evict-term"])
def test_eviction_resumes_from_the_checkpoint(scenarios: dict[str, Scenario], kind: str) -> None:
    s = scenarios[kind].result()
    f = s.facts
    status = s.status()
    assert status["phase"] == "Succeeded" and status["preemptions"] == 1
    first = f["pods"][0]
    assert status["preemptedPods"] == [s.pod_history()[first][0].obj["metadata"]["uid"]]
    assert f["first_resumed_step"] == f["resumed_from_step"] + 1
    if kind == "evict-kill":
        # SIGKILL at once: the last periodic checkpoint is all there is.
        assert f["first_pod_exit"]["exitCode"] == 137
        assert f["resumed_from_step"] == f["first_pod_checkpoints"][-1] >= f["checkpoint_before_eviction"]
        assert 0 < f["steps_lost"] <= EVERY
    else:
        # SIGTERM with the grace period: an emergency checkpoint at the step reached, nothing lost.
        assert f["first_pod_exit"]["exitCode"] == 143
        assert json.loads(f["first_pod_exit"]["message"])["exitReason"] == "interrupted"
        assert f["resumed_from_step"] == f["last_step_before_eviction"] == f["first_pod_checkpoints"][-1]
        assert f["steps_lost"] == 0
    gone_back = most_gone_back(status_steps(s.history()))
    assert gone_back <= (EVERY if kind == "evict-kill" else 0)
    # Pending while the replacement starts shows only if a reconcile falls into that moment.
    seen = phases(s.history())
    assert seen[:2] == ["Pending", "Running"] and seen[-1] == "Succeeded"
    assert set(seen[2:-1]) <= {"Pending", "Running"}, seen
    assert status["summary"]["resumedFromStep"] == f["resumed_from_step"]


def test_config_error_fails_at_once_naming_the_field(scenarios: dict[str, Scenario]) -> None:
    for name, field_name in (("bad-column", "spec.template.fields"), ("bad-model", "spec.model.path")):
        s = scenarios[name].result()
        status = s.status()
        assert status["phase"] == "Failed"
        assert field_name in status["message"], status["message"]
        assert len(s.facts["pods"]) == 1, f"{name}: retried ({s.facts['pods']})"
        assert s.facts["pod_exit"]["exitCode"] == EXIT_CONFIG_ERROR
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Failed"]["status"] == "True" and conditions["Failed"]["reason"] == "ConfigError"
        job_failed = [c for c in s.facts["job"]["status"]["conditions"] if c["type"] == "Failed"]
        assert job_failed and job_failed[0]["reason"] == "PodFailurePolicy"
        assert status["summary"]["exitReason"] == "config-error"
        assert s.facts["events"][-1]["type"] == "Warning" and field_name in s.facts["events"][-1]["message"]
    assert "'output'" in scenarios["bad-column"].status()["message"]


def test_suspend_stops_the_pod_and_resume_continues(scenarios: dict[str, Scenario]) -> None:
    s = scenarios["suspend"].result()
    f = s.facts
    assert f["job_suspended"] is True
    assert f["pods_while_suspended"] == []
    assert f["status_suspended"]["phase"] == "Suspended"
    assert {c["type"]: c for c in f["status_suspended"]["conditions"]}["Suspended"]["status"] == "True"
    assert f["first_pod_exit"]["exitCode"] == 143  # checkpointed on SIGTERM, then stopped
    assert f["resumed_from_step"] == f["last_step_before_suspend"] == f["first_pod_checkpoints"][-1]
    status = s.status()
    assert status["phase"] == "Succeeded"
    assert status["preemptions"] == 0  # a suspension is no preemption
    assert most_gone_back(status_steps(s.history())) == 0
    seen = phases(s.history())
    assert seen[:3] == ["Pending", "Running", "Suspended"] and seen[-2:] == ["Running", "Succeeded"], seen


def test_operator_killed_mid_job_loses_nothing(scenarios: dict[str, Scenario]) -> None:
    s = scenarios["evict-term"].result()
    f = s.facts
    assert f["jobs"] == [s.name]
    assert f["job_after"] == f["job_before"], "the restarted operator replaced the Job"
    before, after = f["status_before_kill"], f["status_after_restart"]
    for key in ("preemptions", "preemptedPods", "startTime", "jobName"):
        assert after[key] == before[key], key
    assert after["checkpoint"]["step"] >= before["checkpoint"]["step"]
    assert after["progress"]["step"] >= before["progress"]["step"]
    status = s.status()
    assert status["phase"] == "Succeeded" and status["preemptions"] == 1
    assert most_gone_back(status_steps(s.history())) == 0
    created = [
        line
        for line in s.env.operator.log_lines()
        if line.get("msg", "").startswith("created Job") and line.get("namespace") == s.ns
    ]
    assert len(created) == 1, created


def test_deleting_the_job_removes_job_and_pods_keeps_s3(scenarios: dict[str, Scenario], s3: Any) -> None:
    s = scenarios["delete"].result()
    assert s.facts["ftj_gone"]
    # The pod was stopped as any deleted pod: SIGTERM, an emergency checkpoint, exit.
    assert s.facts["first_pod_exit"]["exitCode"] == 143
    prefix = f"jobs/{s.ns}/{s.name}/"
    assert checkpoint_steps(s3_keys(s3, prefix), prefix), "checkpoints were deleted with the job"
    metrics = s.facts["metrics_after_delete"]
    assert not [x for x in samples(metrics) if x[1].get("name") == s.name and x[1].get("namespace") == s.ns]


def test_metrics_after_jobs(scenarios: dict[str, Scenario]) -> None:
    happy, restart = scenarios["happy"].result(), scenarios["evict-term"].result()
    during, checkpointed, after, preempted = (
        happy.facts["metrics_during"],
        happy.facts["metrics_checkpointed"],
        happy.facts["metrics_after"],
        restart.facts["metrics_preempted"],
    )
    snapshots = (during, checkpointed, after, preempted)

    def counted(metric: str, **labels: str) -> float:
        """A counter's highest value in any snapshot: counters restart with the operator process,
        which the evict-term scenario kills at a moment unrelated to this job's."""
        return max(sample(text, metric, **labels) or 0.0 for text in snapshots)

    job = {"namespace": happy.ns, "name": happy.name}
    # Live figures of a training job.
    step = sample(during, "finetune_operator_job_step", **job)
    assert step is not None and 1 <= step <= HAPPY_STEPS
    assert (sample(during, "finetune_operator_job_loss", **job) or 0) > 0
    # After it: phases, reconciles, checkpoints, GPU-seconds; the per-job live series are gone.
    assert (sample(after, "finetune_operator_jobs", phase="Succeeded") or 0) >= 1
    for phase in ("Pending", "Running", "Suspended", "Succeeded", "Failed"):
        assert sample(after, "finetune_operator_jobs", phase=phase) is not None
    assert counted("finetune_operator_reconcile_duration_seconds_count") > 0
    assert sample(after, "finetune_operator_reconcile_duration_seconds_bucket", le="+Inf") is not None
    assert sample(after, "finetune_operator_reconcile_errors_total") is not None
    assert counted("finetune_operator_checkpoints_total") >= 1
    assert counted("finetune_operator_checkpoint_duration_seconds_count") >= 1
    assert counted("finetune_operator_progress_reports_total", result="accepted") > 0
    gpu_seconds = sample(after, "finetune_operator_gpu_seconds_total", **job)
    # 1 GPU x the time status showed Running (status.usage, whole seconds): from the write that
    # made it Running to the one that made it Succeeded; close to the trainer's own run time.
    final = happy.status()
    assert gpu_seconds == final["usage"]["gpuSeconds"]
    running = next(
        v.obj["status"] for v in happy.history() if (v.obj.get("status") or {}).get("phase") == "Running"
    )
    began = datetime.fromisoformat(condition_time(running, "Running"))
    ended = datetime.fromisoformat(condition_time(final, "Succeeded"))
    assert gpu_seconds == pytest.approx((ended - began).total_seconds(), abs=1.0)
    ran = happy.pod_ended(happy.facts["pods"][0])
    runtime = (
        datetime.fromisoformat(ran["finishedAt"]) - datetime.fromisoformat(ran["startedAt"])
    ).total_seconds()
    # The loose check: Succeeded is written after the pod ends by the Job controller's and the
    # reconcile's lag (6 s once in CI on 2 loaded cores), and Running before the trainer starts.
    assert gpu_seconds == pytest.approx(runtime, abs=15.0)
    assert sample(after, "finetune_operator_job_step", **job) is None
    # Preemptions, from the operator process that saw one.
    assert (sample(preempted, "finetune_operator_preemptions_total") or 0) >= 1
    # Every operator series the Grafana dashboard queries has data.
    wanted = set(re.findall(r"finetune_operator_[a-z_]+", DASHBOARD.read_text()))
    have = {n for text in snapshots for n, _, _ in samples(text)}
    assert wanted <= have, f"dashboard series without data: {sorted(wanted - have)}"
