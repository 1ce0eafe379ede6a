"""Launching one trainer process per GPU: `python -m finetune_trainer run` under torchrun's agent.

The container's command stays `python -m finetune_trainer run job.json`. When
FINETUNE_NPROC_PER_NODE says how many processes to start (the operator sets it to the GPUs of a
multi-GPU pod; tests set it on the CPU), this process becomes the launcher:
torch.distributed.run's elastic agent (the library under `torchrun`) starts that many ranks of
the same command, forwards SIGTERM to all of them, and waits for them. The launcher
itself trains nothing; it keeps what the operator reads from the container coherent:

- the exit code: 78 when a rank found the spec wrong, 143 when the ranks stopped on SIGTERM
  after their checkpoint, 0 when all finished, 1 otherwise (a rank killed, crashed): what one
  process would have exited with (`exit_code`);
- the summary (rank 0 writes it): when another rank is what failed, the message says which and how;
- one workdir for all ranks (the data, the base model and the checkpoint to resume from are
  fetched into it once, by rank 0).

Torchrun's own defaults are changed where they are wrong for a preemptible job: no restarts (the
Job's pod replacement resumes from the checkpoint instead, with the operator counting attempts),
and the agent waits the whole grace period for the ranks' emergency checkpoint after SIGTERM
(its default is 30 s, then SIGKILL). One node: the design for several is in docs/architecture.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer import summary
from finetune_trainer.errors import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, ConfigError

log = logging.getLogger(__name__)

ENV_NPROC = "FINETUNE_NPROC_PER_NODE"


@dataclass(frozen=True)
class Plan:
    """How many trainer processes to start in this pod."""

    nproc_per_node: int


def _positive(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(name, f"expected a positive integer, got {raw!r}")
    return value


def plan(device: str, visible_gpus: int, env: Mapping[str, str]) -> Plan | None:
    """The launch FINETUNE_NPROC_PER_NODE asks for, or None to train in this process.

    The operator sets it to spec.resources.gpus for a multi-GPU pod (the trainer ignores the
    spec's Kubernetes fields); 1 runs one rank through torchrun (the GPU benchmark times the same
    path as several). On CUDA every rank needs a GPU of its own."""
    nproc = _positive(env, ENV_NPROC)
    if nproc is None:
        return None
    if device == "cuda" and visible_gpus < nproc:
        raise ConfigError(
            "spec.resources.gpus",
            f"{nproc} processes, one per GPU, but this pod sees {visible_gpus} GPU(s)",
        )
    return Plan(nproc)


def exit_code(codes: Mapping[int, int] | None, reason: str | None) -> int:
    """The container's exit code from the ranks' exit codes (by rank; None when the launcher was
    stopped by a signal and did not get them) and rank 0's summary exitReason.

    A config error anywhere is the job's (78: the operator fails it at once); all failed ranks
    interrupted is a stop after the checkpoint (143: a new pod resumes); any other failure (a rank
    killed -9, a crash) is 1: the Job retries it against its backoffLimit."""
    if codes is None:
        return {"interrupted": EXIT_INTERRUPTED, "config-error": EXIT_CONFIG_ERROR}.get(reason or "", 1)
    failed = {rank: code for rank, code in codes.items() if code != 0}
    if not failed:
        return 0
    if EXIT_CONFIG_ERROR in failed.values():
        return EXIT_CONFIG_ERROR
    if all(code == EXIT_INTERRUPTED for code in failed.values()):
        return EXIT_INTERRUPTED
    return 1


def failure_message(codes: Mapping[int, int]) -> str | None:
    """What to tell about ranks other than 0 that ended abnormally (killed, crashed), or None."""
    import signal

    parts = []
    for rank, code in sorted(codes.items()):
        if rank == 0 or code in (0, EXIT_CONFIG_ERROR, EXIT_INTERRUPTED):
            continue
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        parts.append(f"rank {rank} {how}")
    if not parts:
        return None
    return "; ".join(parts) + ": the attempt failed; the next one resumes from the last complete checkpoint"


def run_ranks(argv: list[str], launch: Plan, grace_seconds: int) -> int:
    """Start the ranks of `python -m finetune_trainer <argv>` and wait for them; the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    temporary = None
    if not os.environ.get("FINETUNE_WORKDIR"):
        temporary = tempfile.mkdtemp(prefix="finetune-")
        os.environ["FINETUNE_WORKDIR"] = temporary
    summary_file = summary.summary_path()
    _clear(summary_file)  # what is there afterwards is this attempt's
    # torchrun --standalone: a c10d rendezvous on a free local port, this process its host.
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=launch.nproc_per_node,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        rdzv_configs={"is_host": True},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        shutdown_timeout=grace_seconds,
    )
    log.info(
        "starting %d trainer processes, one per GPU",
        launch.nproc_per_node,
        extra={"fields": {"event": "launch", "nprocPerNode": launch.nproc_per_node}},
    )
    codes: dict[int, int] | None
    try:
        elastic_launch(config, sys.executable)("-m", "finetune_trainer", *argv)
        codes = {}
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
    except SignalException as e:
        log.warning("launcher stopped by %s; the ranks were given the signal", e.sigval.name)
        codes = None
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    written = _read(summary_file)
    code = exit_code(codes, written.get("exitReason"))
    message = failure_message(codes) if codes else None
    if message is not None:
        earlier = written.get("message")
        written.update(exitReason="error", message=f"{message}; rank 0: {earlier}" if earlier else message)
        summary.write(written, summary_file)
    elif code != 0 and not written:
        summary.write({"exitReason": "error", "message": "rank 0 ended without a summary"}, summary_file)
    log.info(
        "trainer processes ended: exit %d", code, extra={"fields": {"event": "ranks-done", "codes": codes}}
    )
    return code


def _clear(path: Path) -> None:
    try:
        if path.is_file():
            path.write_text("")
    except OSError as e:
        log.warning("cannot clear the summary at %s: %s", path, e)


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text() if path.is_file() else ""
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
