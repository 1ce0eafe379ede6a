"""Data-parallel training: what the ranks of one job agree on, and who does what.

One process per GPU (the launcher, launch.py, starts them through torchrun), each a whole trainer
run over its share of every optimizer step's rows; transformers' Trainer wraps the model in DDP,
shards the seeded sampler's batches over the ranks and all-reduces the gradients. What this module
adds is what Trainer leaves to its user:

- decisions that must be the same on every rank or the ranks deadlock: the step split (planned
  from the smallest free GPU memory of all ranks), stopping on SIGTERM (each rank gets the signal
  at its own moment: `StepStop` all-reduces the flag at every step's end) and the timed checkpoint
  (the longest time since the last save);
- one writer: rank 0 alone writes checkpoints, progress, the summary, curves and artifacts; the
  other ranks hand it what only they have (their RNG states) and their figures (tokens, loss, GPU
  memory);
- what rank 0 fetches first (data, base model, the checkpoint to resume from) into the workdir
  the launcher gives every rank, so the others find it there instead of fetching it again, and
  rank 0's failure there reaches them instead of leaving them in a barrier.

One process (no torchrun) is a world of size 1 and every function here is then local.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from finetune_trainer.errors import ConfigError
from finetune_trainer.signals import StopRequest

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the job's ranks (torchrun's environment)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World:
        e = os.environ if env is None else env
        size = int(e.get("WORLD_SIZE", "1"))
        return cls(
            rank=int(e.get("RANK", "0")),
            local_rank=int(e.get("LOCAL_RANK", "0")),
            size=size,
            local_size=int(e.get("LOCAL_WORLD_SIZE", str(size))),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(1, self.local_size)


def resume_problem(checkpoint_world_size: int, world_size: int, step: int) -> str | None:
    """Why a checkpoint trained on `checkpoint_world_size` ranks cannot be resumed on `world_size`,
    or None.

    Refused rather than continued: the rows of an optimizer step are batchSize x
    gradientAccumulationSteps x GPUs, so other GPUs make other steps (another effective batch,
    other rows per step, the learning-rate schedule and maxSteps meaning other amounts of data):
    the resumed run would be neither the checkpoint's run nor the new spec's."""
    if checkpoint_world_size == world_size:
        return None
    return (
        f"the checkpoint at step {step} was trained on {checkpoint_world_size} rank(s) (GPUs), this pod "
        f"runs {world_size}: rows per optimizer step are batchSize x gradientAccumulationSteps x GPUs, so "
        f"resuming would change the run's effective batch mid-way. Set spec.resources.gpus back to "
        f"{checkpoint_world_size} to continue it, or start a new FineTuneJob"
    )


class Ranks:
    """The collectives the trainer uses, over torch.distributed; every call is collective (all
    ranks make it, in the same order) unless said otherwise. Size 1: local, no torch.distributed."""

    def __init__(self, world: World, device: str) -> None:
        self.world = world
        self.device = device
        self._control: Any = None

    def start(self) -> Ranks:
        """Join the process group: NCCL on GPUs (each rank its LOCAL_RANK's GPU), gloo on the CPU.
        transformers' Trainer finds the group initialised and uses it. Control messages (flags,
        objects, RNG files) go through a gloo group either way: they are small host data."""
        if self.world.size == 1:
            return self
        import torch
        import torch.distributed as dist

        if self.device == "cuda":
            torch.cuda.set_device(self.world.local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", self.world.local_rank))
            self._control = dist.new_group(backend="gloo")
        else:
            dist.init_process_group("gloo")
            self._control = dist.group.WORLD
        log.info(
            "rank %d of %d (local rank %d) joined",
            self.world.rank,
            self.world.size,
            self.world.local_rank,
            extra={"fields": {"event": "rank", "rank": self.world.rank, "worldSize": self.world.size}},
        )
        return self

    def close(self) -> None:
        """Leave the process group (local)."""
        if self.world.size == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def max_floats(self, values: list[float]) -> list[float]:
        """Each value's maximum over the ranks."""
        if self.world.size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._control)
        return tensor.tolist()

    def min_float(self, value: float) -> float:
        return -self.max_floats([-value])[0]

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values`, by rank (one all-gather)."""
        if self.world.size == 1:
            return [list(values)]
        import torch
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=torch.float64)
        out = [torch.empty_like(mine) for _ in range(self.world.size)]
        dist.all_gather(out, mine, group=self._control)
        return [t.tolist() for t in out]

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (picklable)."""
        if self.world.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.world.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]  # type: ignore[return-value]

    def gather_to_main(self, obj: T) -> list[T] | None:
        """Every rank's `obj` on rank 0 (by rank); None on the others."""
        if self.world.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world.size if self.world.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._control)
        return out

    def main_only(self, fn: Callable[[], T]) -> T:
        """`fn()` on rank 0 alone; its result (picklable) on every rank. Rank 0's failure is
        raised on every rank (the same ConfigError, so all exit 78) instead of leaving them
        waiting for a result that never comes."""
        return self._from_main(fn, share=True)

    def main_first(self, fn: Callable[[], T]) -> T:
        """`fn()` on rank 0, then on the other ranks, which find what it fetched into the shared
        workdir; a failure on rank 0 is raised everywhere, as in `main_only`."""
        if self.world.is_main:
            return self._from_main(fn, share=False)
        self._from_main(fn, share=False)  # rank 0's turn
        return fn()

    def _from_main(self, fn: Callable[[], T], *, share: bool) -> T:
        if self.world.size == 1:
            return fn()
        if self.world.is_main:
            try:
                result = fn()
            except ConfigError as e:
                self.broadcast(("config", e.field, e.message))
                raise
            except BaseException as e:
                self.broadcast(("error", "", f"{type(e).__name__}: {e}"))
                raise
            self.broadcast(("ok", "", result if share else None))
            return result
        kind, field, payload = self.broadcast(None)  # type: ignore[misc]
        if kind == "config":
            raise ConfigError(field, payload)
        if kind == "error":
            raise RuntimeError(f"rank 0 failed: {payload}")
        return payload  # type: ignore[no-any-return]


class StepStop:
    """The stop request as all ranks see it: SIGTERM reaches each rank at its own moment, so the
    flag is agreed on (the maximum over the ranks) once per optimizer step, at its end; every
    reader of the stop between two agreements (the checkpoint policy, the evaluation schedule) sees
    the same value on every rank. A rank told by a peer sets its own request too, so its grace
    budget counts from then."""

    def __init__(self, request: StopRequest, ranks: Ranks) -> None:
        self.request = request
        self.ranks = ranks
        self._agreed = request.is_set()

    def sync(self, minutes_since_save: float) -> tuple[bool, float]:
        """Collective: (whether any rank was asked to stop, the longest time since a save)."""
        stop, minutes = self.ranks.max_floats([float(self.request.is_set()), minutes_since_save])
        self._agreed = stop > 0
        if self._agreed and not self.request.is_set():
            self.request.set("peer")
            log.warning("another rank was asked to stop: checkpointing at this step")
        return self._agreed, minutes

    def is_set(self) -> bool:
        return self._agreed

    def remaining(self, grace_seconds: float, margin_seconds: float) -> float:
        return self.request.remaining(grace_seconds, margin_seconds)


def rng_file(rank: int, world_size: int) -> str:
    """The RNG state file transformers' Trainer writes for `rank` into a checkpoint."""
    return "rng_state.pth" if world_size == 1 else f"rng_state_{rank}.pth"


def collect_rng_states(ranks: Ranks, folder: Path) -> None:
    """Collective, after every rank saved checkpoint `folder`: rank 0's folder gets every rank's
    RNG state (on one node they share the folder already; on several, each node has its own)."""
    world = ranks.world
    if world.size == 1:
        return
    mine = folder / rng_file(world.rank, world.size)
    data = mine.read_bytes() if mine.is_file() else None
    gathered = ranks.gather_to_main((world.rank, data))
    if gathered is not None:
        for rank, blob in gathered:
            target = folder / rng_file(rank, world.size)
            if blob is not None and not target.is_file():
                target.write_bytes(blob)
    elif world.node_rank != 0 and world.local_rank == 0:
        # Another node's copy: rank 0 has it now (and uploads it); nothing else reads this one.
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
