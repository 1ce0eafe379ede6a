"""The operator's Prometheus metrics.

Per-job series (`{namespace,name}`) exist only while the FineTuneJob exists: `forget()` removes
them on deletion, so label cardinality is bounded by the number of live jobs. Values are derived
from status (which every replica's watch sees), so they survive operator restarts as far as status
does. The per-job usage counters (GPU-seconds, seconds queued) follow status.usage: a new replica
or a restarted operator starts them at the job's total so far, not at zero; the other counters
restart from zero like any Prometheus counter.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PHASES = ("Pending", "Queued", "Running", "Preempted", "Suspended", "Succeeded", "Failed")
ACTIVE = ("Pending", "Queued", "Running", "Preempted", "Suspended")


class OperatorMetrics:
    """All series in one registry (the HTTP endpoint serves exactly this registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("finetune_operator_jobs", "FineTuneJobs by phase.", ["phase"], registry=r)
        self.reconcile_duration = Histogram(
            "finetune_operator_reconcile_duration_seconds",
            "Time to reconcile one FineTuneJob (Job create/patch and status write).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.reconcile_queue = Histogram(
            "finetune_operator_reconcile_queue_seconds",
            "Time from a change to a FineTuneJob (or its Job or pods) until its reconcile starts.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.reconcile_errors = Counter(
            "finetune_operator_reconcile_errors", "Reconciles that raised an error.", registry=r
        )
        self.preemptions = Counter(
            "finetune_operator_preemptions",
            "Training pods preempted or evicted (counted once per pod).",
            registry=r,
        )
        self.checkpoints = Counter(
            "finetune_operator_checkpoints", "Complete checkpoints reported by trainers.", registry=r
        )
        self.checkpoint_duration = Histogram(
            "finetune_operator_checkpoint_duration_seconds",
            "Time from saving a checkpoint to its upload being complete, as reported by the trainer.",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.progress_reports = Counter(
            "finetune_operator_progress_reports",
            "Progress reports received, by result"
            " (accepted, stale, unauthorized, forbidden, limited, invalid, standby).",
            ["result"],
            registry=r,
        )
        self.token_reviews = Counter(
            "finetune_operator_token_reviews",
            "TokenReviews made for progress reports (cached verdicts and rate-limited requests make none).",
            registry=r,
        )
        self.gpu_seconds = Counter(
            "finetune_operator_gpu_seconds",
            "GPU-seconds consumed by a job (GPUs x time Running, from status.usage).",
            ["namespace", "name"],
            registry=r,
        )
        self.queued_seconds = Counter(
            "finetune_operator_queued_seconds",
            "Seconds a job waited for Kueue to admit it (phase Queued, from status.usage).",
            ["namespace", "name"],
            registry=r,
        )
        self.step = Gauge(
            "finetune_operator_job_step",
            "Optimizer step of an active job.",
            ["namespace", "name"],
            registry=r,
        )
        self.loss = Gauge(
            "finetune_operator_job_loss",
            "Latest training loss of an active job.",
            ["namespace", "name"],
            registry=r,
        )
        for phase in PHASES:
            self.jobs.labels(phase).set(0)
        self._phases: dict[tuple[str, str], str] = {}
        self._usage: dict[tuple[str, str], dict[str, float]] = {}

    def observe_job(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Refresh the per-job series and the phase counts from a job's status."""
        key = (namespace, name)
        phase = status.get("phase")
        if phase in PHASES:
            self._set_phase(key, phase)
        progress = status.get("progress") or {}
        self._observe_usage(key, status.get("usage") or {})
        if phase in ACTIVE and progress.get("step") is not None:
            self.step.labels(namespace, name).set(progress["step"])
            if progress.get("loss") is not None:
                self.loss.labels(namespace, name).set(progress["loss"])
        else:
            self._remove_live(namespace, name)

    def observe_checkpoint(
        self, old_status: dict[str, Any], patch: dict[str, Any], report: dict[str, Any] | None
    ) -> None:
        """Count a checkpoint that a status write (`patch` over `old_status`) just recorded, with
        its upload time when `report`, the trainer's report the patch was computed from, has it."""
        new = patch.get("checkpoint")
        if not new or new.get("step") == (old_status.get("checkpoint") or {}).get("step"):
            return
        self.checkpoints.inc()
        ckpt = (report or {}).get("checkpoint") or {}
        if ckpt.get("step") == new.get("step") and isinstance(ckpt.get("uploadSeconds"), int | float):
            self.checkpoint_duration.observe(ckpt["uploadSeconds"])

    def _observe_usage(self, key: tuple[str, str], usage: dict[str, Any]) -> None:
        """Advance the usage counters to status.usage (they never go back: an older status that
        arrives late changes nothing)."""
        seen = self._usage.setdefault(key, {})
        for field, counter in (("gpuSeconds", self.gpu_seconds), ("queuedSeconds", self.queued_seconds)):
            total = float(usage.get(field) or 0.0)
            if field not in seen:
                counter.labels(*key)  # the series exists from the job's first status on
                seen[field] = 0.0
            if total > seen[field]:
                counter.labels(*key).inc(total - seen[field])
                seen[field] = total

    def forget(self, namespace: str, name: str) -> None:
        """The job is gone: drop its series."""
        key = (namespace, name)
        self._set_phase(key, None)
        self._remove_live(namespace, name)
        if self._usage.pop(key, None) is not None:
            for counter in (self.gpu_seconds, self.queued_seconds):
                with contextlib.suppress(KeyError):
                    counter.remove(namespace, name)

    def _remove_live(self, namespace: str, name: str) -> None:
        for gauge in (self.step, self.loss):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)

    def _set_phase(self, key: tuple[str, str], phase: str | None) -> None:
        old = self._phases.pop(key, None)
        if old is not None:
            self.jobs.labels(old).dec()
        if phase is not None:
            self._phases[key] = phase
            self.jobs.labels(phase).inc()
