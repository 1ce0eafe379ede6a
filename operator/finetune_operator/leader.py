"""Lease-based leader election (coordination.k8s.io/v1), as controller-runtime and client-go do it.

Why a Lease and not kopf's peering: kopf peering needs its own cluster-wide CRD and pauses *all*
replicas when two share a priority (identical Deployment replicas do), while a Lease is the
Kubernetes-native primitive (`kubectl get lease`), needs only `leases` RBAC in the operator's
namespace, and gives one active reconciler with a bounded takeover time (leaseDurationSeconds).
A replica that loses its Lease exits, so a fresh process (and a fresh cache) takes over; the
standby keeps serving health, metrics and progress reports meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_trainer.timestamps import rfc3339

from finetune_operator.config import LeaderElection
from finetune_operator.kube import ConflictError, Kube, NotFoundError
from finetune_operator.status import parse_time

log = logging.getLogger(__name__)


class LostLeadershipError(Exception):
    """The Lease could not be renewed within its duration (or another replica holds it)."""


def micro_time(t: datetime) -> str:
    """A Lease's `metav1.MicroTime`."""
    return rfc3339(t, digits=6)


def can_take(lease: dict[str, Any], identity: str, now: datetime) -> bool:
    """Whether `identity` may hold the Lease now: it is free, ours, or its holder stopped renewing."""
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    duration = int(spec.get("leaseDurationSeconds") or 0)
    return renewed is None or renewed + timedelta(seconds=duration) < now


def claimed(lease: dict[str, Any], identity: str, duration: int, now: datetime) -> dict[str, Any]:
    """The Lease with `identity` as holder, renewed now (acquireTime and transitions on takeover)."""
    spec = dict(lease.get("spec") or {})
    if spec.get("holderIdentity") != identity:
        spec["acquireTime"] = micro_time(now)
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
            1 if spec.get("holderIdentity") else 0
        )
    spec.update(holderIdentity=identity, leaseDurationSeconds=duration, renewTime=micro_time(now))
    return {**lease, "spec": spec}


class LeaderElector:
    def __init__(self, kube: Kube, cfg: LeaderElection, identity: str) -> None:
        self.kube = kube
        self.cfg = cfg
        self.identity = identity

    async def _try(self) -> bool:
        now = datetime.now(UTC)
        try:
            lease = await self.kube.get_lease(self.cfg.namespace, self.cfg.lease_name)
        except NotFoundError:
            body = claimed(
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.cfg.lease_name},
                },
                self.identity,
                self.cfg.lease_duration_seconds,
                now,
            )
            try:
                await self.kube.create_lease(self.cfg.namespace, body)
            except ConflictError:
                return False
            return True
        if not can_take(lease, self.identity, now):
            return False
        try:
            # The resourceVersion in the body makes this a compare-and-swap.
            await self.kube.replace_lease(
                self.cfg.namespace,
                self.cfg.lease_name,
                claimed(lease, self.identity, self.cfg.lease_duration_seconds, now),
            )
        except ConflictError:
            return False
        return True

    async def acquire(self) -> None:
        """Return once this replica holds the Lease."""
        while True:
            try:
                if await self._try():
                    log.info("leader election: %s holds lease %s", self.identity, self.cfg.lease_name)
                    return
            except Exception as e:
                log.warning("leader election: %s", e)
            await asyncio.sleep(self.cfg.renew_seconds)

    async def hold(self) -> None:
        """Renew forever; raise LostLeadershipError when renewal failed for a whole lease duration."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            await asyncio.sleep(self.cfg.renew_seconds)
            try:
                ok = await self._try()
            except Exception as e:
                log.warning("leader election: renew failed: %s", e)
                ok = False
            if ok:
                last_ok = loop.time()
            elif loop.time() - last_ok >= self.cfg.lease_duration_seconds * 2 / 3:
                raise LostLeadershipError(f"lease {self.cfg.lease_name} not renewed")
