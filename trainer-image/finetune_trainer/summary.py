"""The machine-readable summary written at exit, sized for a Kubernetes termination message.

The kubelet keeps at most 4096 bytes of /dev/termination-log, so the summary is trimmed to fit:
first artifact checksums go, then artifacts from the end (their count stays), then the message is
shortened. The scalar figures always survive.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LIMIT_BYTES = 4096
TERMINATION_LOG = Path("/dev/termination-log")


def encode(summary: dict[str, Any], limit: int = LIMIT_BYTES) -> str:
    """Compact JSON of `summary`, trimmed to at most `limit` bytes."""
    current = dict(summary)
    text = _dump(current)
    if len(text.encode()) <= limit:
        return text
    artifacts = [dict(a) for a in current.get("artifacts") or []]
    for artifact in artifacts:
        artifact.pop("sha256", None)
    current["artifacts"] = artifacts
    current["artifactCount"] = len(summary.get("artifacts") or [])
    while artifacts and len(_dump(current).encode()) > limit:
        artifacts.pop()
    message = str(current.get("message") or "")
    while message and len(_dump(current).encode()) > limit:
        message = message[: len(message) // 2]
        current["message"] = message + "..."
    text = _dump(current)
    if len(text.encode()) > limit:  # pathological: very long URIs; keep what matters most
        keep = ("exitReason", "steps", "finalLoss", "checkpointUri", "adapterUri")
        text = _dump({k: current.get(k) for k in keep})[:limit]
    return text


def _dump(summary: dict[str, Any]) -> str:
    return json.dumps(summary, separators=(",", ":"), default=str)


def summary_path() -> Path:
    """FINETUNE_SUMMARY_PATH, else /dev/termination-log when writable, else ./summary.json."""
    configured = os.environ.get("FINETUNE_SUMMARY_PATH")
    if configured:
        return Path(configured)
    if TERMINATION_LOG.exists() and os.access(TERMINATION_LOG, os.W_OK):
        return TERMINATION_LOG
    return Path("summary.json")


def write(summary: dict[str, Any], path: Path | None = None) -> Path:
    """Write the trimmed summary; a write failure is logged (the exit code still tells the story)."""
    target = path or summary_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(encode(summary))
    except OSError as e:
        log.error("cannot write the summary to %s: %s", target, e)
    return target
