"""Checkpoint metrics count each checkpoint once, whichever status write (the progress writer's or
the reconcile's, both built from the same report) records it first."""

from __future__ import annotations

from finetune_operator.metrics import OperatorMetrics
from finetune_operator.progress_server import ProgressService

KEY = ("ns", "j")


def value(metrics: OperatorMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_checkpoint_counted_once_with_its_upload_time() -> None:
    metrics = OperatorMetrics()
    service = ProgressService(
        None, None, metrics, 1.0, None, job_lookup=None, storage_prefix=None, limiter=None
    )  # type: ignore[arg-type]
    ckpt = {"uri": "s3://b/ns/j/checkpoints/step-00000004/", "step": 4, "time": "2025-03-01T12:00:00Z"}
    service.book.offer(
        KEY, {"step": 5, "reportedAt": "2025-03-01T12:00:01Z", "checkpoint": {**ckpt, "uploadSeconds": 0.4}}
    )
    service.observe_checkpoint(KEY, {}, {"checkpoint": ckpt})
    # The other path writing the same checkpoint later (or a write without one) adds nothing.
    service.observe_checkpoint(KEY, {"checkpoint": ckpt}, {"checkpoint": ckpt})
    service.observe_checkpoint(KEY, {"checkpoint": ckpt}, {"progress": {"step": 6}})
    assert value(metrics, "finetune_operator_checkpoints_total") == 1
    assert value(metrics, "finetune_operator_checkpoint_duration_seconds_count") == 1
    assert value(metrics, "finetune_operator_checkpoint_duration_seconds_sum") == 0.4
    # A checkpoint the trainer reported without an upload time (a resumed one) counts, untimed.
    later = {**ckpt, "step": 8}
    service.observe_checkpoint(KEY, {"checkpoint": ckpt}, {"checkpoint": later})
    assert value(metrics, "finetune_operator_checkpoints_total") == 2
    assert value(metrics, "finetune_operator_checkpoint_duration_seconds_count") == 1
