"""A test kubelet: one node whose pods run as local processes.

It does, with the node's own identity (system:node:<name>, so the Node authorizer and the
NodeRestriction admission plugin check it as they check a real kubelet), what the e2e tests need:
- registers the node (Ready, `nvidia.com/gpu` capacity, label finetune.dev/local=true, the GPU
  taint) and renews its Lease;
- runs each container of a pod bound to it as a process group (command + args; `python` and
  `python3` are this interpreter, so pods run from the project venv), with env, envFrom, volumes,
  working dir and termination message path made local (see podspec.py for the mount mapping);
  init containers first, one after the other. A container whose image hack/images.sh built runs
  from that image instead, with `buildah run` (images.py: the image's root file system, read-only
  as the securityContext asks, the pod's user and volumes at their real paths);
- reports phase, conditions, container states, exit codes, termination messages and the pod IP;
- on deletion: SIGTERM to the process group, the grace period, SIGKILL, final status, then removes
  the pod (delete with grace 0), as the kubelet does;
- evict(): a drain (Eviction API, the API server adds the DisruptionTarget condition) or a spot
  reclaim / node-pressure eviction (the kubelet sets DisruptionTarget, terminates, marks Failed).

restartPolicy is treated as Never (Jobs with a podFailurePolicy require it). Output of every
container goes to `log_path(namespace, pod, container)`; there is no `kubectl logs`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .binaries import KUBE_VERSION
from .controlplane import GPU_TAINT
from .images import RUN_TERMINATION, ImageRun, argv_of, local_image, user_of
from .podspec import POD_IP, ConfigError, PodContext, expand, substitute
from .rest import MERGE, STRATEGIC, HttpError, Rest

Obj = dict[str, Any]
LOCAL_LABEL = "finetune.dev/local"
LEASE_SECONDS = 40
MESSAGE_LIMIT = 4096  # bytes of a termination message the kubelet keeps


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _condition(kind: str, status: bool, reason: str = "", message: str = "") -> Obj:
    cond = {"type": kind, "status": "True" if status else "False", "lastTransitionTime": now()}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


@dataclass
class Container:
    """One container's process and what is reported about it."""

    spec: Obj
    log: Path
    termination_file: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})

    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = Path()
    image_run: ImageRun | None = None
    image_id: str = ""

    @property
    def name(self) -> str:
        return self.spec["name"]

    def prepare(self, ctx: PodContext, pod_dir: Path) -> None:
        """Resolve env, argv and working dir (reads Secrets and ConfigMaps: may raise)."""
        spec = self.spec
        self.termination_file.parent.mkdir(parents=True, exist_ok=True)
        self.termination_file.write_bytes(b"")
        image = local_image(spec.get("image", ""))
        if image is not None:
            self._prepare_image(ctx, pod_dir, image)
            return
        mounts = ctx.mounts(spec, self.termination_file)
        self.env = ctx.env(spec, mounts)
        words = [*(spec.get("command") or []), *(spec.get("args") or [])]
        self.argv = [substitute(expand(word, self.env), mounts) for word in words]
        if self.argv and self.argv[0] in ("python", "python3"):
            self.argv[0] = sys.executable
        self.cwd = pod_dir / "cwd" / self.name
        if spec.get("workingDir"):
            self.cwd = Path(substitute(spec["workingDir"], mounts))
            if not self.cwd.exists():  # a directory of the image: made under the pod's own root
                self.cwd = pod_dir / "rootfs" / spec["workingDir"].lstrip("/")
        self.cwd.mkdir(parents=True, exist_ok=True)

    def _prepare_image(self, ctx: PodContext, pod_dir: Path, image: dict[str, Any]) -> None:
        """The `buildah run` of this container (see images.py for what differs from a runtime)."""
        spec, config = self.spec, image["config"]
        volumes = {v["name"]: v for v in ctx.pod["spec"].get("volumes") or []}
        mounts: list[tuple[Path, str, bool]] = []
        for mount in spec.get("volumeMounts") or []:
            local = ctx.volumes[mount["name"]]
            if "emptyDir" in volumes[mount["name"]]:
                local.chmod(0o777)  # as the kubelet makes an emptyDir
            if sub := mount.get("subPath"):
                local = local / sub
            mounts.append((local, mount["mountPath"], bool(mount.get("readOnly"))))
        path = spec.get("terminationMessagePath") or "/dev/termination-log"
        target = RUN_TERMINATION if path.startswith("/dev/") else path
        mounts.append((self.termination_file, target, False))
        renamed = {path: Path(target)} if target != path else {}
        user = user_of(ctx.pod, spec, config)
        uid, _, gid = user.partition(":")
        if uid.isdigit():
            os.chown(self.termination_file, int(uid), int(gid) if gid.isdigit() else -1)
        meta = ctx.pod["metadata"]
        sc = spec.get("securityContext") or {}
        self.image_run = ImageRun(
            name=f"localkube-{meta['uid'][:8]}-{self.name}",
            image=spec["image"],
            config=config,
            user=user,
            read_only=bool(sc.get("readOnlyRootFilesystem")),
            run_dir=pod_dir / "run" / self.name,
            mounts=mounts,
            workdir=spec.get("workingDir") or config.get("WorkingDir") or "",
        )
        self.image_id = image["id"]
        env = ctx.env(spec, renamed, host=False)
        command = [substitute(expand(word, env), renamed) for word in argv_of(spec, config)]
        self.image_run.prepare()
        self.argv = self.image_run.argv(command, env)
        self.env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "FINETUNE_CACHE", "TMPDIR")}
        self.cwd = pod_dir

    def signal(self, sig: int) -> None:
        """SIGTERM to the container's first process (buildah itself would SIGKILL it), any other
        signal to the whole process group."""
        if self.popen is None or self.popen.poll() is not None:
            return
        if self.image_run is not None and sig == signal.SIGTERM:
            init = self.image_run.init_pid(self.popen.pid)
            if init is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(init, sig)
                return
        _signal(self.popen, sig)

    def cleanup(self) -> None:
        if self.image_run is not None:
            self.image_run.cleanup()

    def status(self) -> Obj:
        running = "running" in self.state
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": self.image_id,
            "containerID": f"localkube://{self.popen.pid}" if self.popen else "",
            "ready": running,
            "started": running,
            "restartCount": 0,
            "state": self.state,
        }

    def finish(self, exit_code: int, reason: str = "") -> None:
        message = self._message(exit_code)
        terminated = {
            "exitCode": exit_code,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "startedAt": self.started_at or now(),
            "finishedAt": now(),
        }
        if message:
            terminated["message"] = message
        self.state = {"terminated": terminated}

    def _message(self, exit_code: int) -> str:
        if self.termination_file.is_file():
            text = self.termination_file.read_bytes()[:MESSAGE_LIMIT].decode(errors="replace")
            if text:
                return text
        if (
            exit_code
            and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
            and self.log.exists()
        ):
            lines = self.log.read_bytes().splitlines()[-80:]
            return b"\n".join(lines)[-2048:].decode(errors="replace")
        return ""


