"""The training loop: TRL's SFTTrainer with the spec's knobs, plus callbacks for the checkpoint
policy (every N steps / M minutes, on SIGTERM, at the end), progress, and real token counts.

Checkpoints are ordinary HF Trainer checkpoints of the PEFT model (the same on both engines). Each
one is handed to the CheckpointUploader as soon as it is written and the local copy is deleted;
resuming is `trainer.train(resume_from_checkpoint=...)`, which restores optimizer, scheduler, RNG
states and the data position, so the resumed steps repeat the uninterrupted run's.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from finetune_trainer.batching import BatchPlan
from finetune_trainer.distributed import Ranks, StepStop, World, collect_rng_states
from finetune_trainer.engines import cpu
from finetune_trainer.evaluation import record_accuracy
from finetune_trainer.memory import peak_gpu_memory_gib
from finetune_trainer.progress import Metrics, ProgressState
from finetune_trainer.spec import TrainingSpec

log = logging.getLogger(__name__)


def checkpoint_decision(
    step: int,
    max_steps: int,
    *,
    every_steps: int | None,
    every_minutes: float | None,
    minutes_since_save: float,
    stop_requested: bool,
) -> tuple[bool, bool]:
    """(save, stop) at the end of optimizer step `step`.

    Stop requested: save and stop. The last step: save (a pod that dies during export resumes at
    the end instead of retraining). Otherwise save every `every_steps` steps or when
    `every_minutes` have passed since the last save.
    """
    if stop_requested:
        return True, True
    if max_steps > 0 and step >= max_steps:
        return True, False
    if every_steps is not None and step % every_steps == 0:
        return True, False
    return every_minutes is not None and minutes_since_save >= every_minutes, False


def resolve_precision(precision: str, device: str, bf16_supported: bool) -> str:
    """`auto` -> bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device != "cuda":
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


class StepMeter:
    """Per-optimizer-step sums of this rank's real tokens and loss, fed from `training_step`.

    Tensors are summed on their device and read once per step, so counting adds no GPU sync per
    micro-batch. Tokens are non-padding tokens (the attention mask's sum), never batch x length.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: Any = 0
        self._loss: Any = 0.0

    def add_batch(self, inputs: dict[str, Any]) -> None:
        mask = inputs.get("attention_mask")
        if mask is not None:
            count = mask.sum()
        else:  # padding-free batches have no padding and no mask
            ids = inputs.get("input_ids")
            count = ids.numel() if ids is not None else 0
        with self._lock:
            self._tokens = self._tokens + count

    def add_loss(self, loss: Any) -> None:
        with self._lock:
            self._loss = self._loss + loss.detach()

    def take(self) -> tuple[int, float]:
        """(tokens, summed loss) since the last call; the loss sum is what HF logs as `loss`."""
        with self._lock:
            tokens, loss = self._tokens, self._loss
            self._tokens, self._loss = 0, 0.0
        tokens = int(tokens.item() if hasattr(tokens, "item") else tokens)
        return tokens, float(loss.item() if hasattr(loss, "item") else loss)


@dataclass
class TrainOutcome:
    interrupted: bool
    steps: int
    total_steps: int
    final_loss: float | None
    tokens: int
    train_seconds: float
    stop_reason: str | None = None
    """Why training ended before its last step without being asked to (early stopping)."""
    diverged: str | None = None
    """Why training was stopped as diverged (DivergenceCallback), else None."""


def sft_config(spec: TrainingSpec, plan: BatchPlan, device: str, output_dir: Path, precision: str) -> Any:
    """TRL's SFTConfig for the job. Saving is driven by CheckpointCallback, never by a strategy."""
    from trl import SFTConfig

    t = spec.training
    max_steps = t.resolved_max_steps
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        warmup_steps=t.warmup_steps,
        max_steps=max_steps if max_steps is not None else -1,
        num_train_epochs=t.epochs if t.epochs is not None else 1.0,
        learning_rate=t.learning_rate,
        optim=t.optimizer if device == "cuda" else cpu.optimizer(t.optimizer),
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        seed=t.seed,
        data_seed=t.seed,
        max_grad_norm=t.max_grad_norm,
        # With several ranks every LoRA weight gets a gradient at every step; looking for unused
        # ones costs a graph traversal per step and breaks with activation checkpointing.
        ddp_find_unused_parameters=False,
        logging_steps=t.logging_steps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device != "cuda",
        packing=t.packing,
        max_length=spec.model.max_seq_length,
        # The engines turn activation checkpointing on themselves (Unsloth's offloaded variant on CUDA).
        gradient_checkpointing=False,
        save_strategy="no",
        # Evaluation is triggered by EvaluationCallback; only the loss is computed (returning the
        # logits would gather batch x length x vocabulary floats per row, tens of GiB on an 8B model).
        per_device_eval_batch_size=plan.batch_size,
        prediction_loss_only=True,
        # Tracking is finetune_trainer.tracking's (one run across pods, the spec as parameters).
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


