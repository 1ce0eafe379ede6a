"""Push progress to the operator: how the status gets live figures without the pod having any
Kubernetes API access.

When FINETUNE_REPORT_URL is set, a daemon thread POSTs the progress snapshot every
FINETUNE_REPORT_INTERVAL seconds (default 10), and at once when `poke()` is called (a checkpoint
completed, training finished). Each report carries a strictly increasing `sequence` and
`reportedAt`, so the operator can drop a report that arrives after a newer one. The bearer token is
read from FINETUNE_REPORT_TOKEN_FILE on every send (projected ServiceAccount tokens are rotated on
disk). Failures are logged at most once a minute and never stop training; the token never appears
in a log line.

The body is a `contract.ProgressReport`, the model the operator validates it with: a NaN or
infinite loss goes out as null with `diverged: true`, never as the bare `NaN` JSON does not have.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_trainer.contract import ReportError, build_report

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 10.0
FAILURE_LOG_INTERVAL = 60.0
TIMEOUT = 5.0
FINAL_RETRY_SECONDS = 10.0
"""How long the last report is sent again while no operator takes it: a standby answered (503; only
the leader writes reports to status, and the Service's next connection may reach it) or none did
(the operator restarting). A refusal (4xx) is final."""
FINAL_RETRY_PAUSE = 1.0


class Reporter:
    """The push client; `close()` sends a last report (the final phase) and stops the thread."""

    def __init__(
        self,
        url: str,
        snapshot: Callable[[], dict[str, Any]],
        job: dict[str, str | None],
        interval: float = DEFAULT_INTERVAL,
        token_file: str | None = None,
    ) -> None:
        self.url = url
        self.snapshot = snapshot
        self.job = job
        self.interval = interval
        self.token_file = token_file
        self.sequence = 0
        self.sent = 0
        self.retryable = False
        """Whether the last send failed for want of a leading operator (503, or no answer)."""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self._last_failure_log = -FAILURE_LOG_INTERVAL
        self._thread = threading.Thread(target=self._loop, name="progress-report", daemon=True)

    def start(self) -> Reporter:
        self._thread.start()
        return self

    def poke(self) -> None:
        """Send soon, without waiting for the interval."""
        self._wake.set()

    def close(
        self,
        timeout: float = TIMEOUT,
        retry_for: float = FINAL_RETRY_SECONDS,
        pause: float = FINAL_RETRY_PAUSE,
    ) -> None:
        """Stop the thread and send the last report, again for up to `retry_for` seconds while no
        leading operator takes it: it carries what only the end of a run has (the samples, the
        final checkpoint list), and the summary written before it is already safe."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        deadline = time.monotonic() + retry_for
        while not self.send_once() and self.retryable and time.monotonic() + pause < deadline:
            time.sleep(pause)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.send_once()
            self._wake.wait(self.interval)
            self._wake.clear()

    def send_once(self) -> bool:
        """One POST; True when the operator accepted it."""
        with self._send_lock:
            self.sequence += 1
            self.retryable = False
            try:
                body = build_report(self.snapshot(), self.sequence, self.job, datetime.now(UTC))
            except ReportError as e:
                self._failed(e)  # a snapshot the operator would refuse: not sent
                return False
            request = urllib.request.Request(
                self.url, data=json.dumps(body.wire()).encode(), method="POST", headers=self._headers()
            )
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                    response.read()
            except (urllib.error.URLError, OSError, ValueError) as e:
                self.retryable = not isinstance(e, urllib.error.HTTPError) or e.code == 503
                self._failed(e)
                return False
            self.sent += 1
            return True

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token_file:
            try:
                headers["Authorization"] = "Bearer " + Path(self.token_file).read_text().strip()
            except OSError as e:
                self._failed(OSError(f"cannot read the token file {self.token_file}: {e.strerror}"))
        return headers

    def _failed(self, error: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_INTERVAL:
            self._last_failure_log = now
            # HTTPError's str() is the status line, never the request headers, so no token leaks.
            log.warning("progress report to %s failed (training goes on): %s", self.url, _describe(error))


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"{error.reason}"
    return f"{type(error).__name__}: {error}"


def reporter_from_env(snapshot: Callable[[], dict[str, Any]], job: dict[str, str | None]) -> Reporter | None:
    """A started Reporter when FINETUNE_REPORT_URL is set, else None."""
    url = os.environ.get("FINETUNE_REPORT_URL")
    if not url:
        return None
    try:
        interval = float(os.environ.get("FINETUNE_REPORT_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        interval = DEFAULT_INTERVAL
    token_file = os.environ.get("FINETUNE_REPORT_TOKEN_FILE") or None
    log.info("reporting progress to %s every %.0fs", url, interval)
    return Reporter(url, snapshot, job, max(1.0, interval), token_file).start()
