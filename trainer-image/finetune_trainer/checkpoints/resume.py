"""The resume decision: which stored checkpoints this job may resume from, newest first.

Pure: `decide` takes the listing under `checkpoints/` and the manifests read for it (the thin I/O
around it is `fetch.survey`) and classifies every step. Complete for this config: resumable, in
order. Another config's (or a newer manifest format's): foreign, left alone, never pruned.
Anything else (no manifest yet, a manifest that does not parse, files missing or of the wrong
size) is skipped, so a half-written checkpoint is never taken for complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from finetune_trainer.checkpoints.manifest import (
    MANIFEST_NAME,
    CheckpointRef,
    ManifestError,
    NewerManifestError,
    group_by_step,
    manifest_problem,
    parse_manifest,
    step_prefix,
)
from finetune_trainer.storage import ObjectInfo

SkipKind = Literal["partial", "vanished", "unreadable", "incomplete", "foreign", "newer-format"]
FOREIGN_KINDS: frozenset[SkipKind] = frozenset({"foreign", "newer-format"})
"""Skips that mean "not ours": kept whatever this job prunes."""


@dataclass(frozen=True)
class Skip:
    """Why a stored step is not resumable: its kind and a sentence for the log."""

    kind: SkipKind
    reason: str


@dataclass
class Survey:
    """What is under `checkpoints/`, classified for one fingerprint."""

    steps: dict[int, dict[str, int]]
    """{step: {path inside the checkpoint: size}}, every step listed."""
    complete: list[CheckpointRef]
    """Newest first: the order to try resuming in (checksums are checked at download)."""
    skipped: dict[int, Skip] = field(default_factory=dict)
    """The other steps and why."""

    @property
    def foreign(self) -> set[int]:
        """Steps with a valid manifest of another config, or of a newer manifest format."""
        return {step for step, skip in self.skipped.items() if skip.kind in FOREIGN_KINDS}


def manifest_steps(listing: Iterable[ObjectInfo]) -> list[int]:
    """Steps whose manifest the listing shows, newest first: the manifests `decide` needs."""
    return sorted((s for s, files in group_by_step(listing).items() if MANIFEST_NAME in files), reverse=True)


def decide(
    listing: Iterable[ObjectInfo],
    manifests: Mapping[int, bytes | None],
    fingerprint: str,
    uri: Callable[[str], str],
) -> Survey:
    """Classify every checkpoint in `listing` for `fingerprint`.

    `manifests` maps a step to its manifest's bytes as read after the listing; None, or no entry,
    when the read found it gone (deleted between listing and reading). `uri` turns a key prefix
    into the URI the refs carry (the store's `uri`).
    """
    steps = group_by_step(listing)
    complete: list[CheckpointRef] = []
    skipped: dict[int, Skip] = {}
    for step in sorted(steps, reverse=True):
        present = steps[step]
        if MANIFEST_NAME not in present:
            skipped[step] = Skip("partial", "no manifest (partial upload), skipped")
            continue
        data = manifests.get(step)
        if data is None:
            skipped[step] = Skip("vanished", "manifest deleted while listing, skipped")
            continue
        try:
            manifest = parse_manifest(data)
        except NewerManifestError as e:
            skipped[step] = Skip("newer-format", f"not used: {e}")
            continue
        except ManifestError as e:
            skipped[step] = Skip("unreadable", f"unreadable manifest, skipped: {e}")
            continue
        problem = manifest_problem(manifest, step=step, fingerprint=fingerprint, present=present)
        if problem is None:
            prefix = step_prefix(step)
            complete.append(CheckpointRef(step, prefix, uri(prefix), manifest))
        elif manifest["fingerprint"] != fingerprint:
            skipped[step] = Skip("foreign", f"{problem}, not used")
        else:
            skipped[step] = Skip("incomplete", f"incomplete, skipped: {problem}")
    return Survey(steps, complete, skipped)
