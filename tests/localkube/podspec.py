"""What a container would see, made local: volumes become directories, mount paths are mapped to
them, env values are resolved from Secrets, ConfigMaps and the downward API.

Containers run as local processes, so a mountPath such as /var/run/secrets/... cannot exist as
such. Each volumeMount (and the terminationMessagePath) is mapped to a directory or file under the
pod's work directory, and the process learns the mapping in two ways:
- every occurrence of the mount path (at a path boundary) in command, args, env values and
  workingDir is replaced by the local path, so `--out /data/x` or `SUMMARY=/dev/termination-log`
  just work;
- env `LOCALKUBE_MOUNT_<PATH>` (the path upper-cased, non-alphanumerics as `_`, e.g.
  LOCALKUBE_MOUNT_VAR_RUN_SECRETS_KUBERNETES_IO_SERVICEACCOUNT) and `LOCALKUBE_MOUNTS` (JSON,
  mount path -> local path) for code that has a path built in.
A library that reads a fixed path without asking (the in-cluster config of client libraries) still
misses it; tests pass such paths through env or args.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from .rest import HttpError, Rest

Obj = dict[str, Any]
POD_IP = "127.0.0.1"


class ConfigError(Exception):
    """A referenced Secret, ConfigMap or key is missing (the kubelet's CreateContainerConfigError)."""


def mount_env_name(mount_path: str) -> str:
    return "LOCALKUBE_MOUNT_" + re.sub(r"[^A-Za-z0-9]", "_", mount_path.strip("/")).upper()


def substitute(value: str, mounts: Mapping[str, Path]) -> str:
    """Replace each mount path in `value` by its local path (longest first, whole path segments).

    One pass: a local path put in is never rewritten again (the local path of /etc/x usually lies
    under /tmp, which may itself be a mount)."""
    if not mounts:
        return value
    local = {mount.rstrip("/") or "/": str(path) for mount, path in mounts.items()}
    alternatives = "|".join(re.escape(m) for m in sorted(local, key=len, reverse=True))
    return re.sub(f"({alternatives})" + r"(?=/|$|[^\w.-])", lambda m: local[m.group(1)], value)


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables replaced, $$ escapes, unknown ones kept."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(one, value)


def _decode(data: Mapping[str, str] | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (data or {}).items()}


class PodContext:
    """Reads what a pod refers to, with the node's own credentials (so the Node authorizer decides,
    as for a real kubelet), and lays its volumes out under `pod_dir`."""

    def __init__(self, rest: Rest, pod: Obj, pod_dir: Path, api_port: int) -> None:
        self.rest = rest
        self.pod = pod
        self.ns = pod["metadata"]["namespace"]
        self.dir = pod_dir
        self.api_port = api_port
        self.volumes: dict[str, Path] = {}

    def _get(self, kind: str, name: str, optional: bool) -> Obj | None:
        try:
            return self.rest.request("GET", f"/api/v1/namespaces/{self.ns}/{kind}/{name}")
        except HttpError as err:
            if optional and err.status == 404:
                return None
            raise ConfigError(f"{kind[:-1]} {name!r} not found: {err}") from err

    def _secret(self, name: str, optional: bool = False) -> dict[str, bytes] | None:
        obj = self._get("secrets", name, optional)
        return None if obj is None else _decode(obj.get("data"))

    def _configmap(self, name: str, optional: bool = False) -> dict[str, bytes] | None:
        obj = self._get("configmaps", name, optional)
        if obj is None:
            return None
        return {
            **{k: v.encode() for k, v in (obj.get("data") or {}).items()},
            **_decode(obj.get("binaryData")),
        }

    def _token(self, source: Obj) -> bytes:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        meta = self.pod["metadata"]
        spec: Obj = {
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]},
            "expirationSeconds": source.get("expirationSeconds", 3600),
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        path = f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token"
        resp = self.rest.request(
            "POST", path, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        )
        return resp["status"]["token"].encode()

    def field(self, path: str) -> str:
        """A downward-API fieldRef value."""
        meta, spec = self.pod["metadata"], self.pod["spec"]
        if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        values = {
            "metadata.name": meta["name"],
            "metadata.namespace": self.ns,
            "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.podIP": POD_IP,
            "status.podIPs": POD_IP,
            "status.hostIP": POD_IP,
            "status.hostIPs": POD_IP,
        }
        if path not in values:
            raise ConfigError(f"fieldRef {path!r} is not supported by the test kubelet")
        return values[path]

    def resource(self, container: Obj, ref: Obj) -> str:
        """A resourceFieldRef value: the container's limit or request, else the node's allocatable
        (as the kubelet does), rounded up in units of `divisor`."""
        kind, _, name = ref["resource"].partition(".")
        given = (container.get("resources") or {}).get(kind, {}).get(name)
        amount = (
            parse_quantity(given)
            if given
            else parse_quantity({"cpu": "64", "memory": "512Gi"}.get(name, "0"))
        )
        return str(math.ceil(amount / parse_quantity(ref.get("divisor", "1"))))

    def _files(self, target: Path, data: Mapping[str, bytes], items: list[Obj] | None) -> None:
        chosen = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
        for key, rel in chosen.items():
            if key not in data:
                raise ConfigError(f"key {key!r} not found")
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[key])

    def _projected(self, target: Path, sources: list[Obj]) -> None:
        for source in sources:
            if "serviceAccountToken" in source:
                tok = source["serviceAccountToken"]
                self._files(target, {"t": self._token(tok)}, [{"key": "t", "path": tok["path"]}])
            elif "secret" in source or "configMap" in source:
                kind = "secret" if "secret" in source else "configMap"
                ref = source[kind]
                read = self._secret if kind == "secret" else self._configmap
                data = read(ref["name"], ref.get("optional", False))
                if data is not None:
                    self._files(target, data, ref.get("items"))
            elif "downwardAPI" in source:
                self._downward(target, source["downwardAPI"]["items"])

    def _downward(self, target: Path, items: list[Obj]) -> None:
        data = {i["path"]: self.field(i["fieldRef"]["fieldPath"]).encode() for i in items if "fieldRef" in i}
        self._files(target, data, None)

    def make_volumes(self) -> None:
        """Materialize every pod volume (Secrets and ConfigMaps read once, tokens requested once)."""
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            if "hostPath" in vol:
                self.volumes[name] = Path(vol["hostPath"]["path"])
                continue
            target = self.dir / "volumes" / name
            target.mkdir(parents=True, exist_ok=True)
            self.volumes[name] = target
            if "secret" in vol:
                src = vol["secret"]
                data = self._secret(src["secretName"], src.get("optional", False))
                self._files(target, data or {}, src.get("items"))
            elif "configMap" in vol:
                src = vol["configMap"]
                data = self._configmap(src["name"], src.get("optional", False))
                self._files(target, data or {}, src.get("items"))
            elif "projected" in vol:
                self._projected(target, vol["projected"]["sources"])
            elif "downwardAPI" in vol:
                self._downward(target, vol["downwardAPI"]["items"])
            elif "emptyDir" not in vol:
                raise ConfigError(
                    f"volume {name!r}: only emptyDir, hostPath, secret, configMap, projected "
                    "and downwardAPI volumes are supported by the test kubelet"
                )

    def mounts(self, container: Obj, termination_file: Path) -> dict[str, Path]:
        """mountPath -> local path for `container`, the termination message path included."""
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            local = self.volumes[mount["name"]]
            if sub := mount.get("subPath"):
                local = local / sub
            mounts[mount["mountPath"]] = local
        mounts[container.get("terminationMessagePath") or "/dev/termination-log"] = termination_file
        return mounts

    def env(self, container: Obj, mounts: Mapping[str, Path], host: bool = True) -> dict[str, str]:
        """The process environment: the kubelet's own (minus AWS_* and KUBECONFIG, so that a pod
        gets credentials only from its spec; the rest carries the venv and offline caches), the
        variables every pod gets, envFrom, then env, with $(VAR) expansion and mount mapping.
        host=False (a container from an image, whose own ENV applies): none of the kubelet's."""
        base: dict[str, str] = {}
        if host:
            base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "KUBECONFIG"}
            base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])
            base["LOCALKUBE_MOUNTS"] = json.dumps({k: str(v) for k, v in mounts.items()})
            base |= {mount_env_name(k): str(v) for k, v in mounts.items()}
        base |= {
            "HOSTNAME": self.pod["metadata"]["name"],
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
        }
        pod_env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            kind = "secretRef" if "secretRef" in source else "configMapRef"
            ref = source[kind]
            read = self._secret if kind == "secretRef" else self._configmap
            data = read(ref["name"], ref.get("optional", False)) or {}
            pod_env |= {source.get("prefix", "") + k: v.decode() for k, v in data.items()}
        for var in container.get("env") or []:
            value = self._env_value(container, var, {**base, **pod_env})
            if value is not None:
                pod_env[var["name"]] = substitute(value, mounts)
        return base | pod_env

    def _env_value(self, container: Obj, var: Obj, env: Mapping[str, str]) -> str | None:
        if "valueFrom" not in var:
            return expand(var.get("value", ""), env)
        src = var["valueFrom"]
        if "fieldRef" in src:
            return self.field(src["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in src:
            return self.resource(container, src["resourceFieldRef"])
        kind = "secretKeyRef" if "secretKeyRef" in src else "configMapKeyRef"
        ref = src[kind]
        read = self._secret if kind == "secretKeyRef" else self._configmap
        data = read(ref["name"], ref.get("optional", False))
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"env {var['name']}: key {ref['key']!r} not in {kind[:-6]} {ref['name']!r}")
        return data[ref["key"]].decode()
