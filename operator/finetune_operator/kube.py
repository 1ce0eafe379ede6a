"""The thin I/O layer: the few Kubernetes API calls the operator makes, as async functions.

The official client (its auth, TLS and connection pool) is synchronous; calls run in worker
threads and return plain JSON dicts. Every status write is a merge
patch carrying the resourceVersion it was computed from, so a write based on an out-of-date object
fails with ConflictError instead of overwriting newer status.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes

from finetune_operator.api import API_GROUP, API_VERSION, PLURAL


class ConflictError(Exception):
    """409: the object changed since it was read (or already exists, for creates)."""


class NotFoundError(Exception):
    """404."""


def load_client_config() -> None:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


class ApiError(Exception):
    """Any other non-2xx answer."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}
        """The API server's Status object (reason, message, details.causes), when it sent one."""


CLIENT_THREADS = 16
"""Concurrent API calls (threads, and connections kept open to the API server)."""


class Kube:
    """The API calls, each run in one of CLIENT_THREADS threads with a connection each (the
    client's default pool keeps 5 per CPU, so a burst on a small node opened and dropped TLS
    connections)."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        if api_client is None:
            config = kubernetes.client.Configuration.get_default_copy()
            config.connection_pool_maxsize = CLIENT_THREADS
            api_client = kubernetes.client.ApiClient(config)
        self.client = api_client
        self._threads = ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="kube")

    async def _raw(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        """A call returning plain JSON dicts (the typed client's models are not needed here)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, self._request, method, path, body, content_type
        )

    def _request(self, method: str, path: str, body: Any, content_type: str) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, body, _ = self.client.param_serialize(
            method, path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self.client.call_api(method, url, header_params=headers, body=body, _request_timeout=30)
        data = response.read()
        if response.status == 409:
            raise ConflictError(path)
        if response.status == 404:
            raise NotFoundError(path)
        if not 200 <= response.status < 300:
            try:
                body = json.loads(data)
            except ValueError:
                body = None
            raise ApiError(
                response.status,
                f"{method} {path}: {response.status} {data[:500]!r}",
                body if isinstance(body, dict) else None,
            )
        return json.loads(data) if data else {}

    def _ftj_path(self, namespace: str, name: str) -> str:
        return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}"

    async def get_ftj(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._raw("GET", self._ftj_path(namespace, name))

    async def patch_ftj_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None
    ) -> dict[str, Any]:
        """Merge-patch `.status`; with `resource_version`, only if the object is still at it."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self._raw(
            "PATCH", self._ftj_path(namespace, name) + "/status", body, "application/merge-patch+json"
        )

    async def create_job(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        return await self._raw("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)

    async def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._raw("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self._raw(
            "PATCH",
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            patch,
            "application/merge-patch+json",
        )

    async def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Delete the Job (only that very Job: uid precondition) and, in the background, its pods."""
        body = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
        await self._raw("DELETE", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}", body)

    async def create_secret(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        return await self._raw("POST", f"/api/v1/namespaces/{namespace}/secrets", manifest)

    async def patch_secret(self, namespace: str, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        """A JSON patch: its `test` operations make it conditional without reading the Secret."""
        return await self._raw(
            "PATCH", f"/api/v1/namespaces/{namespace}/secrets/{name}", ops, "application/json-patch+json"
        )

    async def delete_secret(self, namespace: str, name: str, uid: str) -> None:
        """Delete the Secret, only that very one (uid precondition)."""
        body = {"preconditions": {"uid": uid}}
        await self._raw("DELETE", f"/api/v1/namespaces/{namespace}/secrets/{name}", body)

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._raw("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")

    async def token_review(self, token: str, audience: str) -> dict[str, Any]:
        """The TokenReview's status: authenticated, user (username, extra), audiences, error."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        }
        return (await self._raw("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body)).get(
            "status"
        ) or {}

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._raw("GET", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")

    async def create_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any]:
        return await self._raw("POST", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases", lease)

    async def replace_lease(self, namespace: str, name: str, lease: dict[str, Any]) -> dict[str, Any]:
        return await self._raw(
            "PUT", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}", lease
        )

    async def list_events(self, namespace: str, uid: str) -> list[dict[str, Any]]:
        """core/v1 Events about the object with `uid` (the Job controller's FailedCreate, ...)."""
        query = urllib.parse.urlencode({"fieldSelector": f"involvedObject.uid={uid}"})
        return (await self._raw("GET", f"/api/v1/namespaces/{namespace}/events?{query}")).get("items") or []

    async def create_event(self, namespace: str, event: dict[str, Any]) -> dict[str, Any]:
        return await self._raw("POST", f"/api/v1/namespaces/{namespace}/events", event)
