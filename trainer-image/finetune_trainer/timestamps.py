"""RFC 3339 times in UTC with a `Z`, as Kubernetes and every file this project writes carry them."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(t: datetime | None = None, *, digits: int = 0) -> str:
    """`t` (now when None) as `2025-01-02T03:04:05Z`; `digits` fractional second digits: 0 as
    Kubernetes writes `metav1.Time`, 3 for log lines, 6 as `metav1.MicroTime` (Leases)."""
    if digits not in (0, 3, 6):
        raise ValueError(f"digits: expected 0, 3 or 6, got {digits}")
    t = (t or datetime.now(UTC)).astimezone(UTC)
    fraction = f".{t.microsecond:06d}"[: digits + 1] if digits else ""
    return t.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"
