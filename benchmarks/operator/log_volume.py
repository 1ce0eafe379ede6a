"""The operator's log under permanently failing jobs: lines counted, not estimated (issue 16).

    python benchmarks/operator/log_volume.py --minutes 30

A fresh local control plane (etcd, kube-apiserver with an audit log of the operator's requests,
controller-manager, scheduler, kwok GPU nodes) and the operator as a process with its default
resync period, backoff and pod-create grace period. One FineTuneJob per namespace, each failing in
its own permanent way, and one that runs:

- `job-quota`: a ResourceQuota of 0 Jobs, so every Job create is refused with 403;
- `priorityclass`: `priorityClassName` names a PriorityClass that does not exist;
- `serviceaccount`: `serviceAccountName` names an allowed ServiceAccount that does not exist;
- `gpu-quota`: a ResourceQuota of 0 `requests.nvidia.com/gpu`, the job asking for one GPU;
- `control`: a valid job, whose pod kwok keeps Running.

Every 10 s for the first 400 s (past the default 300 s pod-create grace), then every minute, the
driver samples each job's phase and reason; at the end it counts the operator's
log lines (in all and attributed to a job by its namespace), the operator's API requests per job
from the audit log (Job create attempts, status writes, all), and the reconciles the operator's
own metrics counted. Prints the result and writes results/log-volume-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import OPERATOR_USER, _commit, _exists, scrape, wait_for  # noqa: E402
from e2e.harness import CRD, OperatorProcess, free_port  # noqa: E402
from localkube import kwokpods  # noqa: E402
from localkube.binaries import bin_dir, missing  # noqa: E402
from localkube.controlplane import ControlPlane  # noqa: E402
from localkube.rest import Rest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
API = "/apis/finetune.dev/v1alpha1"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SPEC: dict[str, Any] = {
    "model": {"hub": "unsloth/Qwen3-8B"},
    "data": {"hub": "FreedomIntelligence/medical-o1-reasoning-SFT", "config": "en", "split": "train[0:500]"},
}

STORAGE_SECRET = {
    "metadata": {"name": "finetune-s3"},
    "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
}
"""The default storage credentials in each namespace, so that only the intended faults remain."""


def quota(name: str, hard: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name}, "spec": {"hard": hard}}


CASES: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "job-quota": ({}, quota("no-jobs", {"count/jobs.batch": "0"})),
    "priorityclass": ({"priorityClassName": "no-such-class"}, None),
    "serviceaccount": ({"serviceAccountName": "no-such-sa"}, None),
    "gpu-quota": ({}, quota("no-gpus", {"requests.nvidia.com/gpu": "0"})),
    "control": ({}, None),
}
"""namespace (lv-<case>) -> (spec patch, ResourceQuota created before the job)."""


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def status_of(rest: Rest, ns: str) -> dict[str, Any]:
    status = rest.request("GET", f"{API}/namespaces/{ns}/finetunejobs/job").get("status") or {}
    condition = (status.get("conditions") or [{}])[0]
    return {
        "phase": status.get("phase"),
        "reason": condition.get("reason"),
        "message": status.get("message"),
    }


def log_lines(path: Path) -> list[tuple[str, str]]:
    """(namespace or "", time) of each line of the operator's log; "" for lines about no job."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            out.append(("", ""))
            continue
        ns = entry.get("namespace") or (entry.get("object") or {}).get("namespace") or ""
        out.append((ns, entry.get("time", "")))
    return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cp = ControlPlane(
        workdir / "cluster",
        bin_dir(),
        kwok_nodes=2,
        gpus_per_node=8,
        kwok_stages=kwokpods.MANUAL_POD_STAGES,
        audit_users=[OPERATOR_USER],
    )
    commit = _commit()  # what the operator runs: the tree may move on while it does
    log("starting the control plane")
    cp.start()
    operator: OperatorProcess | None = None
    try:
        rest = Rest(cp.kubeconfig)
        kubectl = str(cp.bin / "kubectl")
        subprocess.run(
            [kubectl, f"--kubeconfig={cp.kubeconfig}", "apply", "--server-side", "-f", str(CRD)], check=True
        )
        # Right after Established the API server still answers 429 "storage is (re)initializing"
        # for a moment: wait until FineTuneJobs can be listed.
        wait_for(lambda: _exists(rest, f"{API}/finetunejobs"), 90)
        for case, (_, rq) in CASES.items():
            ns = f"lv-{case}"
            rest.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
            wait_for(lambda ns=ns: _exists(rest, f"/api/v1/namespaces/{ns}/serviceaccounts/default"), 60)
            rest.request("POST", f"/api/v1/namespaces/{ns}/secrets", STORAGE_SECRET)
            if rq:
                rest.request("POST", f"/api/v1/namespaces/{ns}/resourcequotas", rq)
        progress = free_port()
        config: dict[str, Any] = {
            "storage": {"uri": "s3://bench/jobs", "endpoint": "http://127.0.0.1:9", "region": "us-east-1"},
            "defaultNodeSelector": {"type": "kwok"},
            "defaultTolerations": [kwokpods.KWOK_TOLERATION, GPU_TOLERATION],
            "reportUrl": f"http://127.0.0.1:{progress}",
            "policy": {"serviceAccounts": ["no-such-sa"]},
            "ports": {"metrics": free_port(), "progress": progress, "health": free_port()},
        }
        operator = OperatorProcess(
            cp.kubeconfig_for(OPERATOR_USER, "system:masters"), config, workdir / "operator"
        )
        operator.start()
        time.sleep(2)
        lines_at_start = len(log_lines(operator.log_path))
        t0 = time.time()
        for case, (patch, _) in CASES.items():
            body = {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "job"},
                "spec": {**SPEC, **patch},
            }
            rest.request("POST", f"{API}/namespaces/lv-{case}/finetunejobs", body)
        log(f"{len(CASES)} jobs created; running for {args.minutes:g} minutes")
        samples: list[dict[str, Any]] = []
        end = t0 + args.minutes * 60
        while True:
            now = time.time()
            sample: dict[str, Any] = {"t_s": round(now - t0, 1)}
            for case in CASES:
                sample[case] = status_of(rest, f"lv-{case}")
            sample["log_lines"] = len(log_lines(operator.log_path)) - lines_at_start
            samples.append(sample)
            log(
                f"t={sample['t_s']:.0f}s lines={sample['log_lines']} "
                + " ".join(f"{c}={sample[c]['phase']}/{sample[c]['reason']}" for c in CASES)
            )
            if now >= end:
                break
            # every 10 s while the waiting jobs reach their reasons and the grace period ends
            time.sleep(min(10.0 if now - t0 < 400 else 60.0, max(0.0, end - now)))
        seconds = time.time() - t0
        metrics = scrape(operator)
        time.sleep(2)  # the audit log is written in batches of at most 1 s
        return summarise(
            commit=commit,
            seconds=seconds,
            operator=operator,
            audit_log=cp.audit_log,
            lines_at_start=lines_at_start,
            samples=samples,
            metrics=metrics,
            config=config,
        )
    finally:
        if operator is not None:
            operator.stop()
        cp.stop()
        shutil.rmtree(workdir / "cluster" / "etcd", ignore_errors=True)


