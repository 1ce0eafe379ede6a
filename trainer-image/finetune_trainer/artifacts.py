"""Artifacts in the store: upload with size and sha256, verify what a previous pod uploaded, and the
export's resumable state (`export/state.json`: finished stages with their artifact records).

A folder artifact (adapter, merged model) carries a `SHA256SUMS` file (sha256sum format); the
folder's `sha256` is the sha256 of that file and its `sizeBytes` the total of the files it lists.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.storage import ObjectNotFound, sha256_file
from finetune_trainer.timestamps import rfc3339

if TYPE_CHECKING:
    from finetune_trainer.storage import ObjectStore

ARTIFACTS_PREFIX = "artifacts/"
STATE_KEY = "export/state.json"
SUMS_NAME = "SHA256SUMS"
STATE_VERSION = 1


def artifact_record(name: str, key: str, uri: str, size: int, sha256: str) -> dict[str, Any]:
    """A stage's record of one artifact; `public()` drops the store key for the job's status."""
    return {"name": name, "uri": uri, "sizeBytes": size, "sha256": sha256, "key": key}


def public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("name", "uri", "sizeBytes", "sha256")}


def upload_file(store: ObjectStore, name: str, key: str, path: Path) -> dict[str, Any]:
    sha = sha256_file(path)
    store.put_file(key, path)
    return artifact_record(name, key, store.uri(key), path.stat().st_size, sha)


def sums_text(folder: Path) -> tuple[str, int]:
    """sha256sum-format listing of every file under `folder` (sorted) and their total size."""
    lines, total = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS_NAME):
        rel = path.relative_to(folder).as_posix()
        lines.append(f"{sha256_file(path)}  {rel}\n")
        total += path.stat().st_size
    return "".join(lines), total


def parse_sums(text: str) -> dict[str, str]:
    """path -> sha256 from sha256sum output."""
    entries = {}
    for line in text.splitlines():
        sha, _, rel = line.partition("  ")
        if rel:
            entries[rel] = sha
    return entries


def upload_folder(store: ObjectStore, name: str, prefix: str, folder: Path) -> dict[str, Any]:
    """Upload every file of `folder` under `prefix` (ending in /), then SHA256SUMS last: a folder
    whose SHA256SUMS is present was uploaded whole."""
    text, total = sums_text(folder)
    for rel in parse_sums(text):
        store.put_file(prefix + rel, folder / rel)
    (folder / SUMS_NAME).write_text(text)
    store.put_file(prefix + SUMS_NAME, folder / SUMS_NAME)
    return artifact_record(name, prefix, store.uri(prefix), total, sha256_file(folder / SUMS_NAME))


def verify_file(store: ObjectStore, record: dict[str, Any], local: Path) -> bool:
    """Is the object the one recorded (size, then sha256 of a download to `local`)? `local` keeps
    the download, so a later stage that needs the file reads it from there."""
    found = {o.key: o.size for o in store.list(record["key"])}
    if found.get(record["key"]) != record["sizeBytes"]:
        return False
    if not (local.is_file() and local.stat().st_size == record["sizeBytes"]):
        store.get_file(record["key"], local)
    return sha256_file(local) == record["sha256"]


def verify_folder(store: ObjectStore, record: dict[str, Any]) -> bool:
    """Is the folder the one recorded: its SHA256SUMS hashes to the recorded sha256, and the store
    holds exactly the files it lists with the recorded total size? (Files are not downloaded.)"""
    prefix = record["key"]
    try:
        sums = store.get_bytes(prefix + SUMS_NAME)
    except ObjectNotFound:
        return False
    if hashlib.sha256(sums).hexdigest() != record["sha256"]:
        return False
    listed = {o.key[len(prefix) :]: o.size for o in store.list(prefix) if o.key != prefix + SUMS_NAME}
    return set(listed) == set(parse_sums(sums.decode())) and sum(listed.values()) == record["sizeBytes"]


def download_folder(store: ObjectStore, record: dict[str, Any], dest: Path) -> None:
    prefix = record["key"]
    for obj in store.list(prefix):
        store.get_file(obj.key, dest / obj.key[len(prefix) :])


def empty_state() -> dict[str, Any]:
    return {"version": STATE_VERSION, "stages": {}}


def load_state(store: ObjectStore) -> dict[str, Any]:
    """The export state of a previous pod, or an empty one (also for an unknown version)."""
    try:
        state = json.loads(store.get_bytes(STATE_KEY))
    except ObjectNotFound:
        return empty_state()
    return state if state.get("version") == STATE_VERSION else empty_state()


def with_stage(state: dict[str, Any], stage: str, record: dict[str, Any], seconds: float) -> dict[str, Any]:
    """`state` with `stage` finished (a new dict; the caller stores it)."""
    finished = {
        **record,
        "seconds": round(seconds, 3),
        "finishedAt": rfc3339(),
    }
    return {**state, "stages": {**state["stages"], stage: finished}}


def save_state(store: ObjectStore, state: dict[str, Any]) -> None:
    store.put_bytes(STATE_KEY, json.dumps(state, indent=1).encode())
