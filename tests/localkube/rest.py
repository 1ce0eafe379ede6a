"""Plain-JSON requests to the API server over urllib3, with the client certificate of a kubeconfig
written by ControlPlane.kubeconfig_for. The test kubelet patches status with strategic merge
patches and reads objects as the API server writes them, so it needs no model classes (and does
not depend on the kubernetes client's internals, which change between its major versions)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3
import yaml

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


class HttpError(Exception):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: {status} {body[:500]}")
        self.status = status
        self.body = body


class Rest:
    def __init__(self, kubeconfig: Path) -> None:
        cfg = yaml.safe_load(kubeconfig.read_text())
        cluster, user = cfg["clusters"][0]["cluster"], cfg["users"][0]["user"]
        self.server = cluster["server"]
        self.pool = urllib3.PoolManager(
            ca_certs=cluster["certificate-authority"],
            cert_file=user["client-certificate"],
            key_file=user["client-key"],
            cert_reqs="CERT_REQUIRED",
            maxsize=8,
        )

    def _url(self, path: str, query: dict[str, Any] | None) -> str:
        return f"{self.server}{path}" + (f"?{urlencode(query)}" if query else "")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> dict[str, Any]:
        """The decoded response; HttpError for a status of 400 or more."""
        resp = self.pool.request(
            method,
            self._url(path, query),
            body=None if body is None else json.dumps(body),
            headers={"Content-Type": content_type, "Accept": "application/json"},
            timeout=timeout,
        )
        if resp.status >= 400:
            raise HttpError(method, path, resp.status, resp.data.decode(errors="replace"))
        return json.loads(resp.data) if resp.data else {}

    def watch(self, path: str, query: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Events of a watch request as they arrive (the API server sends one JSON object a line)."""
        resp = self.pool.request(
            "GET",
            self._url(path, {**query, "watch": "true"}),
            preload_content=False,
            headers={"Accept": "application/json"},
            timeout=urllib3.Timeout(connect=10, read=None),
        )
        try:
            if resp.status >= 400:
                raise HttpError("WATCH", path, resp.status, resp.read().decode(errors="replace"))
            pending = b""
            for chunk in resp.stream(amt=None):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()

    def close(self) -> None:
        self.pool.clear()
