"""Checkpoints in an object store: background upload, manifest-last completeness, verified resume.

Layout under the store's root:

    checkpoints/step-00000020/<files of the checkpoint folder...>
    checkpoints/step-00000020/manifest.json      written last

A checkpoint is complete only when its manifest exists, parses, carries this job's config
fingerprint and every file it lists exists with the listed size; resuming also checks every
sha256 after download. Anything else (an upload cut short by preemption, a checkpoint of another
training config, bytes changed after upload) is skipped and an older complete checkpoint is used.

The decisions (what is complete, what to prune) are pure functions below; the I/O around them is
thin so they are tested without a store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_trainer.spec import TrainingSpec
from finetune_trainer.storage import (
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    backoff_delays,
    check_key,
    sha256_file,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Manifest format this trainer writes and reads; a newer one is refused, never guessed at."""

ROOT = "checkpoints/"
MANIFEST_NAME = "manifest.json"
_STEP_KEY = re.compile(r"^checkpoints/step-(\d{8,})/(.+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------------------------------------
# Config fingerprint

FINGERPRINT_VERSION = 1
"""Bumped when the rule below changes, so old and new fingerprints never collide."""

FINGERPRINT_SECTIONS = ("model", "data", "template", "lora", "training")
"""Spec sections that decide what training computes. Left out on purpose: `checkpoint` (when to
save, not what), `export` and `samples` (after training), `tracking` (reporting) and `storage`
(where checkpoints go)."""

FINGERPRINT_EXCLUDED: Mapping[str, frozenset[str]] = {
    # Credentials change who may read the model or data, not what is read.
    "model": frozenset({"token_secret_ref"}),
    "data": frozenset({"token_secret_ref"}),
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


# ---------------------------------------------------------------------------------------------
# Keys, manifests and the pure decisions


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


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        "created_at": created_at or utc_now(),
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


def deletion_order(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """(manifests, other files): manifests go first so a checkpoint half-deleted by a crash is
    partial, never a manifest pointing at missing files that looks complete until checked."""
    keys = list(keys)
    manifests = [k for k in keys if k.endswith("/" + MANIFEST_NAME)]
    return manifests, [k for k in keys if k not in set(manifests)]


# ---------------------------------------------------------------------------------------------
# Reading: what is complete, download, resume


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


@dataclass
class Survey:
    """What is under `checkpoints/`, classified for one fingerprint."""

    steps: dict[int, dict[str, int]]
    complete: list[CheckpointRef]
    """Newest first."""
    foreign: set[int]
    """Steps with a valid manifest of another config, or of a newer manifest format."""


def survey(store: ObjectStore, fingerprint: str) -> Survey:
    """List and classify every checkpoint. Storage errors propagate: starting from scratch
    because S3 was briefly unreachable would throw away finished work."""
    steps = group_by_step(store.list(ROOT))
    complete, foreign = [], set()
    for step in sorted(steps, reverse=True):
        present = steps[step]
        prefix = step_prefix(step)
        if MANIFEST_NAME not in present:
            log.info("checkpoint step %d: no manifest (partial upload), skipped", step)
            continue
        try:
            manifest = parse_manifest(store.get_bytes(prefix + MANIFEST_NAME))
        except ObjectNotFound:
            log.info("checkpoint step %d: manifest deleted while listing, skipped", step)
            continue
        except NewerManifestError as e:
            foreign.add(step)
            log.info("checkpoint step %d: not used: %s", step, e)
            continue
        except ManifestError as e:
            log.warning("checkpoint step %d: unreadable manifest, skipped: %s", step, e)
            continue
        problem = manifest_problem(manifest, step=step, fingerprint=fingerprint, present=present)
        if problem is None:
            complete.append(CheckpointRef(step, prefix, store.uri(prefix), manifest))
        elif manifest["fingerprint"] != fingerprint:
            foreign.add(step)
            log.info("checkpoint step %d: %s, not used", step, problem)
        else:
            log.warning("checkpoint step %d: incomplete, skipped: %s", step, problem)
    return Survey(steps, complete, foreign)


def list_complete(store: ObjectStore, fingerprint: str) -> list[CheckpointRef]:
    """Complete checkpoints of this config, newest first (sizes checked, not yet checksums)."""
    return survey(store, fingerprint).complete


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
"""What export needs of a checkpoint (not the optimizer state, several times larger)."""


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


# ---------------------------------------------------------------------------------------------
# Writing: the background uploader


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


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class _Job:
    step: int
    staged: Path
    state: dict[str, Any] | None
    submitted: float


class CheckpointUploader:
    """Uploads checkpoints in the background, one at a time, in submission order.

    `submit` stages the caller's folder (hard links where the file system allows, else copies)
    and returns; the caller may then delete or rotate its folder, but must not rewrite those files
    in place (a hard link shares the bytes). Pass `staging_dir` on the same file system as the
    checkpoints to get hard links. The worker hashes and uploads the files, writes the manifest,
    then prunes. Failures are retried with exponential backoff (`backoff`, doubling, at most
    `max_backoff`) up to `max_attempts` times; then the checkpoint is dropped, `failures` counts
    it and training goes on. All public members are safe to call from any thread.

    With `skip_superseded` (the default), a queued checkpoint whose upload has not started when a
    newer one is submitted is skipped: when S3 is slow or down the backlog stays at one upload in
    flight and one waiting, instead of staged copies filling the disk.
    """

    def __init__(
        self,
        store: ObjectStore,
        fingerprint: str,
        keep_last: int,
        max_attempts: int = 5,
        backoff: float = 2.0,
        *,
        max_backoff: float = 60.0,
        staging_dir: Path | None = None,
        on_complete: Callable[[CheckpointRef, float], None] | None = None,
        on_failed_attempt: Callable[[int, str], None] | None = None,
        last_complete: CheckpointRef | None = None,
        skip_superseded: bool = True,
        keep_best: bool = False,
        on_kept: Callable[[list[CheckpointRef]], None] | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last: expected >= 1, got {keep_last}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, got {max_attempts}")
        self.store = store
        self.fingerprint = fingerprint
        self.keep_last = keep_last
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.skip_superseded = skip_superseded
        self.keep_best = keep_best
        """Keep the checkpoint with the lowest eval loss beyond keep_last (export from best needs it)."""
        self.on_kept = on_kept
        """Called from the worker thread after pruning with the complete checkpoints that remain,
        newest first (the checkpoint history in status). Exceptions it raises are logged."""
        self.on_complete = on_complete
        """Called from the worker thread with the new checkpoint and the seconds from submit to
        complete manifest. Exceptions it raises are logged and ignored."""
        self.on_failed_attempt = on_failed_attempt
        """Called from the worker thread after every failed upload attempt, retries included, with
        `failed_attempts` and the error, so the failure shows while the retries are still running
        (a training step can take minutes; S3's own retries take about 25 s). Exceptions it raises
        are logged and ignored."""
        if staging_dir is not None:
            staging_dir.mkdir(parents=True, exist_ok=True)
        self._staging = Path(tempfile.mkdtemp(prefix="checkpoint-staging-", dir=staging_dir))
        self._lock = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._pending = 0
        self._superseded = 0
        self._seq = 0
        self._closed = False
        self._last_complete = last_complete
        self._failures = 0
        self._failed_attempts = 0
        self._last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    # -- state -------------------------------------------------------------------------------

    @property
    def last_complete(self) -> CheckpointRef | None:
        """The newest checkpoint this uploader completed (or was started with)."""
        with self._lock:
            return self._last_complete

    @property
    def failures(self) -> int:
        """Checkpoints given up on since the last one that completed."""
        with self._lock:
            return self._failures

    @property
    def failed_attempts(self) -> int:
        """Upload attempts that failed since the last checkpoint that completed, retries included:
        above 0 from the first failure on, while `failures` waits for a checkpoint to be given up."""
        with self._lock:
            return self._failed_attempts

    @property
    def last_error(self) -> str | None:
        """Why the last checkpoint was given up on; None once one completes again."""
        with self._lock:
            return self._last_error

    @property
    def superseded(self) -> int:
        """Checkpoints skipped because a newer one was submitted before their upload started."""
        with self._lock:
            return self._superseded

    @property
    def pending(self) -> int:
        """Submitted checkpoints not yet completed or given up on."""
        with self._lock:
            return self._pending

    # -- API ---------------------------------------------------------------------------------

    def submit(self, step: int, local_dir: Path, state: dict[str, Any] | None = None) -> None:
        """Queue the checkpoint in `local_dir` (a folder of files) for upload as `step`."""
        if not local_dir.is_dir():
            raise NotADirectoryError(f"checkpoint folder {local_dir}: expected a directory")
        if not any(p.is_file() for p in local_dir.rglob("*")):
            raise ValueError(f"checkpoint folder {local_dir}: expected files, found none")
        if (local_dir / MANIFEST_NAME).exists():
            raise ValueError(f"checkpoint folder {local_dir}: {MANIFEST_NAME} is reserved for the manifest")
        step_prefix(step)  # validates the step
        with self._lock:
            if self._closed:
                raise RuntimeError("CheckpointUploader is closed")
            self._seq += 1
            staged = self._staging / f"{self._seq:06d}-step-{step:08d}"
        shutil.copytree(local_dir, staged, copy_function=_link_or_copy)
        job = _Job(step, staged, dict(state) if state is not None else None, time.monotonic())
        with self._lock:
            self._pending += 1
            self._jobs.append(job)
            self._lock.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted checkpoint is complete or given up on; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish queued uploads (up to `timeout`), stop the worker and remove the staging folder.
        Returns False when uploads were still running at the timeout."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        shutil.rmtree(self._staging, ignore_errors=True)
        return True

    def __enter__(self) -> CheckpointUploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker ------------------------------------------------------------------------------

    def _take(self) -> tuple[_Job | None, list[_Job]]:
        """The next job to upload (None once closed and drained) and the queued jobs it supersedes."""
        with self._lock:
            self._lock.wait_for(lambda: bool(self._jobs) or self._closed)
            skipped = []
            while self.skip_superseded and len(self._jobs) > 1:
                skipped.append(self._jobs.popleft())
            return (self._jobs.popleft() if self._jobs else None), skipped

    def _finish(self, job: _Job, *, superseded: bool = False) -> None:
        shutil.rmtree(job.staged, ignore_errors=True)
        with self._lock:
            self._pending -= 1
            self._superseded += superseded
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            job, skipped = self._take()
            for old in skipped:
                log.warning(
                    "checkpoint step %d: skipped, a newer one was submitted before its upload began", old.step
                )
                self._finish(old, superseded=True)
            if job is None:
                return
            try:
                self._process(job)
            except Exception as e:  # the worker must outlive any bug in one upload
                log.exception("checkpoint step %d: uploader error", job.step)
                error = f"step {job.step}: {type(e).__name__}: {e}"
                with self._lock:
                    self._failures += 1
                    self._last_error = error
                self._attempt_failed(error)
            finally:
                self._finish(job)

    def _process(self, job: _Job) -> None:
        prefix = step_prefix(job.step)
        manifest: dict[str, Any] = {}
        uploaded: set[str] = set()
        cleared = False

        def attempt() -> None:
            nonlocal cleared
            if not manifest:
                files = describe_files(job.staged)
                manifest.update(build_manifest(job.step, self.fingerprint, files, job.state))
            if not cleared:
                stored = self._already_stored(job.step, manifest["files"])
                if stored is not None:
                    manifest.update(stored)
                    return
                self._clear(prefix)
                cleared = True
            for f in manifest["files"]:
                if f["path"] not in uploaded:
                    self.store.put_file(prefix + f["path"], job.staged / f["path"])
                    uploaded.add(f["path"])
            self.store.put_bytes(prefix + MANIFEST_NAME, encode_manifest(manifest))

        delays = backoff_delays(self.max_attempts, self.backoff, self.max_backoff)
        for n in range(self.max_attempts):
            try:
                attempt()
                break
            except Exception as e:
                error = f"step {job.step}: {type(e).__name__}: {e}"
                permanent = isinstance(e, StorageError) and not e.retryable
                self._attempt_failed(error)
                if permanent or n == self.max_attempts - 1:
                    log.error("checkpoint %s: giving up after %d attempt(s): %s", prefix, n + 1, error)
                    with self._lock:
                        self._failures += 1
                        self._last_error = error
                    return
                log.warning(
                    "checkpoint %s: attempt %d of %d failed, retrying in %.2fs: %s",
                    prefix,
                    n + 1,
                    self.max_attempts,
                    delays[n],
                    error,
                )
                time.sleep(delays[n])

        ref = CheckpointRef(job.step, prefix, self.store.uri(prefix), manifest)
        seconds = time.monotonic() - job.submitted
        with self._lock:
            self._last_complete = ref
            self._failures = 0
            self._failed_attempts = 0
            self._last_error = None
        log.info("checkpoint %s complete (%d bytes, %.2fs)", ref.uri, ref.size, seconds)
        if self.on_complete is not None:
            try:
                self.on_complete(ref, seconds)
            except Exception:
                log.exception("checkpoint on_complete callback failed")
        self._prune(job.step)

    def _attempt_failed(self, error: str) -> None:
        with self._lock:
            self._failed_attempts += 1
            count = self._failed_attempts
        if self.on_failed_attempt is not None:
            try:
                self.on_failed_attempt(count, error)
            except Exception:
                log.exception("checkpoint on_failed_attempt callback failed")

    def _already_stored(self, step: int, files: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The stored manifest when this very checkpoint (same config, same bytes) is already complete under
        its prefix, as when one step is submitted twice (periodic save, then SIGTERM). Replacing it
        would open a window in which the step is incomplete."""
        prefix = step_prefix(step)
        present = {o.key[len(prefix) :]: o.size for o in self.store.list(prefix)}
        if MANIFEST_NAME not in present:
            return None
        try:
            old = parse_manifest(self.store.get_bytes(prefix + MANIFEST_NAME))
        except (ManifestError, ObjectNotFound):
            return None
        if manifest_problem(old, step=step, fingerprint=self.fingerprint, present=present) is not None:
            return None
        return old if sorted(old["files"], key=lambda f: f["path"]) == files else None

    def _clear(self, prefix: str) -> None:
        """Remove what an earlier run left under this step, manifest first."""
        leftovers = [o.key for o in self.store.list(prefix)]
        if leftovers:
            log.info("checkpoint %s: replacing %d object(s) left by an earlier run", prefix, len(leftovers))
            for keys in deletion_order(leftovers):
                if keys:
                    self.store.delete(keys)

    def _prune(self, current: int) -> None:
        try:
            found = survey(self.store, self.fingerprint)
            best = (
                best_by_eval_loss(r for r in found.complete if r.step <= current) if self.keep_best else None
            )
            doomed = plan_prune(
                found.steps,
                [r.step for r in found.complete],
                found.foreign,
                self.keep_last,
                current,
                protected=[best.step] if best else [],
            )
            for step in doomed:
                keys = [step_prefix(step) + path for path in found.steps[step]]
                for batch in deletion_order(keys):
                    if batch:
                        self.store.delete(batch)
                log.info("checkpoint %s pruned", self.store.uri(step_prefix(step)))
        except Exception as e:  # pruning again after the next checkpoint is good enough
            log.warning("checkpoint pruning failed, will retry after the next checkpoint: %s", e)
            return
        if self.on_kept is not None:
            try:
                self.on_kept([r for r in found.complete if r.step not in set(doomed)])
            except Exception:
                log.exception("checkpoint on_kept callback failed")
