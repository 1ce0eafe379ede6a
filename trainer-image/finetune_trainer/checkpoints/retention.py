"""Which checkpoints to keep: pure decisions over steps, and the order deletes go in."""

from __future__ import annotations

from collections.abc import Iterable

from finetune_trainer.checkpoints.manifest import MANIFEST_NAME


def plan_prune(
    steps: Iterable[int],
    complete: Iterable[int],
    foreign: Iterable[int],
    keep_last: int,
    current: int,
    *,
    protected: Iterable[int] = (),
) -> list[int]:
    """Checkpoint steps to delete after checkpoint `current` became complete.

    Kept: the `keep_last` newest complete checkpoints up to `current` (which is one of them),
    `protected` complete ones (the best by eval loss), checkpoints of other configs (`foreign`: not
    ours to judge), and everything newer than `current` (left by an earlier run that this one
    resumed before; it overwrites them as it passes their steps). Deleted: older complete
    checkpoints beyond those, and partial or broken ones older than `current`.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last: expected >= 1, got {keep_last}")
    complete_set, foreign_set = set(complete), set(foreign)
    older_complete = sorted((s for s in complete_set if s <= current), reverse=True)
    doomed = set(older_complete[keep_last:]) - set(protected)
    doomed |= {s for s in steps if s < current and s not in complete_set and s not in foreign_set}
    doomed.discard(current)
    return sorted(doomed)


def deletion_order(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """(manifests, other files): manifests go first so a checkpoint half-deleted by a crash is
    partial, never a manifest pointing at missing files that looks complete until checked."""
    keys = list(keys)
    manifests = [k for k in keys if k.endswith("/" + MANIFEST_NAME)]
    return manifests, [k for k in keys if k not in set(manifests)]
