"""Reading checkpoints from the store: the listing and manifests behind the resume decision,
verified downloads, and resuming from the newest checkpoint whose checksums hold."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from finetune_trainer.checkpoints.manifest import (
    MANIFEST_NAME,
    ROOT,
    CheckpointRef,
    CorruptCheckpoint,
    step_prefix,
)
from finetune_trainer.checkpoints.resume import Survey, decide, manifest_steps
from finetune_trainer.storage import ObjectNotFound, ObjectStore, sha256_file

log = logging.getLogger(__name__)

_QUIET_SKIPS = frozenset({"partial", "vanished", "foreign", "newer-format"})
"""Skips that are expected in normal operation (logged at info; the others are warnings)."""

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
"""What export needs of a checkpoint (not the optimizer state, several times larger)."""


def survey(store: ObjectStore, fingerprint: str) -> Survey:
    """List and classify every checkpoint. Storage errors propagate: starting from scratch
    because S3 was briefly unreachable would throw away finished work."""
    listing = store.list(ROOT)
    manifests: dict[int, bytes | None] = {}
    for step in manifest_steps(listing):
        try:
            manifests[step] = store.get_bytes(step_prefix(step) + MANIFEST_NAME)
        except ObjectNotFound:
            manifests[step] = None
    found = decide(listing, manifests, fingerprint, store.uri)
    for step, skip in found.skipped.items():
        level = logging.INFO if skip.kind in _QUIET_SKIPS else logging.WARNING
        log.log(level, "checkpoint step %d: %s", step, skip.reason)
    return found


def list_complete(store: ObjectStore, fingerprint: str) -> list[CheckpointRef]:
    """Complete checkpoints of this config, newest first (sizes checked, not yet checksums)."""
    return survey(store, fingerprint).complete


def download(store: ObjectStore, ref: CheckpointRef, dest: Path, only: Iterable[str] | None = None) -> Path:
    """Download a checkpoint's files (those named in `only`, else all) into `dest` and verify sizes
    and sha256.

    Raises CorruptCheckpoint when a file is missing or differs from the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set(only) if only is not None else None
    if wanted is not None and (absent := wanted - {f["path"] for f in ref.files}):
        raise CorruptCheckpoint(ref.step, ", ".join(sorted(absent)), "not in the manifest")
    for entry in ref.files:
        path = entry["path"]
        if wanted is not None and path not in wanted:
            continue
        target = dest.joinpath(*path.split("/"))
        try:
            store.get_file(ref.prefix + path, target)
        except ObjectNotFound:
            raise CorruptCheckpoint(ref.step, path, "missing in the store") from None
        size = target.stat().st_size
        if size != entry["size"]:
            raise CorruptCheckpoint(ref.step, path, f"{size} bytes, manifest says {entry['size']}")
        digest = sha256_file(target)
        if digest != entry["sha256"]:
            raise CorruptCheckpoint(
                ref.step, path, f"sha256 {digest[:12]}, manifest says {entry['sha256'][:12]}"
            )
    return dest


def resolve_resume(store: ObjectStore, fingerprint: str, workdir: Path) -> tuple[Path, CheckpointRef] | None:
    """Download the newest complete checkpoint whose checksums verify into
    `workdir/step-XXXXXXXX/`; corrupt ones are logged and the next older is tried. None when no
    checkpoint of this config is usable (train from scratch)."""
    for ref in list_complete(store, fingerprint):
        dest = workdir / f"step-{ref.step:08d}"
        shutil.rmtree(dest, ignore_errors=True)
        try:
            return download(store, ref, dest), ref
        except CorruptCheckpoint as e:
            log.warning("not resuming from %s: %s", ref.uri, e)
            shutil.rmtree(dest, ignore_errors=True)
    return None
