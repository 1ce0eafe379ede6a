"""Evaluation on the validation rows: when it runs, what its results mean, early stopping.

Evaluation itself is transformers' (`Trainer.evaluate`: eval mode, no gradients, the same collator
and precision as training); `eval_loss` is its mean over the evaluated rows of each batch's mean
token loss. Token accuracy is the share of next tokens the model ranks first: TRL's
`mean_token_accuracy` on CUDA, the same figure from the logits on the CPU (`record_accuracy`).

The decisions (`trend`, `stop_reason`) are pure functions of the evaluations so far. They are
rebuilt on a resumed pod from the checkpoint's `log_history` (transformers stores every logged
evaluation in trainer_state.json), so patience and the best eval loss survive preemption.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune_trainer.progress import ProgressState
from finetune_trainer.signals import StopRequest
from finetune_trainer.spec import EvaluationSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPoint:
    step: int
    loss: float
    token_accuracy: float | None = None


@dataclass(frozen=True)
class Trend:
    best: EvalPoint | None
    """The evaluation with the lowest loss (the first of equal ones)."""
    since_best: int
    """Evaluations after the best that did not improve on it by more than min_delta."""
    improved: bool
    """Whether the newest evaluation is the best."""


def trend(points: list[EvalPoint], min_delta: float = 0.0) -> Trend:
    """Best eval loss so far and how many evaluations since have not improved on it."""
    best: EvalPoint | None = None
    since, improved = 0, False
    for point in points:
        improved = best is None or point.loss < best.loss - min_delta
        if improved:
            best, since = point, 0
        else:
            since += 1
    return Trend(best, since, improved)


def stop_reason(points: list[EvalPoint], spec: EvaluationSpec) -> str | None:
    """Why training should stop early, or None (always None without earlyStopping)."""
    if not spec.early_stopping or not points:
        return None
    t = trend(points, spec.min_delta)
    if t.best is None or t.since_best < spec.patience:
        return None
    now = points[-1]
    return (
        f"stopped early at step {now.step}: eval loss did not improve for {t.since_best} evaluations "
        f"(best {t.best.loss:.4f} at step {t.best.step}, now {now.loss:.4f})"
    )


def points_from_history(log_history: list[dict[str, Any]]) -> list[EvalPoint]:
    """The evaluations transformers logged (trainer_state.json's log_history), oldest first."""
    return [
        EvalPoint(int(entry["step"]), float(entry["eval_loss"]), entry.get("eval_mean_token_accuracy"))
        for entry in log_history
        if "eval_loss" in entry and "step" in entry
    ]


def should_evaluate(
    step: int, max_steps: int, *, every_steps: int | None, saving: bool, stop_requested: bool
) -> bool:
    """Evaluate at the end of optimizer step `step`? At every checkpoint (so each one carries its
    eval loss), every `every_steps` steps, at the last step; never when stopping on SIGTERM."""
    if stop_requested:
        return False
    if saving or (max_steps > 0 and step >= max_steps):
        return True
    return every_steps is not None and step % every_steps == 0


def record_accuracy(metrics: dict[str, list[float]], logits: Any, labels: Any) -> None:
    """Append one batch's next-token accuracy to TRL's metric buffer, as TRL's fused LM head does
    on CUDA (labels are shifted by one; -100 marks positions without a target)."""
    import torch

    with torch.no_grad():
        predicted = logits[:, :-1, :].argmax(dim=-1)
        target = labels[:, 1:].to(predicted.device)
        mask = target != -100
        valid = int(mask.sum())
        correct = int(((predicted == target) & mask).sum())
    metrics["mean_token_accuracy"].append(correct / valid if valid else 0.0)


class _Callback:
    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return _ignore
        raise AttributeError(name)


def _ignore(*_: Any, **__: Any) -> None:
    return None


class EvaluationCallback(_Callback):
    """Schedules evaluations, keeps their history, reports them, and stops training early.

    Placed after the checkpoint callback, which decides `should_save` in `on_step_end` first: every
    checkpoint is evaluated, and the eval loss reaches the checkpoint's manifest through
    `checkpoint_facts` (transformers evaluates before it saves). An early stop saves a checkpoint
    at that step, which records the reason, so a pod that resumes from it does not train on."""

    def __init__(
        self,
        spec: EvaluationSpec,
        *,
        stop: StopRequest,
        progress: ProgressState,
        on_point: Callable[[EvalPoint], None] = lambda point: None,
    ) -> None:
        self.spec = spec
        self.stop = stop
        self.progress = progress
        self.on_point = on_point
        self.points: list[EvalPoint] = []
        self.reason: str | None = None

    def checkpoint_facts(self, step: int) -> dict[str, Any]:
        """What the checkpoint of `step` records: its eval loss and accuracy, the early stop."""
        facts: dict[str, Any] = {}
        if self.points and self.points[-1].step == step:
            facts["evalLoss"] = self.points[-1].loss
            facts["evalTokenAccuracy"] = self.points[-1].token_accuracy
        if self.reason is not None:
            facts["stopReason"] = self.reason
        return facts

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.points = points_from_history(state.log_history)
        if self.points:
            self._report()

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if should_evaluate(
            state.global_step,
            state.max_steps,
            every_steps=self.spec.every_steps,
            saving=bool(control.should_save),
            stop_requested=self.stop.is_set(),
        ):
            control.should_evaluate = True

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **_: Any
    ) -> None:
        if not metrics or "eval_loss" not in metrics:
            return
        point = EvalPoint(
            state.global_step, float(metrics["eval_loss"]), metrics.get("eval_mean_token_accuracy")
        )
        self.points.append(point)
        t = self._report()
        log.info(
            "eval loss %.4f at step %d",
            point.loss,
            point.step,
            extra={
                "fields": {
                    "event": "eval",
                    "step": point.step,
                    "evalLoss": point.loss,
                    "evalTokenAccuracy": point.token_accuracy,
                    "evalSeconds": metrics.get("eval_runtime"),
                    "bestEvalLoss": t.best.loss if t.best else None,
                    "evalsSinceBest": t.since_best,
                }
            },
        )
        self.on_point(point)
        reason = stop_reason(self.points, self.spec)
        if reason is not None and point.step > 0 and self.reason is None:
            self.reason = reason
            log.info(reason, extra={"fields": {"event": "early-stop", "step": point.step}})
            control.should_training_stop = True
            control.should_save = True

    def _report(self) -> Trend:
        t = trend(self.points, self.spec.min_delta)
        newest = self.points[-1]
        self.progress.update(
            eval_loss=newest.loss,
            eval_token_accuracy=newest.token_accuracy,
            eval_step=newest.step,
            evals_since_best=t.since_best,
            best_eval_loss=t.best.loss if t.best else None,
            best_eval_step=t.best.step if t.best else None,
        )
        return t