class PodRun(threading.Thread):
    """Runs one pod to its end, then reports it (and removes it when it was deleted)."""

    def __init__(self, kubelet: TestKubelet, pod: Obj) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.kubelet = kubelet
        self.pod = pod
        self.ns, self.pod_name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = kubelet.pod_dir(self.ns, self.pod_name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.deadline: float | None = None  # SIGKILL after this (monotonic), once termination began
        self.deleted = False
        self.finished = False  # final status reported
        self.evicted: str = ""  # the status message when the kubelet evicted the pod
        self.error: str = ""  # the status message when the test kubelet itself failed
        self.lock = threading.Lock()
        self.started_at = now()
        self.conditions: dict[str, Obj] = {}
        self.init = self._containers("initContainers")
        self.main = self._containers("containers")
        self.all = self.init + self.main

    def _containers(self, key: str) -> list[Container]:
        return [
            Container(
                c,
                self.kubelet.log_path(self.ns, self.pod_name, c["name"]),
                self.dir / "termination" / c["name"],
            )
            for c in self.pod["spec"].get(key) or []
        ]

    # -- termination requests (from the watch thread or evict()) --------------------------------

    def terminate(self, grace: float, *, deleted: bool = False, evicted: str = "") -> None:
        """Begin termination: SIGTERM now, SIGKILL after `grace` seconds. A pod that already ended
        and is now deleted is removed at once."""
        with self.lock:
            if self.finished:
                if deleted and not self.deleted:
                    self.deleted = True
                    self.kubelet.remove(self.ns, self.pod_name, self.uid)
                return
            self.deleted |= deleted
            self.evicted = self.evicted or evicted
            deadline = time.monotonic() + max(grace, 0)
            first = self.deadline is None
            self.deadline = deadline if first else min(self.deadline, deadline)
        if first:
            for container in self.all:
                container.signal(signal.SIGTERM)

    # -- the pod's life ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            phase = self._run()
        except Exception as err:  # reported in the pod, not lost in a thread
            for c in self.all:
                if "terminated" not in c.state:
                    c.finish(128, "StartError")
            phase, self.error = "Failed", f"test kubelet error: {err!r}"
        for c in self.all:
            c.cleanup()
        self._report(phase)
        with self.lock:
            self.finished = True
            if self.deleted:
                self.kubelet.remove(self.ns, self.pod_name, self.uid)

    def _run(self) -> str:
        ctx = PodContext(self.kubelet.rest, self.pod, self.dir, self.kubelet.api_port)
        # Retried like a real kubelet does: a missing Secret or ConfigMap may still appear, and the
        # Node authorizer learns that a pod is bound here a moment after the binding (403 until then).
        while True:
            try:
                ctx.make_volumes()
                for container in self.all:
                    container.prepare(ctx, self.dir)
                break
            except (ConfigError, HttpError) as err:
                self._waiting("CreateContainerConfigError", str(err))
                if self._wait_or_terminated(0.5):
                    return "Failed"
        for container in self.init:
            self._start(container)
            self._report("Pending")
            self._wait([container])
            if container.state["terminated"]["exitCode"] != 0 or self.deadline is not None:
                for c in self.main:
                    c.state = {"waiting": {"reason": "PodInitializing"}}
                return "Failed"
        for container in self.main:
            self._start(container)
        self._report("Running")
        self._wait(self.main)
        if self.evicted:
            return "Failed"
        ok = all(c.state["terminated"]["exitCode"] == 0 for c in self.main)
        return "Succeeded" if ok else "Failed"

    def _wait_or_terminated(self, seconds: float) -> bool:
        time.sleep(seconds)
        return self.deadline is not None

    def _waiting(self, reason: str, message: str) -> None:
        for c in self.main:
            c.state = {"waiting": {"reason": reason, "message": message}}
        self._report("Pending")

    def _start(self, container: Container) -> None:
        container.started_at = now()
        if self.deadline is not None:
            container.finish(137, "Error")
            return
        argv = container.argv
        if not argv:
            container.log.write_text("test kubelet: no command; an image's entrypoint cannot run locally\n")
            container.finish(128, "StartError")
            return
        with container.log.open("ab") as log:
            try:
                container.popen = subprocess.Popen(
                    argv,
                    cwd=container.cwd,
                    env=container.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as err:
                log.write(f"test kubelet: cannot start {argv[0]}: {err}\n".encode())
                container.finish(128, "StartError")
                return
        container.state = {"running": {"startedAt": container.started_at}}

    def _wait(self, containers: list[Container]) -> None:
        """Until every process of `containers` exited; SIGKILL once the grace period is over."""
        pending = [c for c in containers if c.popen and "terminated" not in c.state]
        while pending:
            for c in list(pending):
                assert c.popen is not None
                code = c.popen.poll()
                if code is not None:
                    c.finish(code if code >= 0 else 128 - code)
                    pending.remove(c)
                    if pending and not self.deleted:
                        self._report("Running")
            if self.deadline is not None and time.monotonic() > self.deadline:
                for c in pending:
                    c.signal(signal.SIGKILL)
            time.sleep(0.05)

    # -- status ----------------------------------------------------------------------------------

    def _transitions(self, conditions: list[Obj]) -> list[Obj]:
        """Keep lastTransitionTime of a condition whose status did not change, as the kubelet does."""
        for cond in conditions:
            previous = self.conditions.get(cond["type"])
            if previous and previous["status"] == cond["status"]:
                cond["lastTransitionTime"] = previous["lastTransitionTime"]
            self.conditions[cond["type"]] = cond
        return conditions

    def _report(self, phase: str) -> None:
        running = phase == "Running"
        done = phase in ("Succeeded", "Failed")
        initialized = phase != "Pending" or not self.init
        ready_reason = "PodCompleted" if done else ("" if running else "ContainersNotReady")
        status: Obj = {
            "phase": phase,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.started_at,
            "conditions": self._transitions(
                [
                    _condition("PodReadyToStartContainers", not done),
                    _condition("Initialized", initialized, "" if initialized else "ContainersNotInitialized"),
                    _condition("ContainersReady", running, ready_reason),
                    _condition("Ready", running, ready_reason),
                ]
            ),
            "containerStatuses": [c.status() for c in self.main],
        }
        if self.init:
            status["initContainerStatuses"] = [c.status() for c in self.init]
        if self.evicted and done:
            status |= {"reason": "Evicted", "message": self.evicted}
        elif self.error and done:
            status |= {"reason": "LocalkubeError", "message": self.error}
        self.kubelet.patch_status(self.ns, self.pod_name, self.uid, status)


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


class TestKubelet:
    """The kubelet of node `name`. start() registers the node and begins watching its pods."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        kubeconfig: Path,
        workdir: Path,
        api_port: int,
        *,
        name: str = "local-gpu-0",
        gpus: int = 8,
        drainer_kubeconfig: Path | None = None,
    ) -> None:
        self.name = name
        self.rest = Rest(kubeconfig)
        self.drainer = Rest(drainer_kubeconfig) if drainer_kubeconfig else None
        self.workdir = workdir
        self.api_port = api_port
        self.gpus = gpus
        self.log = workdir / "kubelet.log"
        self.runs: dict[str, PodRun] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._heartbeat, name="kubelet-heartbeat", daemon=True),
            threading.Thread(target=self._watch, name="kubelet-watch", daemon=True),
        ]

    def pod_dir(self, namespace: str, pod: str) -> Path:
        return self.workdir / "pods" / f"{namespace}_{pod}"

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        """Where the output of `container` of `pod` goes (stdout and stderr together)."""
        return self.pod_dir(namespace, pod) / f"{container}.log"

    def _note(self, text: str) -> None:
        with self.log.open("a") as out:
            out.write(f"{micro_now()} {text}\n")

    # -- node ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._register()
        for thread in self.threads:
            thread.start()

    def _register(self) -> None:
        capacity = {
            "cpu": "64",
            "memory": "512Gi",
            "pods": "110",
            "ephemeral-storage": "200Gi",
            "nvidia.com/gpu": str(self.gpus),
        }
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    LOCAL_LABEL: "true",
                    "nvidia.com/gpu.present": "true",
                },
            },
            "spec": {"taints": [GPU_TAINT]},
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": self._node_conditions(),
                "addresses": [
                    {"type": "InternalIP", "address": POD_IP},
                    {"type": "Hostname", "address": self.name},
                ],
                "nodeInfo": {
                    "kubeletVersion": KUBE_VERSION,
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "localkube://1",
                    "kernelVersion": platform.release(),
                    "osImage": "localkube test kubelet",
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            },
        }
        try:
            created = self.rest.request("POST", "/api/v1/nodes", node)
        except HttpError as err:
            if err.status != 409:
                raise
            created = self.rest.request("GET", f"/api/v1/nodes/{self.name}")
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": created["metadata"]["uid"]}
                ],
            },
            "spec": {
                "holderIdentity": self.name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": micro_now(),
            },
        }
        try:
            self.rest.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)
        except HttpError as err:
            if err.status != 409:
                raise
        self._note(f"registered node {self.name}")

    def _node_conditions(self) -> list[Obj]:
        t = now()
        conds = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ("Ready", "True", "KubeletReady"),
        ]
        return [
            {"type": k, "status": s, "reason": r, "lastHeartbeatTime": t, "lastTransitionTime": t}
            for k, s, r in conds
        ]

    def _heartbeat(self) -> None:
        beats = 0
        while not self.stopping.wait(10):
            beats += 1
            try:
                self.rest.request(
                    "PATCH",
                    f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}",
                    {"spec": {"renewTime": micro_now()}},
                    content_type=MERGE,
                )
                if beats % 6 == 0:
                    self.rest.request(
                        "PATCH",
                        f"/api/v1/nodes/{self.name}/status",
                        {"status": {"conditions": self._node_conditions()}},
                        content_type=STRATEGIC,
                    )
            except Exception as err:  # the next beat retries
                self._note(f"heartbeat failed: {err!r}")

    # -- pods ------------------------------------------------------------------------------------

    def _watch(self) -> None:
        path, selector = "/api/v1/pods", {"fieldSelector": f"spec.nodeName={self.name}"}
        while not self.stopping.is_set():
            try:
                listed = self.rest.request("GET", path, query=selector)
                for pod in listed["items"]:
                    self._sync(pod)
                query = {
                    **selector,
                    "resourceVersion": listed["metadata"]["resourceVersion"],
                    "timeoutSeconds": 30,
                }
                for event in self.rest.watch(path, query):
                    if self.stopping.is_set():
                        return
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: list again
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._sync(event["object"])
                    elif event["type"] == "DELETED":
                        self._forget(event["object"])
            except Exception as err:  # the API server restarted or a request failed
                if not self.stopping.is_set():
                    self._note(f"watch: {err!r}")
                    time.sleep(0.5)

    def _sync(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid, phase = meta["uid"], pod.get("status", {}).get("phase")
        with self.lock:
            run = self.runs.get(uid)
            if run is None and meta.get("deletionTimestamp") and phase not in ("Succeeded", "Failed"):
                self._note(f"{meta['namespace']}/{meta['name']}: deleted before it started")
                run = self.runs[uid] = PodRun(self, pod)
                run.terminate(0, deleted=True)
                run.start()
                return
            if run is None and meta.get("deletionTimestamp"):
                self.remove(meta["namespace"], meta["name"], uid)
                return
            if run is None and phase not in ("Succeeded", "Failed"):
                self._note(f"{meta['namespace']}/{meta['name']}: starting")
                run = self.runs[uid] = PodRun(self, pod)
                run.start()
                return
        if run is not None and meta.get("deletionTimestamp"):
            run.terminate(meta.get("deletionGracePeriodSeconds") or 0, deleted=True)

    def _forget(self, pod: Obj) -> None:
        with self.lock:
            run = self.runs.pop(pod["metadata"]["uid"], None)
        if run is not None and run.is_alive():
            run.terminate(0)

    def patch_status(self, namespace: str, pod: str, uid: str, status: Obj) -> None:
        body = {"metadata": {"uid": uid}, "status": status}
        try:
            self.rest.request(
                "PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod}/status", body, content_type=STRATEGIC
            )
        except HttpError as err:
            self._note(f"{namespace}/{pod}: status update failed: {err.status} {err.body}")

    def remove(self, namespace: str, pod: str, uid: str) -> None:
        """The kubelet's final delete: grace 0, only this incarnation of the pod."""
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.rest.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{pod}", body)
        except HttpError as err:
            if err.status not in (404, 409):
                self._note(f"{namespace}/{pod}: delete failed: {err.status} {err.body}")

    def evict(
        self, namespace: str, pod: str, reason: str = "TerminationByKubelet", grace_seconds: int | None = None
    ) -> None:
        """Take `pod` away as a node drain or a spot reclaim does.

        reason "EvictionByEvictionAPI": a drain, through the Eviction API with the drainer's
        identity (the API server sets the DisruptionTarget condition and deletes the pod; this
        kubelet then stops it like any deleted pod). "TerminationByKubelet" (or any other reason):
        the kubelet itself sets DisruptionTarget, sends SIGTERM, waits the grace period (default:
        the pod's terminationGracePeriodSeconds), SIGKILLs, and leaves the pod Failed.
        """
        if reason == "EvictionByEvictionAPI":
            if self.drainer is None:
                raise RuntimeError("evict through the Eviction API needs drainer_kubeconfig")
            body: Obj = {
                "apiVersion": "policy/v1",
                "kind": "Eviction",
                "metadata": {"name": pod, "namespace": namespace},
            }
            if grace_seconds is not None:
                body["deleteOptions"] = {"gracePeriodSeconds": grace_seconds}
            self.drainer.request("POST", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", body)
            return
        obj = self.rest.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
        uid = obj["metadata"]["uid"]
        with self.lock:
            run = self.runs.get(uid)
        if run is None:
            raise RuntimeError(f"{namespace}/{pod} is not running on {self.name}")
        message = f"{self.name}: the node is being reclaimed ({reason})"
        self.patch_status(
            namespace, pod, uid, {"conditions": [_condition("DisruptionTarget", True, reason, message)]}
        )
        grace = (
            obj["spec"].get("terminationGracePeriodSeconds", 30) if grace_seconds is None else grace_seconds
        )
        run.terminate(grace, evicted=message)

    def stop(self) -> None:
        """Stop watching; kill what still runs (1 s grace)."""
        self.stopping.set()
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.terminate(1)
        for run in runs:
            run.join(5)
        self.rest.close()
        if self.drainer:
            self.drainer.close()