class _Callback:
    """TrainerCallback's interface without importing transformers at module import (Unsloth must be
    imported first on CUDA): events a subclass does not handle are no-ops."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return _ignore
        raise AttributeError(name)


def _ignore(*_: Any, **__: Any) -> None:
    return None


class CheckpointCallback(_Callback):
    """Applies the checkpoint policy and hands each saved checkpoint to the uploader."""

    def __init__(
        self,
        spec: TrainingSpec,
        *,
        stop: StepStop,
        ranks: Ranks,
        uploader: Any,
        meter_state: dict[str, Any],
        facts: Callable[[int], dict[str, Any]] = lambda step: {},
        add_files: Callable[[Path], None] = lambda folder: None,
    ) -> None:
        self.policy = spec.checkpoint
        self.stop = stop
        self.ranks = ranks
        self.uploader = uploader
        self.meter_state = meter_state
        self.facts = facts
        """Extra facts for the checkpoint's manifest (its eval loss), by step."""
        self.add_files = add_files
        """Puts extra files into a checkpoint folder before it is uploaded (metrics.jsonl)."""
        self.last_save = time.monotonic()
        self.saved: list[int] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.last_save = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        # Every rank must decide alike (saving and stopping are collective): the stop request and
        # the time since the last save are agreed on first.
        stop_requested, minutes = self.stop.sync((time.monotonic() - self.last_save) / 60.0)
        save, halt = checkpoint_decision(
            state.global_step,
            state.max_steps,
            every_steps=self.policy.every_steps,
            every_minutes=self.policy.every_minutes,
            minutes_since_save=minutes,
            stop_requested=stop_requested,
        )
        control.should_save = control.should_save or save
        control.should_training_stop = control.should_training_stop or halt

    def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        collect_rng_states(self.ranks, folder)  # every rank has saved its part by now
        self.last_save = time.monotonic()
        if not self.ranks.world.is_main:
            return  # rank 0 writes the checkpoint (adapter, optimizer, every rank's RNG, manifest)
        if not folder.is_dir():
            log.error("checkpoint folder %s was not written; not uploaded", folder)
            return
        self.add_files(folder)
        self.uploader.submit(
            state.global_step,
            folder,
            state={
                "globalStep": state.global_step,
                "epoch": state.epoch,
                "loss": self.meter_state.get("loss"),
                # Resuming on another number of ranks would change the steps (distributed.py).
                "worldSize": self.ranks.world.size,
                **self.facts(state.global_step),
            },
        )
        shutil.rmtree(folder, ignore_errors=True)  # staged by the uploader; no local copy kept
        self.saved.append(state.global_step)
        log.info("checkpoint at step %d saved, uploading in the background", state.global_step)


