"""The micro-batch and accumulation a run trains with: the spec's numbers, or for `batchSize: auto`
the token-budget plan of autobatch.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from finetune_trainer.spec import TrainingSpec

DEFAULT_ROWS = 2
"""The tutorials' per-device batch; `auto` keeps at least DEFAULT_ROWS x accumulation rows per step."""


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int
    gradient_accumulation_steps: int
    reason: str


def plan(
    spec: TrainingSpec,
    lengths: Sequence[int],
    device: str,
    free_memory_gib: float | None,
    model_source: str,
) -> BatchPlan:
    """What to train with; `lengths` are the tokenized rows' lengths (after truncation)."""
    training = spec.training
    if training.batch_size != "auto":
        return BatchPlan(training.batch_size, training.gradient_accumulation_steps, "from spec.training")
    from finetune_trainer import autobatch

    config = autobatch.model_config(model_source) if device == "cuda" else {}
    return autobatch.plan_batch(
        training.gradient_accumulation_steps,
        lengths,
        device,
        free_memory_gib,
        config,
        packing=training.packing,
        max_seq_length=spec.model.max_seq_length,
    )
