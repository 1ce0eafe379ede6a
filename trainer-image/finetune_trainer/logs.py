"""Log output: human lines on a terminal, one JSON object per line otherwise (pods, CI)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from finetune_trainer.timestamps import rfc3339


class JsonFormatter(logging.Formatter):
    """One JSON object per line, the trainer's and the operator's alike: `time` (RFC 3339, ms),
    `level` (lower case), `logger`, `msg`, `object` (namespace and name of the Kubernetes object a
    kopf handler logs about), the fields of `extra={"fields": {...}}`, and `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339(datetime.fromtimestamp(record.created, UTC), digits=3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            entry["object"] = {k: ref.get(k) for k in ("namespace", "name") if ref.get(k)}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def interactive() -> bool:
    """True when stderr is a terminal: progress bar and plain lines instead of JSON."""
    return sys.stderr.isatty()


def setup(json_lines: bool | None = None, level: int = logging.INFO) -> bool:
    """Configure the root logger on stderr; returns whether lines are JSON."""
    use_json = not interactive() if json_lines is None else json_lines
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if use_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "datasets", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return use_json
