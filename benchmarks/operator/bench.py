"""The operator at scale: N FineTuneJobs at once on a real API server, pods simulated by kwok.

    python benchmarks/operator/bench.py --jobs 100 300 1000            # one run per scale
    python benchmarks/operator/bench.py --jobs 300 --fault kill-operator
    python benchmarks/operator/report.py                                # latest.json + plot.png

Per run: a fresh control plane (etcd, kube-apiserver with an audit log of the operator's requests
only, controller-manager, scheduler, kwok with enough fake GPU nodes), the operator as a process
(`python -m finetune_operator run`, its own client certificate), and this driver, which:

1. creates N FineTuneJobs at once (16 client threads) and waits until every Job exists and every
   pod runs (kwok makes a scheduled pod Running; nothing else happens by itself);
2. sends `--ticks` rounds of progress reports for every job to the operator's progress endpoint,
   authenticated as the pod (a pod-bound ServiceAccount token, checked by TokenReview), one round
   per status write interval;
3. preempts `--preempt` of the pods (a DisruptionTarget condition, then Failed, as the kubelet
   reports a preemption); the Job controller starts replacements, kwok runs them;
4. completes every pod (exit 0, a summary as termination message) and waits for Succeeded;
5. stays idle for one resync period (no writes expected).

Measured: time until every Job exists, reconcile durations (the operator's histogram), the delay
from a pod's completion to Succeeded in status (split into the Job controller's part and the
operator's), operator CPU seconds and peak RSS (/proc), API requests and status writes per job
(audit log, by phase). Results: benchmarks/operator/results/jobs-<N>[-<fault>].json.

With `--kueue` the real Kueue manager runs beside the operator (tests/localkube/kueue.py): a
ClusterQueue whose GPU quota fits every job, a LocalQueue that the operator's config makes the
namespace's default, so every Job is created suspended and runs once Kueue admits it; the operator
reads the Workloads. Results: jobs-<N>-kueue.json, with the admission delay (Job created to Job
unsuspended by Kueue).

Faults (long forms of tests/faults): `kill-operator` SIGKILLs the operator halfway through the
creations and starts it again; `restart-apiserver` restarts the API server while the pods complete;
`refuse-status` refuses every status write (a ValidatingAdmissionPolicy) while the pods complete,
then allows them again: only the periodic resync can repair status then.
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from e2e.harness import CRD, OperatorProcess, free_port  # noqa: E402
from localkube import kwokpods  # noqa: E402
from localkube.binaries import bin_dir, missing  # noqa: E402
from localkube.controlplane import ControlPlane  # noqa: E402
from localkube.kueue import Kueue, kueue_missing  # noqa: E402
from localkube.rest import HttpError, Rest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPERATOR_USER = "finetune-operator"
NAMESPACE = "bench"
GPUS_PER_NODE = 64
JOBS_PER_NODE = 50
RESYNC_SECONDS = 30.0
STATUS_WRITE_INTERVAL = 10.0
SPEC = {
    "model": {"hub": "unsloth/DeepSeek-R1-Distill-Llama-8B"},
    "data": {"hub": "FreedomIntelligence/medical-o1-reasoning-SFT", "config": "en", "split": "train[0:500]"},
    "template": {"type": "r1-reasoning"},
}
SUMMARY = json.dumps({"exitReason": "completed", "steps": 60, "totalSteps": 60, "finalLoss": 1.234})
FTJ_PATH = f"/apis/finetune.dev/v1alpha1/namespaces/{NAMESPACE}/finetunejobs"
SELECTOR = "app.kubernetes.io/managed-by=finetune-operator"
KUEUE_API = "kueue.x-k8s.io/v1beta2"
LOCAL_QUEUE = "gpu"
RECONCILE = "finetune_operator_reconcile_duration_seconds"
QUEUE = "finetune_operator_reconcile_queue_seconds"


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# -- what the watches saw ----------------------------------------------------------------------


@dataclass
class JobRecord:
    """One FineTuneJob's history as the driver's watches saw it (monotonic seconds)."""

    name: str
    created: float | None = None  # the driver's POST returned
    ftj_uid: str = ""
    phase: str | None = None
    phases: list[tuple[str, float]] = field(default_factory=list)
    preemptions: int = 0
    progress_step: int = 0
    step_seen: dict[int, float] = field(default_factory=dict)
    job_added: float | None = None
    job_uids: set[str] = field(default_factory=set)
    job_admitted: float | None = None  # first seen with suspend false (at once without Kueue)
    job_complete: float | None = None
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> newest pod
    pod_running: dict[str, float] = field(default_factory=dict)  # uid -> first seen Running
    completed_at: float | None = None  # the driver's completion patch returned

    def seen(self, phase: str) -> float | None:
        return next((t for p, t in self.phases if p == phase), None)

    def running_pod(self) -> dict[str, Any] | None:
        for pod in self.pods.values():
            status = pod.get("status") or {}
            if status.get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
                return pod
        return None


class Recorder:
    """Watches FineTuneJobs, Jobs and Pods (list, then watch; again after any error)."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.lock = threading.Lock()
        self.jobs: dict[str, JobRecord] = {}
        self.stopping = threading.Event()
        self.watch_restarts = Counter()
        self.threads = [
            threading.Thread(target=self._watch, args=(path, query, handler), daemon=True)
            for path, query, handler in (
                (FTJ_PATH, {}, self._ftj),
                (f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", {"labelSelector": SELECTOR}, self._job),
                (f"/api/v1/namespaces/{NAMESPACE}/pods", {"labelSelector": SELECTOR}, self._pod),
            )
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def record(self, name: str) -> JobRecord:
        rec = self.jobs.get(name)
        if rec is None:
            rec = self.jobs[name] = JobRecord(name)
        return rec

    def _watch(self, path: str, query: dict[str, Any], handler: Any) -> None:
        rest = Rest(self.kubeconfig)
        while not self.stopping.is_set():
            try:
                listing = rest.request("GET", path, query=query)
                rv = listing["metadata"]["resourceVersion"]
                for item in listing["items"]:
                    handler("LIST", item)
                watch_query = {**query, "resourceVersion": rv, "allowWatchBookmarks": "true"}
                for event in rest.watch(path, {**watch_query, "timeoutSeconds": 600}):
                    if event["type"] == "ERROR":
                        break
                    if event["type"] != "BOOKMARK":
                        handler(event["type"], event["object"])
            except Exception:
                time.sleep(0.5)
            self.watch_restarts[path] += 1

    def _ftj(self, kind: str, obj: dict[str, Any]) -> None:
        now = time.monotonic()
        status = obj.get("status") or {}
        with self.lock:
            rec = self.record(obj["metadata"]["name"])
            rec.ftj_uid = obj["metadata"]["uid"]
            phase = status.get("phase")
            if phase and phase != rec.phase:
                rec.phases.append((phase, now))
                rec.phase = phase
            rec.preemptions = int(status.get("preemptions") or 0)
            step = int((status.get("progress") or {}).get("step") or 0)
            rec.progress_step = step
            rec.step_seen.setdefault(step, now)

    def _job(self, kind: str, obj: dict[str, Any]) -> None:
        now = time.monotonic()
        owner = next((r["name"] for r in obj["metadata"].get("ownerReferences") or []), None)
        if owner is None:
            return
        with self.lock:
            rec = self.record(owner)
            rec.job_uids.add(obj["metadata"]["uid"])
            if rec.job_added is None:
                rec.job_added = now
            if rec.job_admitted is None and not (obj.get("spec") or {}).get("suspend"):
                rec.job_admitted = now
            conds = (obj.get("status") or {}).get("conditions") or []
            if rec.job_complete is None and any(
                c["type"] == "Complete" and c["status"] == "True" for c in conds
            ):
                rec.job_complete = now

    def _pod(self, kind: str, obj: dict[str, Any]) -> None:
        now = time.monotonic()
        job = (obj["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name")
        if not job:
            return
        uid = obj["metadata"]["uid"]
        with self.lock:
            rec = self.record(job)
            if kind == "DELETED":
                rec.pods.pop(uid, None)
                return
            rec.pods[uid] = obj
            if (obj.get("status") or {}).get("phase") == "Running":
                rec.pod_running.setdefault(uid, now)

    def count(self, predicate: Any) -> int:
        with self.lock:
            return sum(1 for r in self.jobs.values() if predicate(r))

    def wait_all(self, what: str, predicate: Any, n: int, timeout: float) -> float:
        """Seconds until `predicate` holds for `n` jobs; raises on timeout with the count reached."""
        t0 = time.monotonic()
        last = -1
        while True:
            done = self.count(predicate)
            if done >= n:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{what}: {done} of {n} after {timeout:.0f}s")
            if done != last and time.monotonic() - t0 > 5:
                last = done
            time.sleep(0.2)


# -- the operator's process and metrics ----------------------------------------------------------


class ProcSampler:
    """CPU seconds and RSS of the operator process (whatever its pid, across restarts), every 0.5 s."""

    def __init__(self, operator: OperatorProcess) -> None:
        self.operator = operator
        self.samples: list[tuple[float, float, float]] = []  # (t, rss MiB, cpu s of this pid)
        self.peak_mib = 0.0
        self.cpu_done = 0.0  # CPU seconds of earlier (killed) processes
        self._pid: int | None = None
        self._cpu_last = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.tick = os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self.thread.start()

    def _read(self, pid: int) -> tuple[float, float, float] | None:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / self.tick
        kib = {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}
        return cpu, kib.get("VmRSS", 0) / 1024, kib.get("VmHWM", 0) / 1024

    def sample(self) -> None:
        proc = self.operator.proc
        if proc is None:
            return
        if proc.pid != self._pid:
            self.cpu_done += self._cpu_last
            self._pid, self._cpu_last = proc.pid, 0.0
        got = self._read(proc.pid)
        if got is None:
            return
        cpu, rss, hwm = got
        self._cpu_last = cpu
        self.peak_mib = max(self.peak_mib, hwm, rss)
        self.samples.append((time.monotonic(), round(rss, 1), round(self.cpu_done + cpu, 2)))

    def _run(self) -> None:
        while not self.stopping.wait(0.5):
            self.sample()

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_done + self._cpu_last


def host_busy_seconds() -> float:
    """CPU-seconds the whole machine has been busy (all processes, all CPUs), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU-seconds of this driver process (its threads included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def scrape(operator: OperatorProcess) -> dict[str, float]:
    """The operator's /metrics as {series with labels: value}."""
    out: dict[str, float] = {}
    for line in operator.metrics().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


APISERVER_SERIES = re.compile(
    r"^(apiserver_request_total|apiserver_request_duration_seconds_sum|apiserver_watch_events_total"
    r"|apiserver_watch_events_sizes_sum)\{(.*)\} (\S+)$"
)


def apiserver_metrics(rest: Rest) -> dict[tuple[str, str], float]:
    """(series, "verb resource[/subresource]" or the watched kind) -> value, from /metrics."""
    response = rest.pool.request("GET", f"{rest.server}/metrics")
    out: dict[tuple[str, str], float] = defaultdict(float)
    for line in response.data.decode().splitlines():
        m = APISERVER_SERIES.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if m.group(1).startswith("apiserver_watch"):
            what = labels.get("kind", "") or labels.get("resource", "")
        else:
            what = labels.get("verb", "") + " " + labels.get("resource", "")
            if labels.get("subresource"):
                what += "/" + labels["subresource"]
        out[(m.group(1), what)] += float(m.group(3))
    return out


def apiserver_summary(before: dict, after: dict, n: int) -> dict[str, Any]:
    """Requests from every client and watch events sent, per job, with the API server's time."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}

    def series(name: str) -> dict[str, float]:
        return {what: v for (s, what), v in delta.items() if s == name and v > 0}

    requests = series("apiserver_request_total")
    seconds = series("apiserver_request_duration_seconds_sum")
    watch = series("apiserver_watch_events_total")
    watch_bytes = series("apiserver_watch_events_sizes_sum")
    top = sorted(requests, key=lambda w: -requests[w])[:15]
    slowest = [w for w in sorted(seconds, key=lambda w: -seconds[w]) if not w.startswith("WATCH")][:10]
    return {
        "requests_per_job_all_clients": round(sum(requests.values()) / n, 1),
        "top_requests_per_job": {w: round(requests[w] / n, 2) for w in top},
        "request_seconds_by_kind": {w: round(seconds[w], 1) for w in slowest},
        "watch_events_per_job": {k: round(v / n, 1) for k, v in sorted(watch.items(), key=lambda kv: -kv[1])},
        "watch_mib_sent": round(sum(watch_bytes.values()) / 2**20, 1),
    }


def histogram(metrics: dict[str, float], name: str) -> tuple[list[tuple[float, float]], float, float]:
    """([(upper bound, cumulative count)], count, sum) of a Prometheus histogram."""
    buckets = []
    for key, value in metrics.items():
        m = re.fullmatch(rf'{name}_bucket\{{le="([^"]+)"\}}', key)
        if m:
            buckets.append((math.inf if m.group(1) == "+Inf" else float(m.group(1)), value))
    buckets.sort()
    return buckets, metrics.get(f"{name}_count", 0.0), metrics.get(f"{name}_sum", 0.0)


def hist_delta(after: dict[str, float], before: dict[str, float], name: str) -> dict[str, float]:
    """`after - before` of a histogram's series (the reconciles of one phase)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if k.startswith(name)}


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q*count."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of `values`."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def dist(values: list[float]) -> dict[str, float | None]:
    r = lambda v: None if v is None else round(v, 3)  # noqa: E731
    return {
        "n": len(values),
        "p50": r(percentile(values, 0.5)),
        "p90": r(percentile(values, 0.9)),
        "p99": r(percentile(values, 0.99)),
        "max": r(max(values) if values else None),
    }


# -- the audit log -------------------------------------------------------------------------------


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def audit_requests(path: Path) -> list[dict[str, Any]]:
    """The operator's requests: one audit event each (stage ResponseComplete, or Panic)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("user", {}).get("username") != OPERATOR_USER:
            continue
        ref = ev.get("objectRef") or {}
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        out.append(
            {
                "t": parse_time(ev["requestReceivedTimestamp"]),
                "verb": ev.get("verb"),
                "resource": resource or ev.get("requestURI", "").split("?")[0],
                "code": (ev.get("responseStatus") or {}).get("code"),
            }
        )
    return out


def is_status_write(req: dict[str, Any]) -> bool:
    return req["resource"] == "finetunejobs/status" and req["verb"] in ("patch", "update")


# -- the run -------------------------------------------------------------------------------------


STAGES = ["burst", "running", "progress", "preempt", "complete", "idle"]


class Bench:
    def __init__(self, jobs: int, args: argparse.Namespace, workdir: Path) -> None:
        self.n = jobs
        self.args = args
        self.workdir = workdir
        nodes = max(3, math.ceil(jobs * (1 + args.preempt) / JOBS_PER_NODE) + 1)
        self.cp = ControlPlane(
            workdir / "cluster",
            bin_dir(),
            kwok_nodes=nodes,
            gpus_per_node=GPUS_PER_NODE,
            pods_per_node=4 * GPUS_PER_NODE,
            kwok_stages=kwokpods.MANUAL_POD_STAGES,
            audit_users=[OPERATOR_USER],
            unlimited_qps=True,
        )
        self.names = [f"ftj-{i:05d}" for i in range(jobs)]
        self.stage_walls: list[tuple[str, float]] = []  # (stage, wall-clock start)
        self.metrics_at: dict[str, dict[str, float]] = {}
        self.result: dict[str, Any] = {
            "jobs": jobs,
            "fault": args.fault,
            "kueue": args.kueue,
            "kwok_nodes": nodes,
        }
        self.operator: OperatorProcess | None = None
        self.sampler: ProcSampler | None = None
        self.cpu_at: dict[str, dict[str, float]] = {}

    # helpers

    def stage(self, name: str) -> None:
        assert self.operator is not None
        self.metrics_at[name] = scrape(self.operator)
        self.stage_walls.append((name, time.time()))
        cpu = self.control_plane_cpu()
        cpu["operator"] = self.sampler.cpu_seconds if self.sampler else 0.0
        cpu["driver"] = own_cpu_seconds()
        cpu["host"] = host_busy_seconds()
        self.cpu_at[name] = cpu
        log(f"stage {name}")

    def pool(self, threads: int = 16) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(threads)

    def retrying(self, rest: Rest, fn: Any, *args: Any) -> Any:
        """Call fn(rest, *args), retrying connection errors and 5xx for up to 60 s (API server restarts)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return fn(rest, *args)
            except HttpError as e:
                if e.status < 500 or time.monotonic() > deadline:
                    raise
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def run(self) -> dict[str, Any]:
        args = self.args
        log(f"{self.n} jobs: starting the control plane ({self.result['kwok_nodes']} kwok nodes)")
        self.cp.start()
        try:
            if args.kueue:
                kueue = Kueue(self.cp).start()
                self.result["kueue_startup_s"] = {k: round(v, 2) for k, v in kueue.timings.items()}
            return self._run()
        finally:
            if self.operator is not None:
                self.operator.stop()
            self.cp.stop()
            if not args.keep:
                shutil.rmtree(self.workdir / "cluster" / "etcd", ignore_errors=True)

    def _run(self) -> dict[str, Any]:
        args = self.args
        admin = self.cp.kubeconfig
        rest = Rest(admin)
        kubectl = str(self.cp.bin / "kubectl")
        subprocess.run(
            [kubectl, f"--kubeconfig={admin}", "apply", "--server-side", "-f", str(CRD)], check=True
        )
        subprocess.run(
            [
                kubectl,
                f"--kubeconfig={admin}",
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/finetunejobs.finetune.dev",
            ],
            check=True,
        )
        rest.request("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
        wait_for(lambda: _exists(rest, f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"), 60)
        rest.request(
            "POST",
            f"/api/v1/namespaces/{NAMESPACE}/secrets",
            {
                "metadata": {"name": "finetune-s3"},
                "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
            },
        )
        if args.kueue:
            self.queue_for_all(rest)
        progress_port = free_port()
        config: dict[str, Any] = {
            "storage": {"uri": "s3://bench/jobs", "endpoint": "http://127.0.0.1:9", "region": "us-east-1"},
            "defaultNodeSelector": {"type": "kwok"},
            "defaultTolerations": [kwokpods.KWOK_TOLERATION],
            "reportUrl": f"http://127.0.0.1:{progress_port}",
            # Every simulated pod reports from 127.0.0.1; on a cluster each has its own address
            # and its own budget, so the per-address rate limit is lifted here.
            "reportRatePerSecond": 1_000_000,
            "reportBurst": 1_000_000,
            "statusWriteIntervalSeconds": STATUS_WRITE_INTERVAL,
            "resyncSeconds": RESYNC_SECONDS,
            "ports": {"metrics": free_port(), "progress": progress_port, "health": free_port()},
        }
        if args.kueue:
            config["kueue"] = {"enabled": True, "defaultQueues": {NAMESPACE: LOCAL_QUEUE}}
        self.result["operator_config"] = {k: v for k, v in config.items() if k != "ports"}
        operator = self.operator = OperatorProcess(
            self.cp.kubeconfig_for(OPERATOR_USER, "system:masters"), config, self.workdir / "operator"
        )
        operator.start()
        sampler = self.sampler = ProcSampler(operator)
        sampler.start()
        recorder = Recorder(admin)
        recorder.start()
        time.sleep(1)
        idle_rss = sampler.samples[-1][1] if sampler.samples else None
        control_cpu0 = self.control_plane_cpu()
        host0, driver0, operator0, wall0 = (
            host_busy_seconds(),
            own_cpu_seconds(),
            sampler.cpu_seconds,
            time.time(),
        )
        load0 = os.getloadavg()[0]
        api0 = apiserver_metrics(rest)

        # 1. the burst
        self.stage("burst")
        t0 = time.monotonic()
        killed: dict[str, float] = {}
        creators = [Rest(admin) for _ in range(16)]
        local = threading.local()

        def create(name: str) -> None:
            if not hasattr(local, "rest"):
                local.rest = creators[hash(threading.get_ident()) % len(creators)]
            body = {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": name},
                "spec": SPEC,
            }
            self.retrying(local.rest, lambda r: r.request("POST", FTJ_PATH, body))
            with recorder.lock:
                recorder.record(name).created = time.monotonic()

        def kill_midway() -> None:
            target = self.n // 2
            while recorder.count(lambda r: r.created is not None) < target:
                time.sleep(0.01)
            killed["at"] = time.monotonic() - t0
            operator.kill()
            log(f"fault: operator SIGKILLed after {target} creations, restarting")
            operator.start()
            killed["ready"] = time.monotonic() - t0

        killer = None
        if args.fault == "kill-operator":
            killer = threading.Thread(target=kill_midway)
            killer.start()
        with self.pool() as pool:
            list(pool.map(create, self.names))
        created_s = time.monotonic() - t0
        if killer is not None:
            killer.join()
        recorder.wait_all("Jobs created", lambda r: r.job_added is not None, self.n, 900)
        with recorder.lock:
            all_jobs = max(r.job_added for r in recorder.jobs.values()) - t0
            create_lag = [r.job_added - r.created for r in recorder.jobs.values() if r.created]
        log(f"all {self.n} Jobs exist {all_jobs:.1f}s after the burst began (creations: {created_s:.1f}s)")
        self.result["burst"] = {
            "creations_s": round(created_s, 2),
            "all_jobs_created_s": round(all_jobs, 2),
            "job_after_ftj_s": dist(create_lag),
        }
        if killed:
            self.result["burst"]["operator_killed_at_s"] = round(killed["at"], 2)
            self.result["burst"]["operator_ready_again_s"] = round(killed["ready"], 2)

        # 2. every pod running, every job Running
        self.stage("running")
        recorder.wait_all("pods Running", lambda r: r.running_pod() is not None, self.n, 900)
        recorder.wait_all("FineTuneJobs Running", lambda r: r.phase == "Running", self.n, 900)
        with recorder.lock:
            recs = list(recorder.jobs.values())
            running_lag = [r.seen("Running") - min(r.pod_running.values()) for r in recs if r.pod_running]
            all_running = max(r.seen("Running") for r in recorder.jobs.values()) - t0
            admission_lag = [r.job_admitted - r.job_added for r in recs if r.job_admitted and r.job_added]
        self.result["running"] = {
            "all_running_s": round(all_running, 2),
            "running_after_pod_s": dist(running_lag),
        }
        if args.kueue:  # Job created (suspended) to Job unsuspended by Kueue
            self.result["running"]["admitted_after_job_s"] = dist(admission_lag)
        log(f"all Running {all_running:.1f}s after the burst began")

        # 3. progress reports
        self.stage("progress")
        self.result["progress"] = self.progress_rounds(recorder, progress_port)

        # 4. preemptions
        self.stage("preempt")
        self.result["preempt"] = self.preempt(recorder)

        # 5. completion (with the completion-time faults)
        self.stage("complete")
        self.result["complete"] = self.complete_all(recorder, operator)

        # 6. idle: one resync period and a bit
        self.stage("idle")
        time.sleep(RESYNC_SECONDS + 5)
        self.stage("end")
        sampler.stopping.set()
        sampler.sample()
        recorder.stopping.set()

        try:
            self.result["apiserver"] = apiserver_summary(api0, apiserver_metrics(Rest(admin)), self.n)
        except Exception as e:  # after an API server restart the counters start again
            self.result["apiserver"] = {"error": repr(e)}
        control = {k: round(v - control_cpu0.get(k, 0.0), 1) for k, v in self.control_plane_cpu().items()}
        self.result["control_plane_cpu_s"] = control
        wall = time.time() - wall0
        host = host_busy_seconds() - host0
        ours = sum(control.values()) + (own_cpu_seconds() - driver0) + (sampler.cpu_seconds - operator0)
        self.result["host"] = {
            "cpus": os.cpu_count(),
            "run_wall_s": round(wall, 1),
            "busy_cpu_s": round(host, 1),
            "bench_cpu_s": round(ours, 1),
            "other_processes_cpu_s": round(max(0.0, host - ours), 1),
            "loadavg_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        }
        self.summarise(recorder, sampler, idle_rss)
        return self.result

    def queue_for_all(self, rest: Rest) -> None:
        """A ResourceFlavor, a ClusterQueue with GPU, CPU and memory quota for every job (and the
        replacements of the preempted pods) and the namespace's LocalQueue."""
        gpus = self.n
        objects = [
            ("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": "kwok-gpu"}}),
            (
                "clusterqueues",
                {
                    "kind": "ClusterQueue",
                    "metadata": {"name": "bench"},
                    "spec": {
                        "namespaceSelector": {},
                        "resourceGroups": [
                            {
                                "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                                "flavors": [
                                    {
                                        "name": "kwok-gpu",
                                        "resources": [
                                            {"name": "cpu", "nominalQuota": str(64 * gpus)},
                                            {"name": "memory", "nominalQuota": f"{512 * gpus}Gi"},
                                            {"name": "nvidia.com/gpu", "nominalQuota": str(gpus)},
                                        ],
                                    }
                                ],
                            }
                        ],
                    },
                },
            ),
        ]
        for plural, body in objects:
            rest.request("POST", f"/apis/{KUEUE_API}/{plural}", {"apiVersion": KUEUE_API, **body})
        rest.request(
            "POST",
            f"/apis/{KUEUE_API}/namespaces/{NAMESPACE}/localqueues",
            {
                "apiVersion": KUEUE_API,
                "kind": "LocalQueue",
                "metadata": {"name": LOCAL_QUEUE},
                "spec": {"clusterQueue": "bench"},
            },
        )

    def control_plane_cpu(self) -> dict[str, float]:
        out = {}
        tick = os.sysconf("SC_CLK_TCK")
        for proc in self.cp.procs:
            try:
                fields = Path(f"/proc/{proc.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[proc.name] = out.get(proc.name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        return out

    def progress_rounds(self, recorder: Recorder, port: int) -> dict[str, Any]:
        """`ticks` rounds of one report per job, one round per status write interval."""
        ticks = self.args.ticks
        if ticks == 0:
            return {"rounds": 0}
        token_rest = [Rest(self.cp.kubeconfig) for _ in range(16)]
        with recorder.lock:
            pods = {r.name: r.running_pod() for r in recorder.jobs.values()}

        def token(item: tuple[int, str]) -> tuple[str, str]:
            i, name = item
            pod = pods[name]
            assert pod is not None
            body = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": ["finetune-operator"],
                    "expirationSeconds": 3600,
                    "boundObjectRef": {
                        "kind": "Pod",
                        "apiVersion": "v1",
                        "name": pod["metadata"]["name"],
                        "uid": pod["metadata"]["uid"],
                    },
                },
            }
            got = token_rest[i % 16].request(
                "POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default/token", body
            )
            return name, got["status"]["token"]

        with self.pool() as pool:
            tokens = dict(pool.map(token, enumerate(sorted(pods))))
        sent: dict[tuple[str, int], float] = {}
        answers: Counter[int] = Counter()

        def report(item: tuple[str, int]) -> None:
            name, step = item
            body = {
                "step": step,
                "totalSteps": 60,
                "loss": round(2.0 - step / 60, 4),
                "learningRate": 2e-4,
                "tokensPerSecond": 1234.5,
                "phase": "Training",
                "sequence": step,
                "reportedAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            }
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/namespaces/{NAMESPACE}/finetunejobs/{name}/progress",
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {tokens[name]}"},
            )
            t = time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answers[response.status] += 1
            except urllib.error.HTTPError as e:
                answers[e.code] += 1
            sent[(name, step)] = t

        t_rounds = time.monotonic()
        for r in range(1, ticks + 1):
            t_round = time.monotonic()
            with self.pool() as pool:
                list(pool.map(report, [(name, 10 * r) for name in sorted(pods)]))
            spent = time.monotonic() - t_round
            log(f"progress round {r}: {self.n} reports in {spent:.1f}s")
            if r < ticks:
                time.sleep(max(0.0, STATUS_WRITE_INTERVAL + 1 - spent))
        last = 10 * ticks
        recorder.wait_all("progress in status", lambda rec: rec.progress_step >= last, self.n, 300)
        with recorder.lock:
            lags = [
                rec.step_seen[step] - sent[(rec.name, step)]
                for rec in recorder.jobs.values()
                for step in range(10, last + 1, 10)
                if step in rec.step_seen and (rec.name, step) in sent
            ]
        return {
            "rounds": ticks,
            "reports": sum(answers.values()),
            "answers": dict(answers),
            "seconds": round(time.monotonic() - t_rounds, 1),
            "status_after_report_s": dist(lags),
        }

    def preempt(self, recorder: Recorder) -> dict[str, Any]:
        count = round(self.n * self.args.preempt)
        if count == 0:
            return {"preempted": 0}
        chosen = sorted(random.Random(1).sample(self.names, count))
        with recorder.lock:
            pods = {name: recorder.jobs[name].running_pod() for name in chosen}
        rests = [Rest(self.cp.kubeconfig) for _ in range(16)]
        done: dict[str, float] = {}

        def one(item: tuple[int, str]) -> None:
            i, name = item
            self.retrying(rests[i % 16], kwokpods.preempt, pods[name])
            done[name] = time.monotonic()

        t0 = time.monotonic()
        with self.pool() as pool:
            list(pool.map(one, enumerate(chosen)))
        chosen_set = set(chosen)
        recorder.wait_all(
            "preemptions counted",
            lambda r: (
                r.name in chosen_set
                and r.preemptions >= 1
                and r.running_pod() is not None
                and r.phase == "Running"
            ),
            count,
            600,
        )
        with recorder.lock:
            recs = [r for r in recorder.jobs.values() if r.name in chosen_set]
            replaced = [max(r.pod_running.values()) - done[r.name] for r in recs]
            counted = sum(r.preemptions for r in recorder.jobs.values())
        return {
            "preempted": count,
            "preemptions_in_status": counted,
            "all_running_again_s": round(time.monotonic() - t0, 2),
            "replacement_running_after_s": dist(replaced),
        }

    def complete_all(self, recorder: Recorder, operator: OperatorProcess) -> dict[str, Any]:
        args = self.args
        with recorder.lock:
            pods = {r.name: r.running_pod() for r in recorder.jobs.values()}
        rests = [Rest(self.cp.kubeconfig) for _ in range(16)]
        out: dict[str, Any] = {}
        pid = operator.proc.pid if operator.proc else None
        if args.fault == "refuse-status":
            refuse_status_writes(Rest(self.cp.kubeconfig), True)
            time.sleep(2)  # the policy takes effect within a second or so

        def one(item: tuple[int, str]) -> None:
            i, name = item
            self.retrying(rests[i % 16], kwokpods.complete, pods[name], SUMMARY)
            with recorder.lock:
                recorder.jobs[name].completed_at = time.monotonic()

        restarter = None
        if args.fault == "restart-apiserver":

            def restart() -> None:
                while recorder.count(lambda r: r.completed_at is not None) < self.n // 2:
                    time.sleep(0.01)
                log("fault: restarting the API server")
                out["apiserver_down_s"] = round(self.cp.restart_apiserver(down_seconds=2.0), 2)

            restarter = threading.Thread(target=restart)
            restarter.start()
        t0 = time.monotonic()
        with self.pool() as pool:
            list(pool.map(one, enumerate(sorted(pods))))
        out["completions_s"] = round(time.monotonic() - t0, 2)
        if restarter is not None:
            restarter.join()
        if args.fault == "refuse-status":
            recorder.wait_all("Jobs Complete", lambda r: r.job_complete is not None, self.n, 600)
            time.sleep(2)
            stuck = self.n - recorder.count(lambda r: r.phase == "Succeeded")
            refuse_status_writes(Rest(self.cp.kubeconfig), False)
            out["refused_until"] = round(time.monotonic() - t0, 2)
            out["not_succeeded_when_allowed_again"] = stuck
            t_allowed = time.monotonic()
        recorder.wait_all("FineTuneJobs Succeeded", lambda r: r.phase == "Succeeded", self.n, 900)
        with recorder.lock:
            recs = list(recorder.jobs.values())
            total = [r.seen("Succeeded") - r.completed_at for r in recs if r.completed_at]
            controller = [r.job_complete - r.completed_at for r in recs if r.job_complete and r.completed_at]
            ours = [r.seen("Succeeded") - r.job_complete for r in recs if r.job_complete]
            all_done = max(r.seen("Succeeded") for r in recs) - t0
        out.update(
            all_succeeded_s=round(all_done, 2),
            succeeded_after_pod_s=dist(total),
            job_complete_after_pod_s=dist(controller),
            succeeded_after_job_complete_s=dist(ours),
        )
        if args.fault == "refuse-status":
            out["converged_after_allowed_s"] = round(max(r.seen("Succeeded") for r in recs) - t_allowed, 2)
        if args.fault == "restart-apiserver":
            out["operator_restarted"] = operator.proc is None or operator.proc.pid != pid
        return out

    def summarise(self, recorder: Recorder, sampler: ProcSampler, idle_rss: float | None) -> None:
        n = self.n
        end = self.metrics_at["end"]
        buckets, count, total = histogram(end, RECONCILE)
        per_stage = {}
        for i, (name, _) in enumerate(self.stage_walls[:-1]):
            nxt = self.stage_walls[i + 1][0]
            delta = hist_delta(self.metrics_at[nxt], self.metrics_at[name], RECONCILE)
            b, c, s = histogram(delta, RECONCILE)
            qdelta = hist_delta(self.metrics_at[nxt], self.metrics_at[name], QUEUE)
            qb, _, _ = histogram(qdelta, QUEUE)
            per_stage[name] = {
                "reconciles": int(c),
                "p50_s": _r(quantile(b, 0.5)),
                "p99_s": _r(quantile(b, 0.99)),
                "mean_s": _r(s / c if c else None),
                "queue_p50_s": _r(quantile(qb, 0.5)),
                "queue_p99_s": _r(quantile(qb, 0.99)),
            }
        stages = [name for name, _ in self.stage_walls]
        self.result["cpu_s_by_stage"] = {
            name: {
                k: round(v - self.cpu_at[name].get(k, 0.0), 1) for k, v in self.cpu_at[stages[i + 1]].items()
            }
            for i, name in enumerate(stages[:-1])
        }
        requests = audit_requests(self.cp.audit_log)
        walls = self.stage_walls

        def stage_of(t: float) -> str:
            i = bisect.bisect_right([w for _, w in walls], t) - 1
            return walls[i][0] if i >= 0 else "startup"

        by_stage: dict[str, Counter[str]] = defaultdict(Counter)
        writes_by_stage: Counter[str] = Counter()
        by_kind: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        for req in requests:
            st = stage_of(req["t"])
            key = f"{req['verb']} {req['resource']}"
            by_stage[st][key] += 1
            by_kind[key] += 1
            codes[str(req["code"])] += 1
            if is_status_write(req):
                writes_by_stage[st] += 1
        status_writes = sum(writes_by_stage.values())
        with recorder.lock:
            recs = list(recorder.jobs.values())
            transitions = sum(len(r.phases) for r in recs)
            duplicates = sum(1 for r in recs if len(r.job_uids) > 1)
            without_job = sum(1 for r in recs if not r.job_uids)
            preemptions = sum(r.preemptions for r in recs)
        ticks = self.result["progress"].get("rounds", 0)
        complete = self.result["complete"]
        errors = end.get("finetune_operator_reconcile_errors_total", 0)
        qb, _, _ = histogram(end, QUEUE)
        self.result.update(
            {
                "all_jobs_created_s": self.result["burst"]["all_jobs_created_s"],
                "reconcile_queue_p50_s": _r(quantile(qb, 0.5)),
                "reconcile_queue_p99_s": _r(quantile(qb, 0.99)),
                "reconcile_p50_s": _r(quantile(buckets, 0.5)),
                "reconcile_p99_s": _r(quantile(buckets, 0.99)),
                "reconcile_mean_s": _r(total / count if count else None),
                "reconciles": int(count),
                "reconciles_per_job": round(count / n, 2),
                "reconcile_errors": int(errors),
                "reconcile_by_stage": per_stage,
                "succeeded_lag_p50_s": complete["succeeded_after_pod_s"]["p50"],
                "succeeded_lag_p99_s": complete["succeeded_after_pod_s"]["p99"],
                "operator_lag_after_job_complete_p99_s": complete["succeeded_after_job_complete_s"]["p99"],
                "operator_cpu_s": round(sampler.cpu_seconds, 1),
                "operator_cpu_ms_per_job": round(1000 * sampler.cpu_seconds / n, 1),
                "operator_peak_rss_mib": round(sampler.peak_mib, 1),
                "operator_idle_rss_mib": idle_rss,
                "api_requests": len(requests),
                "api_requests_per_job": round(len(requests) / n, 2),
                "api_requests_by_kind": dict(by_kind.most_common()),
                "api_requests_by_stage": {k: dict(v.most_common()) for k, v in by_stage.items()},
                "api_response_codes": dict(codes),
                "status_writes": status_writes,
                "status_writes_per_job": round(status_writes / n, 2),
                "status_writes_by_stage": dict(writes_by_stage),
                "phase_transitions_per_job": round(transitions / n, 2),
                "progress_rounds": ticks,
                "status_writes_expected_per_job": round(transitions / n + ticks, 2),
                "preemptions_counted": preemptions,
                "duplicate_jobs": duplicates,
                "ftjs_without_job": without_job,
                "watch_restarts_of_driver": dict(recorder.watch_restarts),
                "rss_samples": sampler.samples[:: max(1, len(sampler.samples) // 400)],
                "stage_starts_s": {name: round(w - walls[0][1], 2) for name, w in walls},
                "platform": {"machine": platform.machine(), "python": platform.python_version()},
                "commit": _commit(),
                "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )


def _commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "diff", "--quiet", "--", "operator"], check=False
    ).returncode
    return done.stdout.strip() + ("+dirty operator" if dirty else "")


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _exists(rest: Rest, path: str) -> bool:
    try:
        rest.request("GET", path)
        return True
    except HttpError:
        return False


def wait_for(ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.2)


POLICY = "finetune-fault-refuse-status"


def refuse_status_writes(rest: Rest, on: bool) -> None:
    """A ValidatingAdmissionPolicy (and its binding) refusing every FineTuneJob status write: the
    operator's writes fail, and no event tells it when they would succeed again."""
    base = "/apis/admissionregistration.k8s.io/v1"
    if not on:
        for kind in ("validatingadmissionpolicybindings", "validatingadmissionpolicies"):
            try:
                rest.request("DELETE", f"{base}/{kind}/{POLICY}")
            except HttpError as e:
                if e.status != 404:
                    raise
        return
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
                "validations": [{"expression": "false", "message": "fault injection: status writes refused"}],
            },
        },
    )
    rest.request(
        "POST",
        f"{base}/validatingadmissionpolicybindings",
        {"metadata": {"name": POLICY}, "spec": {"policyName": POLICY, "validationActions": ["Deny"]}},
    )


def wait_until_quiet(load: float, timeout: float) -> None:
    """Other work on the machine skews every figure: wait (bounded) for the load to drop."""
    deadline = time.monotonic() + timeout
    while os.getloadavg()[0] > load and time.monotonic() < deadline:
        time.sleep(5)
    log(f"load average {os.getloadavg()[0]:.2f} at the start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--ticks", type=int, default=2, help="progress report rounds per job")
    parser.add_argument("--preempt", type=float, default=0.2, help="share of pods preempted once")
    parser.add_argument(
        "--fault", choices=["none", "kill-operator", "restart-apiserver", "refuse-status"], default="none"
    )
    parser.add_argument("--kueue", action="store_true", help="with the Kueue manager admitting every Job")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the result file (jobs-N[-fault][-tag].json)")
    parser.add_argument(
        "--quiet-load", type=float, default=1.5, help="wait for a 1-minute load average below this first"
    )
    parser.add_argument("--quiet-wait", type=float, default=600, help="at most this long (seconds)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's files (logs are kept anyway)")
    args = parser.parse_args(argv)
    if absent := missing():
        print(f"binaries missing ({', '.join(absent)}): run `make cluster-bins`", file=sys.stderr)
        return 2
    if args.kueue and kueue_missing():
        print("the Kueue manager is missing: run `make cluster-bins`", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for n in args.jobs:
        wait_until_quiet(args.quiet_load, args.quiet_wait)
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-operator-{n}-"))
        result = Bench(n, args, workdir).run()
        result["workdir"] = str(workdir)
        suffix = (
            ("" if args.fault == "none" else f"-{args.fault}")
            + ("-kueue" if args.kueue else "")
            + (f"-{args.tag}" if args.tag else "")
        )
        path = args.out / f"jobs-{n}{suffix}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        headline = {
            k: result.get(k)
            for k in (
                "all_jobs_created_s",
                "reconcile_p50_s",
                "reconcile_p99_s",
                "succeeded_lag_p99_s",
                "operator_peak_rss_mib",
                "operator_cpu_s",
                "api_requests_per_job",
                "status_writes_per_job",
                "duplicate_jobs",
                "ftjs_without_job",
            )
        }
        log(f"{n} jobs: {json.dumps(headline)} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