def summarise(
    *,
    commit: str,
    seconds: float,
    operator: OperatorProcess,
    audit_log: Path,
    lines_at_start: int,
    samples: list[dict[str, Any]],
    metrics: dict[str, float],
    config: dict[str, Any],
) -> dict[str, Any]:
    lines = log_lines(operator.log_path)[lines_at_start:]
    by_ns = Counter(ns for ns, _ in lines)
    hours = seconds / 3600
    per_ns: dict[str, Counter[str]] = defaultdict(Counter)
    for ns, verb, resource, code in audit_requests_by_ns(audit_log):
        per_ns[ns][f"{verb} {resource} {code}"] += 1
    jobs: dict[str, Any] = {}
    for case in CASES:
        ns = f"lv-{case}"
        reqs = per_ns.get(ns, Counter())
        job_creates = sum(n for k, n in reqs.items() if k.startswith("create jobs "))
        status_writes = sum(
            n
            for k, n in reqs.items()
            if k.split()[0] in ("patch", "update") and k.split()[1] == "finetunejobs/status"
        )
        first_final = next(
            (
                s["t_s"]
                for s in samples
                if s[case]["phase"] == samples[-1][case]["phase"]
                and s[case]["reason"] == samples[-1][case]["reason"]
            ),
            None,
        )
        jobs[case] = {
            "final": samples[-1][case],
            "final_state_first_seen_s": first_final,
            "log_lines": by_ns.get(ns, 0),
            "log_lines_per_hour": round(by_ns.get(ns, 0) / hours, 1),
            "job_create_attempts": job_creates,
            "status_writes": status_writes,
            "operator_requests": sum(reqs.values()),
            "operator_requests_by_kind": dict(sorted(reqs.items())),
        }
    total = len(lines)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "minutes": round(seconds / 60, 2),
        "operator_config": {k: v for k, v in config.items() if k != "ports"},
        "log_lines_total": total,
        "log_lines_per_hour": round(total / hours, 1),
        "log_lines_about_no_job": by_ns.get("", 0),
        "reconciles_total": metrics.get("finetune_operator_reconcile_duration_seconds_count", 0.0),
        "reconcile_errors_total": metrics.get("finetune_operator_reconcile_errors_total", 0.0),
        "jobs": jobs,
        "samples": samples,
    }


def audit_requests_by_ns(path: Path) -> list[tuple[str, str, str, int | None]]:
    """(namespace, verb, resource, code) of each of the operator's requests in the audit log (bench.py's
    parser drops the namespace)."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("user", {}).get("username") != OPERATOR_USER:
            continue
        ref = ev.get("objectRef") or {}
        resource = ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else "")
        out.append(
            (
                ref.get("namespace", ""),
                ev.get("verb", ""),
                resource,
                (ev.get("responseStatus") or {}).get("code"),
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the result file (log-volume-<date>[-tag].json)")
    args = parser.parse_args(argv)
    if absent := missing():
        print(f"binaries missing ({', '.join(absent)}): run `make cluster-bins`", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-log-volume-"))
    result = run(args, workdir)
    result["workdir"] = str(workdir)
    tag = f"-{args.tag}" if args.tag else ""
    path = args.out / f"log-volume-{datetime.now(UTC).strftime('%Y%m%d')}{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    log(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