class ProgressCallback(_Callback):
    """Step, loss, learning rate, tokens/s and ETA: into ProgressState, and out as a tqdm bar on a
    terminal or one JSON log line per logging step otherwise. With several ranks the figures are
    the job's: tokens summed over the ranks, the loss of the whole step, each rank's GPU memory
    (one all-gather per step); rank 0 alone logs them."""

    def __init__(
        self,
        progress: ProgressState,
        meter: StepMeter,
        json_lines: bool,
        device: str,
        metrics: Metrics,
        *,
        ranks: Ranks,
    ) -> None:
        self.progress = progress
        self.meter = meter
        self.ranks = ranks
        self.total_tokens = 0
        self.json_lines = json_lines
        self.device = device
        self.metrics = metrics
        self.meter_state: dict[str, Any] = {}
        self.bar: Any = None
        self.first_step: int = 0
        self.started = time.monotonic()
        self.window_tokens = 0
        self.window_start = time.monotonic()
        self.window_loss = 0.0
        self.window_steps = 0
        self.step_loss = 0.0
        """The latest optimizer step's loss (DivergenceCallback reads it)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.first_step = state.global_step
        self.started = self.window_start = time.monotonic()
        self.progress.update(phase="Training", total_steps=state.max_steps, step=state.global_step)
        if not self.json_lines and self.ranks.world.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", file=sys.stderr)

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        tokens, loss = self.meter.take()
        memory = peak_gpu_memory_gib(self.device)
        per_rank = self.ranks.gather_floats([tokens, loss, memory if memory is not None else -1.0])
        tokens = int(sum(r[0] for r in per_rank))
        # Each rank's loss is normalised by the whole step's tokens and scaled by the number of
        # ranks (DDP averages gradients): their mean is the step's loss, as on one GPU.
        loss = sum(r[1] for r in per_rank) / len(per_rank)
        self.step_loss = loss
        memories = [round(r[2], 2) for r in per_rank] if memory is not None else None
        self.total_tokens += tokens
        self.window_tokens += tokens
        self.window_loss += loss
        self.window_steps += 1
        done = state.global_step - self.first_step
        per_step = (time.monotonic() - self.started) / max(1, done)
        self.progress.update(
            step=state.global_step,
            tokens=self.total_tokens,
            eta_seconds=round(per_step * max(0, state.max_steps - state.global_step), 1),
            gpu_memory_gib=max(memories) if memories else None,
            gpu_memory_per_rank_gib=memories if memories and len(memories) > 1 else None,
        )
        if self.bar is not None:
            self.bar.update(1)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any
    ) -> None:
        if not logs or "loss" not in logs or self.window_steps == 0:
            return
        elapsed = max(1e-9, time.monotonic() - self.window_start)
        loss = self.window_loss / self.window_steps
        tokens_per_second = round(self.window_tokens / elapsed, 1)
        if math.isfinite(loss):
            self.meter_state["loss"] = loss  # the checkpoints' and the summary's loss: the last finite one
        self.progress.update(
            loss=loss if math.isfinite(loss) else None,
            diverged=not math.isfinite(loss),
            learning_rate=logs.get("learning_rate"),
            tokens_per_second=tokens_per_second,
        )
        snapshot = self.progress.snapshot()
        self.metrics.observe(snapshot)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:.0f}")
        else:
            log.info(
                "progress",
                extra={
                    "fields": {
                        "event": "progress",
                        "step": state.global_step,
                        "total": state.max_steps,
                        "loss": loss,
                        "lr": logs.get("learning_rate"),
                        "gradNorm": logs.get("grad_norm"),
                        "epoch": state.epoch,
                        "tokens": self.total_tokens,
                        "tokensPerSecond": tokens_per_second,
                        "etaSeconds": snapshot["etaSeconds"],
                        "gpuMemoryGiB": snapshot["gpuMemoryGiB"],
                    }
                },
            )
        self.window_tokens, self.window_loss, self.window_steps = 0, 0.0, 0
        self.window_start = time.monotonic()

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.bar is not None:
            self.bar.close()


class DivergenceCallback(_Callback):
    """Stops training once `limit` optimizer steps in a row had a NaN or infinite loss, and never
    lets such a step be checkpointed (its weights are most likely not finite either). Runs after
    CheckpointCallback, whose decision to save it can veto; reads the step's loss from
    ProgressCallback, which runs first."""

    def __init__(self, progress_cb: ProgressCallback, progress: ProgressState, limit: int) -> None:
        self.progress_cb = progress_cb
        self.progress = progress
        self.limit = limit
        self.in_a_row = 0
        self.first_step: int | None = None
        self.last_finite: tuple[int, float] | None = None
        self.reason: str | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        loss = self.progress_cb.step_loss
        if math.isfinite(loss):
            self.in_a_row, self.first_step = 0, None
            self.last_finite = (state.global_step, loss)
            self.progress.update(diverged=False)
            return
        self.in_a_row += 1
        self.first_step = self.first_step if self.first_step is not None else state.global_step
        self.progress.update(diverged=True, loss=None)
        control.should_save = False
        log.warning("step %d: the loss is %s (%d in a row)", state.global_step, loss, self.in_a_row)
        if self.in_a_row >= self.limit:
            last = (
                f"; the last finite loss was {self.last_finite[1]:.4f} at step {self.last_finite[0]}"
                if self.last_finite
                else ""
            )
            self.reason = (
                f"training diverged: the loss was NaN or infinite for {self.in_a_row} steps in a row "
                f"(steps {self.first_step}-{state.global_step}{last}); lower spec.training.learningRate, "
                "keep spec.training.maxGradNorm above 0, or check the data "
                "(spec.training.maxNonFiniteSteps sets how many such steps are tolerated)"
            )
            control.should_training_stop = True


def adapters_to_fp32(model: Any) -> int:
    """Keep the trainable (LoRA) weights in fp32; returns how many were cast.

    TRL's SFTTrainer casts a quantized model's adapters to bf16 when it is built, but resuming loads
    the checkpoint's adapter through PEFT, which upcasts it to fp32: a resumed run would then train
    other weights than the uninterrupted one. fp32 on both sides makes resume exact; the adapters
    are small (~42M parameters for r16 on an 8B model), and Unsloth keeps them in fp32 too.
    """
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
            cast += 1
    return cast


def train(
    spec: TrainingSpec,
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    plan: BatchPlan,
    device: str,
    output_dir: Path,
    uploader: Any,
    stop: StepStop,
    progress: ProgressState,
    metrics: Metrics,
    json_lines: bool,
    resume_dir: Path | None,
    before_micro_batch: Callable[[int], None] | None = None,
    eval_dataset: Any = None,
    evaluation: Any = None,
    observers: tuple[Any, ...] = (),
    checkpoint_files: Callable[[Path], None] = lambda folder: None,
    ranks: Ranks | None = None,
) -> TrainOutcome:
    """Run SFTTrainer to the end or until `stop` is set; the last checkpoint is submitted either way.

    `before_micro_batch(tokens)` runs before each micro-batch's forward pass with the micro-batch's
    size in tokens (padding included): the CUDA engine's activation plan (engines.cuda). With
    `eval_dataset`, `evaluation` (an evaluation.EvaluationCallback) schedules evaluations and may
    stop early; `observers` are further callbacks (curves, tracking); `checkpoint_files` adds files
    to each checkpoint before upload. `ranks`: this process's place among several data-parallel
    ranks (each trains its share of every step's rows; `stop` must be over the same ranks)."""
    import torch
    from transformers import PrinterCallback, Trainer
    from transformers import ProgressCallback as HFProgressCallback
    from trl import SFTTrainer  # after the engine: Unsloth patches TRL when it is imported

    bf16_ok = device == "cuda" and torch.cuda.is_bf16_supported()
    precision = resolve_precision(spec.training.precision, device, bf16_ok)
    ranks = ranks or Ranks(World(), device)
    args = sft_config(spec, plan, device, output_dir, precision)
    meter = StepMeter()

    class MeteredSFTTrainer(SFTTrainer):
        """SFTTrainer that counts each micro-batch's real tokens and loss as it trains on it."""

        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            meter.add_batch(inputs)
            if before_micro_batch is not None:
                ids = inputs.get("input_ids")
                before_micro_batch(ids.numel() if ids is not None else 0)  # shape only: no GPU sync
            loss = super().training_step(model, inputs, *rest, **kw)
            meter.add_loss(loss)
            return loss

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            # With several ranks transformers maps the optimizer state onto args.device, which on
            # the CPU is `cpu:<rank>`, a location torch.load cannot restore to; on the CPU every
            # rank's state belongs in plain host memory anyway.
            folder = Path(checkpoint) if checkpoint else None
            if device == "cuda" or ranks.world.size == 1 or folder is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            if (folder / "optimizer.pt").is_file() and (folder / "scheduler.pt").is_file():
                load = partial(torch.load, map_location="cpu", weights_only=True)
                self.optimizer.load_state_dict(load(folder / "optimizer.pt"))
                self.lr_scheduler.load_state_dict(load(folder / "scheduler.pt"))
            return None

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            # TRL 1.15 computes the loss through a fused LM head whose kernels are Triton, GPU only.
            # On the CPU the model's own causal-LM loss is the same sum of token NLLs over
            # num_items_in_batch; TRL's extra metrics (entropy, token accuracy) are skipped in
            # training, and the token accuracy is computed from the logits when evaluating.
            kw = {"num_items_in_batch": num_items_in_batch}
            if device == "cuda":
                return super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
            if self.model.training or "labels" not in inputs:
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, **kw)
            loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True, **kw)
            record_accuracy(self._metrics["eval"], outputs.logits, inputs["labels"])
            return (loss, outputs) if return_outputs else loss

    progress_cb = ProgressCallback(progress, meter, json_lines, device, metrics, ranks=ranks)
    checkpoint_cb = CheckpointCallback(
        spec,
        stop=stop,
        ranks=ranks,
        uploader=uploader,
        meter_state=progress_cb.meter_state,
        facts=evaluation.checkpoint_facts if evaluation is not None else (lambda step: {}),
        add_files=checkpoint_files,
    )
    divergence_cb = DivergenceCallback(progress_cb, progress, spec.training.max_non_finite_steps)
    # Order matters: the divergence callback reads the progress callback's loss and vetoes the
    # checkpoint callback's decision to save; the evaluation callback reads that decision.
    callbacks = [
        progress_cb,
        checkpoint_cb,
        divergence_cb,
        *([evaluation] if evaluation is not None else []),
        *observers,
    ]
    args.eval_on_start = evaluation is not None and resume_dir is None  # the base model's eval loss

    trainer = MeteredSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset if evaluation is not None else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    adapters_to_fp32(trainer.model)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(HFProgressCallback)
    log.info(
        "training: %s, precision %s, batch %d x accumulation %d (%s)",
        device,
        precision,
        plan.batch_size,
        plan.gradient_accumulation_steps,
        "microBatches: " + spec.training.micro_batches,
    )
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    seconds = time.monotonic() - started
    state = trainer.state
    return TrainOutcome(
        interrupted=stop.is_set() and state.global_step < state.max_steps,
        steps=state.global_step,
        total_steps=state.max_steps,
        final_loss=progress_cb.meter_state.get("loss"),
        tokens=progress_cb.total_tokens,
        train_seconds=seconds,
        stop_reason=evaluation.reason if evaluation is not None else None,
        diverged=divergence_cb.reason,
    )
