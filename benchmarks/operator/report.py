"""Figures across scales: results/jobs-<N>.json -> results/latest.json, results/scaling.json and
results/plot.png.

    python benchmarks/operator/report.py [--results DIR]

latest.json is the largest fault-free run (the 1,000-job run once it exists) with the headline
keys first; scaling.json lists the headline figures of every scale, each with its growth
exponent against N (log-log slope from the smallest to the largest scale: 1.0 grows like N,
above 1 faster).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
HEADLINE = [
    "jobs",
    "all_jobs_created_s",
    "reconcile_p50_s",
    "reconcile_p99_s",
    "reconcile_queue_p99_s",
    "succeeded_lag_p50_s",
    "succeeded_lag_p99_s",
    "operator_lag_after_job_complete_p99_s",
    "operator_peak_rss_mib",
    "operator_cpu_s",
    "operator_cpu_ms_per_job",
    "api_requests_per_job",
    "status_writes_per_job",
    "status_writes_expected_per_job",
    "reconciles_per_job",
    "duplicate_jobs",
    "ftjs_without_job",
]
TOTALS = {  # figures whose growth against N is the question (totals, not per-job ratios)
    "all_jobs_created_s": "time until every Job exists",
    "operator_cpu_s": "operator CPU seconds",
    "api_requests": "operator API requests",
    "status_writes": "status writes",
    "reconciles": "reconciles",
    "operator_peak_rss_mib": "operator peak RSS",
}


def load(results: Path) -> dict[int, dict[str, Any]]:
    runs = {}
    for path in results.glob("jobs-*.json"):
        if m := re.fullmatch(r"jobs-(\d+)\.json", path.name):
            runs[int(m.group(1))] = json.loads(path.read_text())
    return dict(sorted(runs.items()))


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / den, 2) if den else None


def scaling(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    ns = list(runs)
    table = {n: {k: r.get(k) for k in HEADLINE} for n, r in runs.items()}
    growth = {}
    for key, what in TOTALS.items():
        label = what
        ys = [runs[n].get(key) for n in ns]
        if key == "operator_peak_rss_mib":  # the growth of what the jobs add, not of the interpreter
            ys = [
                (runs[n].get(key) or 0) - (runs[n].get("operator_idle_rss_mib") or 0)
                if runs[n].get(key)
                else None
                for n in ns
            ]
            label += " above idle"
        growth[key] = {"what": label, "values": dict(zip(ns, ys, strict=True)), "exponent": slope(ns, ys)}
    return {"scales": ns, "headline": table, "growth_vs_jobs": growth}


def variants(results: Path) -> dict[str, Any]:
    """The fault runs and the progress-tick variants, headline figures and what the fault did."""
    out = {}
    for path in sorted(results.glob("jobs-*-*.json")):
        r = json.loads(path.read_text())
        entry = {k: r.get(k) for k in HEADLINE}
        entry["progress_rounds"] = r.get("progress_rounds")
        for part in ("burst", "complete"):
            entry[part] = {
                k: v
                for k, v in (r.get(part) or {}).items()
                if k.startswith(("operator_", "apiserver_", "refused", "not_succeeded", "converged", "all_"))
            }
        entry["other_processes_cpu_s"] = (r.get("host") or {}).get("other_processes_cpu_s")
        out[path.stem] = entry
    return out


def plot(runs: dict[int, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = list(runs)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    fig.suptitle(
        "finetune-operator: N FineTuneJobs at once on a real API server (kwok pods, 2-CPU host)", fontsize=12
    )

    ax = axes[0][0]
    ax.plot(ns, [runs[n]["all_jobs_created_s"] for n in ns], "o-", label="every Job exists")
    ax.plot(ns, [runs[n]["running"]["all_running_s"] for n in ns], "s-", label="every job Running")
    ax.axhline(60, color="red", ls=":", label="target: Jobs within 60 s")
    ax.set(xlabel="jobs", ylabel="seconds after the burst began", title="Burst")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    ax.plot(ns, [runs[n]["reconcile_p50_s"] for n in ns], "o-", label="reconcile p50")
    ax.plot(ns, [runs[n]["reconcile_p99_s"] for n in ns], "s-", label="reconcile p99")
    ax.plot(ns, [runs[n].get("reconcile_queue_p99_s") for n in ns], "^--", label="queue wait p99")
    ax.axhline(1, color="red", ls=":", label="target: p99 < 1 s")
    ax.set(xlabel="jobs", ylabel="seconds", title="Reconcile duration and queue wait", yscale="log")
    ax.legend(fontsize=8)

    ax = axes[0][2]
    ax.plot(ns, [runs[n]["succeeded_lag_p99_s"] for n in ns], "o-", label="pod done -> Succeeded, p99")
    ax.plot(
        ns,
        [runs[n]["complete"]["job_complete_after_pod_s"]["p99"] for n in ns],
        "s--",
        label="pod done -> Job Complete (controller-manager), p99",
    )
    ax.plot(
        ns,
        [runs[n]["operator_lag_after_job_complete_p99_s"] for n in ns],
        "^-",
        label="Job Complete -> Succeeded (operator), p99",
    )
    ax.set(xlabel="jobs", ylabel="seconds", title="Completion to Succeeded (all pods end at once)")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    for n in ns:
        samples = runs[n].get("rss_samples") or []
        if samples:
            t0 = samples[0][0]
            ax.plot([s[0] - t0 for s in samples], [s[1] for s in samples], label=f"{n} jobs")
    ax.axhline(300, color="red", ls=":", label="target: peak < 300 MiB")
    ax.set(xlabel="seconds into the run", ylabel="MiB", title="Operator RSS")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    ax.plot(ns, [runs[n]["operator_cpu_s"] for n in ns], "o-", label="operator")
    for comp in ("kube-apiserver", "etcd", "kube-controller-manager"):
        ax.plot(ns, [runs[n]["control_plane_cpu_s"].get(comp) for n in ns], "--", label=comp)
    ax.set(xlabel="jobs", ylabel="CPU seconds, whole run", title="CPU")
    ax.legend(fontsize=8)

    ax = axes[1][2]
    width = 0.35
    xs = range(len(ns))
    ax.bar(
        [x - width / 2 for x in xs],
        [runs[n]["api_requests_per_job"] for n in ns],
        width,
        label="API requests",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [runs[n]["status_writes_per_job"] for n in ns],
        width,
        label="status writes",
    )
    ax.plot(
        list(xs),
        [runs[n]["status_writes_expected_per_job"] for n in ns],
        "k_",
        ms=30,
        label="transitions + ticks",
    )
    ax.set_xticks(list(xs), [str(n) for n in ns])
    top = max(runs[n]["api_requests_per_job"] for n in ns)
    ax.set(
        xlabel="jobs", ylabel="per job", title="Operator requests per job (audit log)", ylim=(0, top * 1.4)
    )
    ax.legend(fontsize=8, loc="upper left", ncol=3)

    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = load(args.results)
    if not runs:
        print(f"no results/jobs-*.json in {args.results}: run bench.py first", file=sys.stderr)
        return 1
    largest = max(runs)
    latest = {k: runs[largest].get(k) for k in HEADLINE}
    latest.update({k: v for k, v in runs[largest].items() if k not in latest and k != "rss_samples"})
    (args.results / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    summary = scaling(runs)
    summary["variants"] = variants(args.results)
    (args.results / "scaling.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(runs, args.results / "plot.png")
    print(json.dumps(scaling(runs)["growth_vs_jobs"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
