"""Containers from locally built images: `buildah run` on the project's image store.

When a pod names an image that hack/images.sh built (it is in $FINETUNE_CACHE/containers), the test
kubelet runs the container from that image, as a runtime would, instead of as a host process:
- the image's root file system, read-only when the container's securityContext says
  readOnlyRootFilesystem (the container's overlay mount is remounted read-only before the start);
- the pod's volumes bind-mounted at their real mount paths (readOnly mounts read-only), nothing else
  writable: emptyDirs are world-writable directories as the kubelet makes them;
- the pod's runAsUser/runAsGroup (the container's securityContext first), the image's USER otherwise;
- command/args as Kubernetes combines them with the image's ENTRYPOINT/CMD; env from the image and
  the pod only (not the test's environment);
- the host's network (`--network host`), so 127.0.0.1 is the API server, S3 and the operator.

Two things differ from a real runtime, both because of buildah's chroot isolation:
- /dev inside is the host's /dev, read-only, so no file can be mounted under it: a
  terminationMessagePath below /dev is mounted at /run/termination-log instead, and that path
  replaces it in env and args (the trainer learns the path from FINETUNE_SUMMARY_PATH);
- buildah writes /run/.containerenv at every start and deletes it after, so /run is a directory of
  the pod's own, owned by root (the container's non-root user cannot write it).
buildah answers SIGTERM by killing its child at once, so a graceful stop signals the container's
first process itself (`init_pid`), as a runtime does; SIGKILL goes to the whole process group.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUILDAH = REPO / "hack" / "buildah.sh"
RUN_TERMINATION = "/run/termination-log"


def buildah(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(BUILDAH), *args], check=False, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)}: {done.stderr.strip()}")
    return done


@functools.cache
def local_image(image: str) -> dict[str, Any] | None:
    """The image's OCI config ({"id", "config": {Entrypoint, Cmd, Env, User, WorkingDir}}) when the
    project's store holds `image`, else None (then the pod runs as host processes)."""
    if not image or not BUILDAH.exists():
        return None
    try:
        done = buildah("inspect", "--type", "image", image, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    inspected = json.loads(done.stdout)
    return {"id": inspected["FromImageID"], "config": inspected["OCIv1"].get("config") or {}}


def argv_of(spec: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Kubernetes' rule: command replaces ENTRYPOINT (and drops CMD); args replaces CMD."""
    command = spec.get("command") or config.get("Entrypoint") or []
    args = spec.get("args") or ([] if spec.get("command") else config.get("Cmd") or [])
    return [*command, *args]


def user_of(pod: dict[str, Any], spec: dict[str, Any], config: dict[str, Any]) -> str:
    pod_sc, sc = pod["spec"].get("securityContext") or {}, spec.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    image_user = config.get("User") or "0"
    if uid is None:
        return image_user
    return f"{uid}:{gid}" if gid is not None else str(uid)


def process_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (comm, ppid, pgid) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (comm, int(fields[1]), int(fields[2]))
    return table


@dataclass
class ImageRun:
    """One container of one pod, from a local image: prepare() makes the working container and its
    mounts, argv() is the `buildah run` command line to start, cleanup() removes it all."""

    name: str
    image: str
    config: dict[str, Any]
    user: str
    read_only: bool
    run_dir: Path
    mounts: list[tuple[Path, str, bool]] = field(default_factory=list)
    """(host path, container path, read-only)"""
    workdir: str = ""
    container: str = ""
    rootfs: str = ""
    bound: list[str] = field(default_factory=list)

    def prepare(self) -> None:
        buildah("rm", self.name, check=False)  # a leftover of an earlier run under this name
        self.container = buildah("from", "--pull=never", "--name", self.name, self.image).stdout.strip()
        self.rootfs = buildah("mount", self.container).stdout.strip()
        root = Path(self.rootfs)
        under_run = [m for m in self.mounts if m[1] == "/run" or m[1].startswith("/run/")]
        # Mount targets, while the root is writable (a runtime creates them the same way); those
        # below /run in the pod's own /run.
        self._targets(root, [m for m in self.mounts if m not in under_run])
        if self.workdir:
            (root / self.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / "run").mkdir(exist_ok=True)
        if self.read_only:
            subprocess.run(["mount", "-o", "remount,ro", self.rootfs], check=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o755)
        subprocess.run(["mount", "--bind", str(self.run_dir), str(root / "run")], check=True)
        self.bound.append(str(root / "run"))
        self._targets(root, under_run)

    @staticmethod
    def _targets(root: Path, mounts: list[tuple[Path, str, bool]]) -> None:
        for host, target, _ in mounts:
            where = root / target.lstrip("/")
            if host.is_dir():
                where.mkdir(parents=True, exist_ok=True)
            else:
                where.parent.mkdir(parents=True, exist_ok=True)
                where.touch()

    def argv(self, command: list[str], env: dict[str, str]) -> list[str]:
        # The pod's env values go on the command line (a test cluster's credentials only).
        out = [str(BUILDAH), "run", "--isolation", "chroot", "--network", "host", "--user", self.user]
        if self.workdir:
            out += ["--workingdir", self.workdir]
        for key, value in env.items():
            out += ["-e", f"{key}={value}"]
        for host, target, read_only in self.mounts:
            out += ["-v", f"{host}:{target}:{'ro' if read_only else 'rw'}"]
        return [*out, self.container, "--", *command]

    def init_pid(self, buildah_pid: int) -> int | None:
        """The container's first process: the child of buildah's chroot helper in buildah's group."""
        table = process_table()
        for pid, (comm, ppid, pgid) in table.items():
            parent = table.get(ppid)
            if (
                pgid == buildah_pid
                and parent
                and parent[0].startswith("memfd:buildah")
                and not comm.startswith("memfd:buildah")
            ):
                return pid
        return None

    def cleanup(self) -> None:
        for path in reversed(self.bound):
            subprocess.run(["umount", "-l", path], check=False, capture_output=True)
        self.bound.clear()
        if self.container:
            with contextlib.suppress(Exception):
                buildah("umount", self.container, check=False)
                buildah("rm", self.container, check=False)
            self.container = ""
