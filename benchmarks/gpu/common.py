"""Shared pieces of the GPU benchmark: data loading, token counting, timing, MFU."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

H100_BF16_DENSE_FLOPS = 989e12
"""H100 SXM dense bf16 tensor-core peak (datasheet), the MFU denominator."""
WARMUP_STEPS = 3
"""Optimizer steps left out of the steady-state window (allocator growth, autotuning, first launches)."""


def mfu_pct(params: int, tokens_per_second: float) -> float:
    """6 x parameters x real tokens/s over 989 TFLOP/s. `params` is the whole model (embeddings and
    output head included), as the recipe counts it; LoRA's own FLOPs and recomputation are not credited."""
    return round(100 * 6 * params * tokens_per_second / H100_BF16_DENSE_FLOPS, 2)


def real_tokens(inputs: dict[str, Any]) -> Any:
    """Non-padding tokens of one micro-batch: the attention mask's sum, or every token of a
    padding-free batch (one row of concatenated sequences, no mask). A tensor: no GPU sync here."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.sum()
    return inputs["input_ids"].numel()


@dataclass
class Result:
    """One measured configuration."""

    engine: str
    shape: str
    data: str
    batch: int
    accumulation: int
    attention: str
    steps: int
    tokens_per_second: float = 0.0
    mfu_pct: float = 0.0
    peak_reserved_gib: float = 0.0
    peak_allocated_gib: float | None = 0.0
    """None where the process reports only reserved memory (our trainer's summary)."""
    tokens_per_step: float = 0.0
    seconds_per_step: float = 0.0
    time_to_first_step_s: float | None = None
    losses: list[float] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def steady_state(step_times: list[float], step_tokens: list[int]) -> tuple[float, float, float]:
    """(tokens/s, tokens per step, seconds per step) over the steps after WARMUP_STEPS.

    `step_times[i]` is the wall time at the end of optimizer step i+1 (device synchronised)."""
    if len(step_times) <= WARMUP_STEPS + 1:
        raise ValueError(f"need more than {WARMUP_STEPS + 1} steps, got {len(step_times)}")
    window = step_times[-1] - step_times[WARMUP_STEPS - 1]
    tokens = sum(step_tokens[WARMUP_STEPS:])
    steps = len(step_times) - WARMUP_STEPS
    return tokens / window, tokens / steps, window / steps


def load_rows(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def now() -> float:
    return time.monotonic()


def append_results(path: Path, results: list[Result]) -> None:
    """Add results to a JSON list file (several processes write one after another)."""
    existing = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(existing + [r.as_dict() for r in results], indent=1))


class Recorder:
    """Wall time, real tokens and loss of every optimizer step of one training run; optionally a
    torch.profiler table of the steps after `profile_from` (left out of the figures by the caller)."""

    def __init__(self, profile_from: int | None = None, profile_path: Path | None = None) -> None:
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self.losses: list[float] = []
        self.pending: list[Any] = []
        self.profile_from = profile_from
        self.profile_path = profile_path
        self.profiler: Any = None

    def add_batch(self, inputs: dict[str, Any]) -> None:
        self.pending.append(real_tokens(inputs))

    def step_end(self, step: int) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_times.append(time.monotonic())
        self.step_tokens.append(int(sum(int(t) for t in self.pending)))
        self.pending.clear()
        if self.profile_from is None or self.profile_path is None:
            return
        if step == self.profile_from:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        elif self.profiler is not None and step == self.profile_from + PROFILED_STEPS:
            self.profiler.__exit__(None, None, None)
            table = self.profiler.key_averages().table(sort_by="cuda_time_total", row_limit=30)
            self.profile_path.write_text(table)
            self.profiler = None

    def log(self, logs: dict[str, Any] | None) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


PROFILED_STEPS = 2
"""Steps recorded under torch.profiler after the measured ones."""


def callback(recorder: Recorder) -> Any:
    """A transformers TrainerCallback feeding `recorder` (imported late: Unsloth must come first)."""
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            recorder.step_end(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            recorder.log(logs)

    return Steps()


def metered(trainer_class: type, recorder: Recorder) -> type:
    """`trainer_class` counting each micro-batch's real tokens into `recorder`."""

    class Metered(trainer_class):  # type: ignore[misc, valid-type]
        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            recorder.add_batch(inputs)
            return super().training_step(model, inputs, *rest, **kw)

    return Metered
