"""Writing checkpoints: the background uploader (stage, hash, upload, manifest last, prune).

One worker thread uploads checkpoints in submission order; a checkpoint's files go up together
through the store's `put_files` (on S3 one transfer manager, several requests at a time). S3's
requests are retried by botocore; a whole checkpoint is retried by `CHECKPOINT_UPLOAD_RETRY`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.checkpoints.fetch import survey
from finetune_trainer.checkpoints.history import best_by_eval_loss
from finetune_trainer.checkpoints.manifest import (
    MANIFEST_NAME,
    CheckpointRef,
    ManifestError,
    build_manifest,
    describe_files,
    encode_manifest,
    manifest_problem,
    parse_manifest,
    step_prefix,
)
from finetune_trainer.checkpoints.retention import deletion_order, plan_prune
from finetune_trainer.storage import ObjectNotFound, ObjectStore, RetryPolicy

log = logging.getLogger(__name__)

CHECKPOINT_UPLOAD_RETRY = RetryPolicy("checkpoint-upload", attempts=5, backoff=2.0, max_backoff=60.0)
"""The one retry layer above botocore's: a checkpoint whose upload failed (botocore gave up on a
request, after its own attempts) is tried again as a whole, files already stored skipped, up to 5
times from 2 s doubling; then it is dropped and training goes on (the next one may succeed)."""


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
    then prunes. A failed checkpoint is retried as `retry` says (by default
    `CHECKPOINT_UPLOAD_RETRY`); then it is dropped, `failures` counts it and training goes on. All
    public members are safe to call from any thread.

    With `skip_superseded` (the default), a queued checkpoint whose upload has not started when a
    newer one is submitted is skipped: when S3 is slow or down the backlog stays at one upload in
    flight and one waiting, instead of staged copies filling the disk.
    """

    def __init__(
        self,
        store: ObjectStore,
        fingerprint: str,
        keep_last: int,
        *,
        retry: RetryPolicy | None = None,
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
        self.store = store
        self.fingerprint = fingerprint
        self.keep_last = keep_last
        self.retry = retry or CHECKPOINT_UPLOAD_RETRY
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
                error = self._describe(job, e)
                with self._lock:
                    self._failures += 1
                    self._last_error = error
                self._attempt_failed(error)
            finally:
                self._finish(job)

    def _process(self, job: _Job) -> None:
        prefix = step_prefix(job.step)
        manifest: dict[str, Any] = {}
        cleared = False

        def attempt() -> None:
            nonlocal cleared
            if not manifest:
                files = describe_files(job.staged)
                manifest.update(build_manifest(job.step, self.fingerprint, files, job.state))
            present: dict[str, int] = {}
            if not cleared:
                stored = self._already_stored(job.step, manifest["files"])
                if stored is not None:
                    manifest.update(stored)
                    return
                self._clear(prefix)
                cleared = True
            else:
                # A retry: what an earlier attempt stored under the cleared prefix is ours and
                # whole (a put is atomic), so only the rest goes up again.
                present = {o.key[len(prefix) :]: o.size for o in self.store.list(prefix)}
            self.store.put_files(
                [
                    (prefix + f["path"], job.staged / f["path"])
                    for f in manifest["files"]
                    if present.get(f["path"]) != f["size"]
                ]
            )
            self.store.put_bytes(prefix + MANIFEST_NAME, encode_manifest(manifest))

        try:
            self.retry.run(
                attempt,
                what=f"checkpoint {prefix}",
                on_failure=lambda e: self._attempt_failed(self._describe(job, e)),
            )
        except Exception as e:
            with self._lock:
                self._failures += 1
                self._last_error = self._describe(job, e)
            return

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

    @staticmethod
    def _describe(job: _Job, e: BaseException) -> str:
        return f"step {job.step}: {type(e).__name__}: {e}"

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
