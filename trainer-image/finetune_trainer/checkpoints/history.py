"""The checkpoint history status shows, and the best checkpoint by eval loss (export from best)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from finetune_trainer.checkpoints.manifest import CheckpointRef


def eval_loss_of(ref: CheckpointRef) -> float | None:
    """The eval loss a checkpoint was saved with (None when it was not evaluated)."""
    value = (ref.trainer_state or {}).get("evalLoss")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


HISTORY_LIMIT = 10
"""Checkpoints the history in status lists (the newest; the best is named apart)."""


def history_entry(ref: CheckpointRef) -> dict[str, Any]:
    """A checkpoint as status lists it: step, losses, time, URI."""
    state = ref.trainer_state or {}
    loss = state.get("loss")
    return {
        "step": ref.step,
        "trainLoss": float(loss) if isinstance(loss, int | float) else None,
        "evalLoss": eval_loss_of(ref),
        "time": ref.manifest.get("created_at"),
        "uri": ref.uri,
    }


def history(refs: Iterable[CheckpointRef], limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
    """The newest `limit` checkpoints, newest first."""
    return [history_entry(r) for r in sorted(refs, key=lambda r: r.step, reverse=True)[:limit]]


def best_by_eval_loss(refs: Iterable[CheckpointRef]) -> CheckpointRef | None:
    """The checkpoint with the lowest eval loss (the earliest of equal ones); None when none was
    evaluated."""
    scored = [(loss, ref.step, ref) for ref in refs if (loss := eval_loss_of(ref)) is not None]
    return min(scored, key=lambda t: (t[0], t[1]))[2] if scored else None
