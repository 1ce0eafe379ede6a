"""The config fingerprint: which training configuration a checkpoint belongs to.

A checkpoint is resumed only under the fingerprint it was saved with; the rule below decides
which spec fields count (those that change what training computes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from finetune_trainer.spec import TrainingSpec

FINGERPRINT_VERSION = 1
"""Bumped when the rule below changes, so old and new fingerprints never collide."""

FINGERPRINT_SECTIONS = ("model", "data", "template", "lora", "training")
"""Spec sections that decide what training computes. Left out on purpose: `checkpoint` (when to
save, not what), `export` and `samples` (after training), `tracking` (reporting) and `storage`
(where checkpoints go)."""

FINGERPRINT_EXCLUDED: Mapping[str, frozenset[str]] = {
    # Credentials change who may read the model or data, not what is read.
    "model": frozenset({"token_secret_ref"}),
    # Credentials; a check that refuses data or trains it as it is (maxTruncatedFraction); which
    # rows with a missing cell are dropped: under `fail` training only ever ran on data without
    # any, where `skip` drops nothing.
    "data": frozenset({"token_secret_ref", "max_truncated_fraction", "incomplete_rows"}),
    # Activation checkpointing recomputes the same activations: memory for time, same math. It is
    # left out so a job may switch it (for example after running out of memory) and keep resuming.
    "lora": frozenset({"gradient_checkpointing"}),
    # How often the loss is logged, and how a step's rows are split into micro-batches (the same
    # rows and loss; a resumed pod may split differently, for example on a smaller GPU); when a
    # diverged run is stopped.
    "training": frozenset({"logging_steps", "micro_batches", "max_non_finite_steps"}),
}
"""Fields of the fingerprinted sections that do not change the math. Everything else is in,
including fields added to the spec later: an unknown knob is assumed to matter, so a checkpoint is
never resumed under a config that might train differently."""

FINGERPRINT_LEFT_OUT_WHEN_UNSET: Mapping[str, frozenset[str]] = {
    # Added after fingerprints were first stored: a job without validation data keeps the
    # fingerprint it had, so its checkpoints stay resumable across a trainer upgrade. Set, it is in
    # (a held-out fraction removes rows from training).
    "data": frozenset({"validation"}),
}


def fingerprint_payload(spec: TrainingSpec, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The data hashed by `config_fingerprint`: fingerprinted sections with their defaults filled
    in (so an omitted default and the same value written out agree), minus the excluded fields."""
    payload: dict[str, Any] = {"fingerprint_version": FINGERPRINT_VERSION}
    for section in FINGERPRINT_SECTIONS:
        dumped = getattr(spec, section).model_dump(mode="json")
        payload[section] = {
            k: v
            for k, v in dumped.items()
            if k not in FINGERPRINT_EXCLUDED.get(section, ())
            and not (v is None and k in FINGERPRINT_LEFT_OUT_WHEN_UNSET.get(section, ()))
        }
    if extra:
        payload["extra"] = dict(extra)
    return payload


def config_fingerprint(spec: TrainingSpec, extra: Mapping[str, Any] | None = None) -> str:
    """sha256 of the canonical JSON of the parts of the spec that change what training computes.

    `extra` carries facts outside the spec that change the math too, for example the number of
    data-parallel workers (it multiplies the effective batch) or a resolved model revision.
    A hub model without a pinned `revision` can change upstream without changing this fingerprint.
    """
    canonical = json.dumps(
        fingerprint_payload(spec, extra), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
