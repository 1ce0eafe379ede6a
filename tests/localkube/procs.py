"""Child processes with a log file each, in their own process group so that stopping one also
stops whatever it started."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (even by SIGKILL), so a killed test
    run leaves no API server behind. Tied to the thread that forks: start processes from the
    main thread."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class Process:
    """A started command; its stdout and stderr go to `log`."""

    def __init__(
        self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            out.write(f"$ {' '.join(map(str, argv))}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [str(a) for a in argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - started before any thread forks
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM to the process group, then SIGKILL after `grace` seconds (kube-apiserver waits
        for its watches longer than a test run is worth: its data is thrown away anyway)."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.popen.poll()


def wait_for(what: str, ready: Callable[[], bool], timeout: float, watch: Sequence[Process] = ()) -> float:
    """Poll `ready` until true; fail early, with its log tail, if a watched process exits.
    Returns the seconds waited."""
    start = time.monotonic()
    while True:
        for proc in watch:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}; "
                    f"log {proc.log}:\n{tail(proc.log)}"
                )
        try:
            if ready():
                return time.monotonic() - start
        except Exception:  # not up yet: connection refused, 500, ...
            pass
        if time.monotonic() - start > timeout:
            logs = "\n".join(f"  {p.name}: {p.log}" for p in watch)
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s; logs:\n{logs}")
        time.sleep(0.2)


def in_ci() -> bool:
    """Whether CI is set: a component `make test` builds first is then required, not skipped."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
