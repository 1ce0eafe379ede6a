"""The checkpoint format: the key layout in the store and the manifest written last.

Layout under the store's root:

    checkpoints/step-00000020/<files of the checkpoint folder...>
    checkpoints/step-00000020/manifest.json      written last

A checkpoint is complete only when its manifest exists, parses, carries this job's config
fingerprint and every file it lists exists with the listed size (`manifest_problem`); resuming
also checks every sha256 after download.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer.storage import ObjectInfo, check_key, sha256_file
from finetune_trainer.timestamps import rfc3339

FORMAT_VERSION = 1
"""Manifest format this trainer writes and reads; a newer one is refused, never guessed at."""

ROOT = "checkpoints/"
MANIFEST_NAME = "manifest.json"
_STEP_KEY = re.compile(r"^checkpoints/step-(\d{8,})/(.+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def step_prefix(step: int) -> str:
    """`checkpoints/step-00000020/`: zero-padded so keys sort by step."""
    if step < 0:
        raise ValueError(f"checkpoint step: expected >= 0, got {step}")
    return f"{ROOT}step-{step:08d}/"


def parse_checkpoint_key(key: str) -> tuple[int, str] | None:
    """`checkpoints/step-00000020/a/b` -> (20, `a/b`); None for keys outside the layout."""
    match = _STEP_KEY.match(key)
    return (int(match.group(1)), match.group(2)) if match else None


def group_by_step(objects: Iterable[ObjectInfo]) -> dict[int, dict[str, int]]:
    """Listing -> {step: {path inside the checkpoint: size}}."""
    steps: dict[int, dict[str, int]] = {}
    for obj in objects:
        parsed = parse_checkpoint_key(obj.key)
        if parsed is not None:
            step, path = parsed
            steps.setdefault(step, {})[path] = obj.size
    return steps


class ManifestError(ValueError):
    """A manifest that does not parse or is not shaped as FORMAT_VERSION says."""


class NewerManifestError(ManifestError):
    """A manifest of a later format: written by a newer trainer, left alone by this one."""


class CorruptCheckpoint(Exception):  # noqa: N818 (name fixed by the trainer's API contract)
    """A checkpoint file is missing or its bytes differ from the manifest after download."""

    def __init__(self, step: int, path: str, reason: str) -> None:
        super().__init__(f"checkpoint step {step}: {path}: {reason}")
        self.step = step
        self.path = path
        self.reason = reason


def build_manifest(
    step: int,
    fingerprint: str,
    files: list[dict[str, Any]],
    trainer_state: Mapping[str, Any] | None = None,
    created_at: str | None = None,
) -> dict[str, Any]:
    """The manifest for a checkpoint whose `files` ({path, size, sha256}) are already stored."""
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "fingerprint": fingerprint,
        "created_at": created_at or rfc3339(),
        "files": sorted(files, key=lambda f: f["path"]),
    }
    if trainer_state is not None:
        manifest["trainer_state"] = dict(trainer_state)
    return manifest


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"


def parse_manifest(data: bytes) -> dict[str, Any]:
    """Parse and check a manifest's shape; raises ManifestError naming the field at fault."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest: not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ManifestError("manifest: expected a JSON object")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise NewerManifestError(
            f"manifest.format_version: {version} is newer than this trainer's {FORMAT_VERSION}"
        )
    if version != FORMAT_VERSION:
        raise ManifestError(f"manifest.format_version: expected {FORMAT_VERSION}, got {version!r}")
    for name, kind in (("step", int), ("fingerprint", str), ("created_at", str), ("files", list)):
        value = manifest.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ManifestError(f"manifest.{name}: expected {kind.__name__}, got {value!r}")
    state = manifest.get("trainer_state")
    if state is not None and not isinstance(state, dict):
        raise ManifestError(f"manifest.trainer_state: expected an object, got {state!r}")
    seen = set()
    for i, entry in enumerate(manifest["files"]):
        where = f"manifest.files[{i}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: expected an object")
        path, size, digest = entry.get("path"), entry.get("size"), entry.get("sha256")
        if not isinstance(path, str):
            raise ManifestError(f"{where}.path: expected a string, got {path!r}")
        try:
            check_key(path)
        except ValueError as e:
            raise ManifestError(f"{where}.path: {e}") from None
        if path == MANIFEST_NAME or path in seen:
            raise ManifestError(f"{where}.path: {path!r} is reserved or listed twice")
        seen.add(path)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}.size: expected a non-negative integer, got {size!r}")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ManifestError(f"{where}.sha256: expected 64 lowercase hex digits, got {digest!r}")
    return manifest


def manifest_problem(
    manifest: Mapping[str, Any], *, step: int, fingerprint: str, present: Mapping[str, int]
) -> str | None:
    """Why a parsed manifest does not make its checkpoint complete for this job, or None.

    `present` maps the paths stored under the checkpoint's prefix to their sizes.
    """
    if manifest["step"] != step:
        return f"manifest says step {manifest['step']} but is stored under step {step}"
    if manifest["fingerprint"] != fingerprint:
        return f"fingerprint {manifest['fingerprint'][:12]} is another training config's"
    for entry in manifest["files"]:
        size = present.get(entry["path"])
        if size is None:
            return f"{entry['path']} is missing"
        if size != entry["size"]:
            return f"{entry['path']} has {size} bytes, manifest says {entry['size']}"
    return None


def describe_files(folder: Path) -> list[dict[str, Any]]:
    """{path, size, sha256} of every file under `folder`, paths `/`-separated, sorted."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files.append(
            {
                "path": path.relative_to(folder).as_posix(),
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    return files


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint: its step, key prefix in the store, URI and parsed manifest."""

    step: int
    prefix: str
    uri: str
    manifest: dict[str, Any] = field(repr=False)

    @property
    def files(self) -> list[dict[str, Any]]:
        return self.manifest["files"]

    @property
    def trainer_state(self) -> dict[str, Any] | None:
        return self.manifest.get("trainer_state")

    @property
    def size(self) -> int:
        """Bytes of all files (the manifest excluded)."""
        return sum(f["size"] for f in self.files)
