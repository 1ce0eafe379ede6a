"""Checkpoint metrics count each checkpoint once, when the status write that records it happens,
timed by the upload time of the report that write was computed from."""

from __future__ import annotations

from finetune_operator.metrics import OperatorMetrics


def value(metrics: OperatorMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_checkpoint_counted_once_with_its_upload_time() -> None:
    metrics = OperatorMetrics()
    ckpt = {"uri": "s3://b/ns/j/checkpoints/step-00000004/", "step": 4, "time": "2025-03-01T12:00:00Z"}
    report = {"step": 5, "reportedAt": "2025-03-01T12:00:01Z", "checkpoint": {**ckpt, "uploadSeconds": 0.4}}
    metrics.observe_checkpoint({}, {"checkpoint": ckpt}, report)
    # A later write that finds the checkpoint already in status (or writes none) adds nothing.
    metrics.observe_checkpoint({"checkpoint": ckpt}, {"checkpoint": ckpt}, report)
    metrics.observe_checkpoint({"checkpoint": ckpt}, {"progress": {"step": 6}}, report)
    assert value(metrics, "finetune_operator_checkpoints_total") == 1
    assert value(metrics, "finetune_operator_checkpoint_duration_seconds_count") == 1
    assert value(metrics, "finetune_operator_checkpoint_duration_seconds_sum") == 0.4
    # A checkpoint the report does not time (a resumed one, or one from the final summary) counts,
    # untimed.
    later = {**ckpt, "step": 8}
    metrics.observe_checkpoint({"checkpoint": ckpt}, {"checkpoint": later}, report)
    metrics.observe_checkpoint({"checkpoint": later}, {"checkpoint": {**ckpt, "step": 9}}, None)
    assert value(metrics, "finetune_operator_checkpoints_total") == 3
    assert value(metrics, "finetune_operator_checkpoint_duration_seconds_count") == 1
