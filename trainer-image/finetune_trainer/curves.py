"""Curves a person can look at: metrics.jsonl and loss.png, stored with the artifacts.

`metrics.jsonl` has one JSON object per line, in the order things happened:

    {"kind": "train", "step": 12, "loss": 1.93, "learningRate": 0.0002, "gradNorm": 0.41,
     "tokensPerSecond": 5123.0, "gpuMemoryGiB": 9.1, "epoch": 0.4, "time": "2025-...Z"}
    {"kind": "eval", "step": 12, "evalLoss": 2.05, "evalTokenAccuracy": 0.61, "time": ...}
    {"kind": "resume", "step": 8, "time": ...}          a new pod resumed from step 8's checkpoint

The file travels inside every checkpoint, so a resumed pod continues it: lines after the resumed
step (steps the previous pod trained and lost) are dropped and a resume line marks the place.
Every line also goes to the listeners (experiment tracking). `plot` draws loss.png from the file:
train and eval loss against the step, resumes as dashed lines, the best eval loss marked.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_trainer.progress import ProgressState
from finetune_trainer.timestamps import rfc3339

log = logging.getLogger(__name__)

FILE_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"

Record = dict[str, Any]


def kept_on_resume(lines: list[Record], step: int) -> list[Record]:
    """The records a pod resuming from `step` keeps: everything up to that step, in order."""
    return [r for r in lines if int(r.get("step", 0)) <= step]


def read_records(path: Path) -> list[Record]:
    """The records of a metrics.jsonl (a torn last line, from a crash mid-write, is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """metrics.jsonl being written by this pod, continued from a resumed checkpoint's copy."""

    def __init__(self, path: Path, listeners: list[Callable[[Record], None]] | None = None) -> None:
        self.path = path
        self.listeners = list(listeners or [])
        self.records: list[Record] = []

    def start(self, resumed_from: Path | None, step: int | None) -> None:
        """Begin the file: empty, or the resumed checkpoint's records up to `step` and a resume line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        earlier = resumed_from / FILE_NAME if resumed_from is not None else None
        self.records = (
            kept_on_resume(read_records(earlier), step or 0) if earlier and earlier.is_file() else []
        )
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        if step is not None:
            self.add({"kind": "resume", "step": step})

    def add(self, record: Record) -> None:
        record = {**record, "time": record.get("time") or rfc3339(digits=6)}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for listener in self.listeners:
            try:
                listener(record)
            except Exception as e:  # tracking must never stop training
                log.warning("metrics listener failed: %s", e)

    def copy_into(self, folder: Path) -> None:
        """Put the file into a checkpoint folder about to be uploaded."""
        shutil.copyfile(self.path, folder / FILE_NAME)


class CurvesCallback:
    """Writes a train record per logging step (figures of the progress state, which the progress
    callback before it has just updated, plus transformers' grad norm) and an eval record per
    evaluation."""

    def __init__(self, metrics: MetricsLog, progress: ProgressState) -> None:
        self.metrics = metrics
        self.progress = progress

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any
    ) -> None:
        if not logs:
            return
        if "loss" in logs:
            now = self.progress.snapshot()
            self.metrics.add(
                {
                    "kind": "train",
                    "step": state.global_step,
                    "loss": now["loss"],
                    "learningRate": logs.get("learning_rate"),
                    "gradNorm": logs.get("grad_norm"),
                    "tokensPerSecond": now["tokensPerSecond"],
                    "gpuMemoryGiB": now["gpuMemoryGiB"],
                    "epoch": state.epoch,
                }
            )
        if "eval_loss" in logs:
            self.metrics.add(
                {
                    "kind": "eval",
                    "step": state.global_step,
                    "evalLoss": logs["eval_loss"],
                    "evalTokenAccuracy": logs.get("eval_mean_token_accuracy"),
                    "evalSeconds": logs.get("eval_runtime"),
                }
            )


def plot(records: list[Record], out: Path, title: str) -> Path:
    """Draw loss.png: train loss and eval loss against the optimizer step, resumes as dashed
    vertical lines, the best eval loss as a star. Drawn with matplotlib's Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = _series(records, "train", "loss")
    evals = _series(records, "eval", "evalLoss")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", linewidth=1.2, label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), color="tab:orange", marker="o", markersize=4, label="eval loss")
        best = min(evals, key=lambda p: p[1])
        ax.plot(
            *best,
            marker="*",
            markersize=14,
            color="tab:red",
            linestyle="none",
            label=f"best eval {best[1]:.4f} (step {best[0]})",
        )
    for n, record in enumerate(r for r in records if r.get("kind") == "resume"):
        ax.axvline(
            record["step"],
            color="grey",
            linestyle="--",
            linewidth=1,
            label="resumed from a checkpoint" if n == 0 else None,
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _series(records: list[Record], kind: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of `kind` records, the last value per step (a step trained again after a resume
    shows once, as trained by the pod that went on)."""
    values: dict[int, float] = {}
    for r in records:
        if r.get("kind") == kind and isinstance(r.get(key), int | float):
            values[int(r["step"])] = float(r[key])
    return sorted(values.items())
