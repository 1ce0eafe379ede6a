"""SIGTERM handling: a flag the training loop reads at the end of each step.

The handler does no work itself (signal handlers run between bytecodes of the main thread, possibly
inside a CUDA call or an upload): it records when the request came, so the loop can finish the
step, checkpoint, and budget the upload against the grace period.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class StopRequest:
    """Set once by SIGTERM (or SIGINT); `remaining(grace, margin)` is the upload budget left."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.received_at: float | None = None
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, signal_name: str = "request") -> None:
        if not self._event.is_set():
            self.received_at = time.monotonic()
            self.signal_name = signal_name
            self._event.set()

    def remaining(self, grace_seconds: float, margin_seconds: float) -> float:
        """Seconds left of the grace period, keeping `margin_seconds` for the summary and exit."""
        if self.received_at is None:
            return grace_seconds - margin_seconds
        return max(0.0, self.received_at + grace_seconds - margin_seconds - time.monotonic())

    def install(self) -> None:
        """Route SIGTERM and SIGINT to this flag (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Give SIGTERM and SIGINT back to the handlers they had before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.is_set():
            log.warning("%s again: still finishing the step and the checkpoint upload", name)
            return
        self.set(name)
        log.warning("%s received: finishing the current step, then checkpointing", name)


def grace_margin(grace_seconds: float) -> float:
    """Seconds of the grace period kept back for writing the summary and exiting: 10%, 3 to 15 s."""
    return min(15.0, max(3.0, grace_seconds * 0.1))
