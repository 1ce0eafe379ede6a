"""`run`: preflight, engine, resume, train, export, summary; returns the process exit code.

Exit codes: 0 done; EXIT_CONFIG_ERROR (78) the spec or data is wrong (the operator fails the Job
at once); EXIT_INTERRUPTED (143) stopped by SIGTERM after checkpointing (a new pod resumes); 1 any
other error (the Job's backoffLimit retries it).
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer import artifacts as art
from finetune_trainer import (
    batching,
    checkpoints,
    curves,
    distributed,
    engines,
    memory,
    preflight,
    samples,
    summary,
    tracking,
)
from finetune_trainer.engines import cpu as cpu_engine
from finetune_trainer.errors import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, ConfigError, DivergedError
from finetune_trainer.jobfile import Job
from finetune_trainer.progress import Metrics, ProgressState, port_from_env, start_server
from finetune_trainer.report import reporter_from_env
from finetune_trainer.signals import StopRequest, grace_margin
from finetune_trainer.storage import ObjectStore, config_errors, open_store
from finetune_trainer.timestamps import rfc3339

log = logging.getLogger(__name__)

FINAL_UPLOAD_TIMEOUT = 1800.0
"""Seconds to wait for the last checkpoint's upload after a finished run."""
TRACKING_FINISH_TIMEOUT = 60.0
"""Seconds the tracker may take to flush and close its run at the end (less on SIGTERM)."""


@dataclass
class Context:
    """What the phases of a run share."""

    job: Job
    workdir: Path
    stop: StopRequest
    progress: ProgressState
    metrics: Metrics
    json_lines: bool
    poke: Callable[[], None] = lambda: None
    result: dict[str, Any] = field(default_factory=dict)
    ranks: distributed.Ranks = field(default_factory=lambda: distributed.Ranks(distributed.World(), "cpu"))
    """This process's rank among the job's (one rank: no torch.distributed)."""
    tracker: tracking.Tracker = field(default_factory=tracking.Tracker)
    tracked_files: list[Path] = field(default_factory=list)
    """Files attached to the tracking run at the end (loss.png, metrics.jsonl, samples)."""


def workdir_from_env() -> tuple[Path, bool]:
    """(FINETUNE_WORKDIR or a fresh temporary folder, whether it is temporary)."""
    configured = os.environ.get("FINETUNE_WORKDIR")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix="finetune-")), True


def default_store_root(job: Job) -> Path:
    """Where a run without spec.storage.uri keeps checkpoints and artifacts: ./out/<job name>."""
    return Path.cwd() / "out" / (job.name or "job")


def run(job: Job, device_request: str = "auto", json_lines: bool = True) -> int:
    """The whole run in this process: alone, or as one rank of several (launch.py started them;
    only rank 0 serves progress, reports, writes checkpoints, the summary and the artifacts)."""
    world = distributed.World.from_env()
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story; the others warn
    workdir, temporary = workdir_from_env()
    progress, metrics, stop = ProgressState(), Metrics(), StopRequest()
    stop.install()
    server = start_server(progress, metrics, port_from_env()) if world.is_main else None
    reporter = (
        reporter_from_env(progress.snapshot, {"name": job.name, "namespace": job.namespace})
        if world.is_main
        else None
    )
    ctx = Context(
        job, workdir, stop, progress, metrics, json_lines, reporter.poke if reporter else lambda: None
    )
    ctx.ranks = distributed.Ranks(world, "cpu")
    started = time.monotonic()
    try:
        code = _run(ctx, device_request)
    except ConfigError as e:
        log.error("config error: %s", e, extra={"fields": {"field": e.field}})
        reason = "diverged" if isinstance(e, DivergedError) else "config-error"
        ctx.result.update(exitReason=reason, message=str(e))
        code = EXIT_CONFIG_ERROR
    except Exception as e:
        log.exception("training failed")
        ctx.result.update(exitReason="error", message=f"{type(e).__name__}: {e}")
        code = 1
    phase = {0: "Succeeded", EXIT_INTERRUPTED: "Interrupted"}.get(code, "Failed")
    _finish_tracking(ctx, phase.lower() if phase != "Failed" else "failed")
    progress.update(phase=phase)
    ctx.result["wallSeconds"] = round(time.monotonic() - started, 1)
    if world.is_main:
        written = summary.write(build_summary(ctx, progress.snapshot()))
        log.info("summary written to %s", written)
    ctx.ranks.close()
    if reporter is not None:
        reporter.close()
    if server is not None:
        server.close()
    stop.uninstall()
    if temporary:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


def _run(ctx: Context, device_request: str) -> int:
    spec = ctx.job.spec
    device = engines.detect_device(device_request)
    ranks = ctx.ranks = distributed.Ranks(ctx.ranks.world, device).start()
    if device == "cpu" and ranks.world.is_main:  # logged once, not by every rank
        substituted = cpu_engine.substitutions(spec)
        if substituted:
            # One string: the operator keeps the summary's scalar values in status.summary.
            ctx.result["cpuSubstitutions"] = "; ".join(substituted)
            log.warning(
                "the CPU engine runs %s",
                ctx.result["cpuSubstitutions"],
                extra={"fields": {"event": "cpu-substitutions", "substitutions": substituted}},
            )
    world = ranks.world
    ctx.progress.update(phase="Preflight", ranks=world.size)
    ctx.result["ranks"] = world.size
    started = time.monotonic()
    # Rank 0 downloads the data (and the tokenizer) into the shared workdir; the others read it.
    checked = ranks.main_first(lambda: preflight.check(spec, ctx.workdir))
    stats = checked.data.stats
    log.info(
        "preflight ok in %.1fs",
        time.monotonic() - started,
        extra={"fields": {"event": "preflight", **stats.as_dict()}},
    )
    if checked.validation_stats is not None:
        figures = checked.validation_stats.as_dict()
        log.info("validation rows", extra={"fields": {"event": "preflight-validation", **figures}})
        ctx.result["validationRows"] = figures["rowsEvaluated"]
        if figures["overlapWithTraining"]:
            log.warning(
                "%d of the validation rows equal a training row: their eval loss measures memorisation",
                figures["overlapWithTraining"],
            )
    lengths = [len(ids) for ids in checked.data.dataset["input_ids"]]
    plan = _batch_plan(spec, lengths, device, checked.model_source, ranks)
    log.info(
        "step split: %s",
        plan.reason,
        extra={
            "fields": {
                "event": "batch-plan",
                "batchSize": plan.batch_size,
                "gradientAccumulationSteps": plan.gradient_accumulation_steps,
            }
        },
    )
    ctx.progress.update(
        batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        batch_plan=plan.reason,
    )
    store = open_store(spec.storage, default_store_root(ctx.job))
    # The split is not in the fingerprint: it changes how a step is computed, not what (a pod on a
    # smaller GPU resumes the same run with more micro-batches).
    fingerprint = checkpoints.config_fingerprint(spec)
    with config_errors("spec.storage.uri"):
        # Rank 0 picks and downloads the checkpoint into the shared workdir, for every rank.
        resumed = ranks.main_only(
            lambda: checkpoints.resolve_resume(store, fingerprint, ctx.workdir / "resume")
        )
    resume_dir, resume_ref = resumed if resumed else (None, None)
    if resume_ref is not None:
        trained_on = int((resume_ref.trainer_state or {}).get("worldSize") or 1)
        problem = distributed.resume_problem(trained_on, world.size, resume_ref.step)
        if problem is not None:
            raise ConfigError("spec.resources.gpus", problem)
    if resume_ref is not None:
        log.info(
            "resuming from %s (step %d)",
            resume_ref.uri,
            resume_ref.step,
            extra={"fields": {"event": "resume", "step": resume_ref.step, "uri": resume_ref.uri}},
        )
        ctx.progress.update(resumed_from_step=resume_ref.step, checkpoint=_checkpoint_status(resume_ref))
    else:
        log.info(
            "no checkpoint of this config in %s: training from the start",
            store.uri(checkpoints.ROOT),
            extra={"fields": {"event": "resume", "step": None}},
        )
    ctx.result["resumedFromStep"] = resume_ref.step if resume_ref else None
    if resume_ref is not None:
        kept = checkpoints.list_complete(store, fingerprint)
        ctx.progress.update(**_history_fields(kept))
    if world.is_main:
        ctx.tracker = tracking.open_tracker(
            spec.tracking,
            store=store,
            workdir=ctx.workdir,
            run_name=spec.tracking.run_name or _job_label(ctx),
            params=_tracked_params(ctx, fingerprint, plan, device),
        )
    metrics_log = curves.MetricsLog(ctx.workdir / curves.FILE_NAME, listeners=[ctx.tracker.record])
    if world.is_main:
        metrics_log.start(resume_dir, resume_ref.step if resume_ref else None)
    if ranks.max_floats([float(ctx.stop.is_set())])[0]:  # all ranks stop, or none
        ctx.result["exitReason"] = "interrupted"
        return EXIT_INTERRUPTED

    ctx.progress.update(phase="Loading")
    loading = time.monotonic()
    # The 4-bit weight cache is rank 0's to fill; the other ranks quantize on load meanwhile.
    cache = {"store": store, "workdir": ctx.workdir, "stop": ctx.stop} if world.is_main else {}
    model, tokenizer = engines.load(spec, device, checked.model_source, **cache)
    activations = _activation_plan(spec, device, model, checked.model_source)
    log.info(
        "model loaded in %.1fs",
        time.monotonic() - loading,
        extra={"fields": {"event": "loaded", "seconds": round(time.monotonic() - loading, 2)}},
    )
    if spec.samples.prompts and world.is_main:
        generated = samples.record_before(spec, model, tokenizer, store)
        ctx.result["samplesBefore"] = "generated" if generated else "reused"

    def on_kept(refs: list[checkpoints.CheckpointRef]) -> None:
        ctx.progress.update(**_history_fields(refs))
        ctx.poke()

    def on_complete(ref: checkpoints.CheckpointRef, seconds: float) -> None:
        ctx.progress.update(checkpoint=_checkpoint_status(ref, seconds), checkpoint_failures=0)
        ctx.metrics.checkpoint_upload.observe(seconds)
        ctx.poke()

    def on_failed_attempt(failed_attempts: int, _error: str) -> None:
        # Status shows CheckpointsFailing from the first failed attempt, not once a checkpoint is
        # given up (minutes later with S3's retries) nor at the next step's end.
        ctx.progress.update(checkpoint_failures=failed_attempts)
        ctx.metrics.checkpoint_failures.inc()
        ctx.poke()

    uploader = checkpoints.CheckpointUploader(
        store,
        fingerprint,
        spec.checkpoint.keep_last,
        staging_dir=ctx.workdir / "staging",
        on_complete=on_complete,
        on_failed_attempt=on_failed_attempt,
        last_complete=resume_ref,
        keep_best=checked.validation is not None,
        on_kept=on_kept,
    )
    from finetune_trainer.evaluation import EvaluationCallback
    from finetune_trainer.train import TrainOutcome, train

    step_stop = distributed.StepStop(ctx.stop, ranks)
    evaluation = (
        EvaluationCallback(
            spec.evaluation, stop=step_stop, progress=ctx.progress, on_point=lambda _: ctx.poke()
        )
        if checked.validation is not None
        else None
    )
    adapter_dir = ctx.workdir / "adapter"
    try:
        stopped = (resume_ref.trainer_state or {}).get("stopReason") if resume_ref else None
        if stopped:
            # This checkpoint ended training early; the pod before this one died exporting.
            log.info("the checkpoint resumed from ended training early: %s", stopped)
            if world.is_main:
                checkpoints.download(store, resume_ref, adapter_dir, only=checkpoints.ADAPTER_FILES)
            outcome = TrainOutcome(
                interrupted=False,
                steps=resume_ref.step,
                total_steps=spec.training.resolved_max_steps or resume_ref.step,
                final_loss=(resume_ref.trainer_state or {}).get("loss"),
                tokens=0,
                train_seconds=0.0,
                stop_reason=stopped,
            )
        else:
            outcome = train(
                spec,
                model,
                tokenizer,
                checked.data.dataset,
                plan=plan,
                device=device,
                output_dir=ctx.workdir / "checkpoints",
                uploader=uploader,
                stop=step_stop,
                ranks=ranks,
                progress=ctx.progress,
                metrics=ctx.metrics,
                json_lines=ctx.json_lines,
                resume_dir=resume_dir,
                eval_dataset=checked.validation.dataset if checked.validation is not None else None,
                evaluation=evaluation,
                observers=(curves.CurvesCallback(metrics_log, ctx.progress),) if world.is_main else (),
                checkpoint_files=metrics_log.copy_into,
                before_micro_batch=activations,
            )
        if activations is not None and activations.kept_range is not None:
            low, high = activations.kept_range
            ctx.result["activationLayersKept"] = {"min": low, "max": high, "of": len(activations.layers)}
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)
        ctx.result.update(
            steps=outcome.steps,
            totalSteps=outcome.total_steps,
            finalLoss=outcome.final_loss,
            tokens=outcome.tokens,
            trainSeconds=round(outcome.train_seconds, 2),
            tokensPerSecond=round(outcome.tokens / outcome.train_seconds, 1)
            if outcome.train_seconds
            else None,
            peakGpuMemoryGiB=_peak_gpu_gib(device, ctx.progress),
            gpuMemoryPerRankGiB=ctx.progress.snapshot()["gpuMemoryPerRankGiB"],
        )
        if outcome.interrupted:
            return _interrupted(ctx, uploader)
        if outcome.diverged:
            raise DivergedError("spec.training.learningRate", outcome.diverged)
        if not world.is_main:
            return 0  # export is rank 0's
        if outcome.stop_reason:
            ctx.result["stopReason"] = outcome.stop_reason
        ctx.progress.update(phase="Exporting")
        _eval_figures(ctx, metrics_log)
        if not stopped:
            model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        _pick_adapter(ctx, store, uploader, adapter_dir, outcome.steps)
        base_dir = engines.local_model_dir(checked.model_source, spec.model.revision)
        artifacts = export_artifacts(
            spec, base_dir, adapter_dir, store, workdir=ctx.workdir / "export", device=device
        )
        # The curves after export: export's stages resume from export/state.json, these are
        # cheap to upload again from the metrics.jsonl the final checkpoint carries.
        ctx.result["artifacts"] = artifacts + _publish_curves(ctx, store, metrics_log)
        ctx.result["adapterUri"] = next((a["uri"] for a in artifacts if a["name"] == "adapter"), None)
        _publish_samples(ctx, store)
        if not uploader.wait(FINAL_UPLOAD_TIMEOUT):
            log.warning("the final checkpoint is still uploading after %.0fs", FINAL_UPLOAD_TIMEOUT)
        ctx.result["exitReason"] = "early-stopped" if outcome.stop_reason else "completed"
        log.info(
            "adapter: %s", ctx.result["adapterUri"], extra={"fields": {"event": "done", **_brief(ctx.result)}}
        )
        return 0
    finally:
        _record_checkpoint(ctx, uploader)
        uploader.close(timeout=5)


def _job_label(ctx: Context) -> str:
    """`<namespace>/<name>` of the job, its name on a workstation."""
    name = ctx.job.name or "job"
    return f"{ctx.job.namespace}/{name}" if ctx.job.namespace else name


def _tracked_params(ctx: Context, fingerprint: str, plan: batching.BatchPlan, device: str) -> dict[str, str]:
    """The run's parameters: the spec (storage left out: it names buckets, not training) and the
    facts the trainer decided."""
    doc = ctx.job.spec.model_dump(by_alias=True, mode="json", exclude_none=True, exclude={"storage"})
    facts = {
        "job": _job_label(ctx),
        "fingerprint": fingerprint,
        "device": device,
        "ranks": ctx.ranks.world.size,
        "batchSize": plan.batch_size,
        "gradientAccumulationSteps": plan.gradient_accumulation_steps,
    }
    return tracking.flatten_params(doc) | tracking.flatten_params(facts, "trainer.")


def _history_fields(refs: list[checkpoints.CheckpointRef]) -> dict[str, Any]:
    """ProgressState's checkpoint history and best checkpoint from the kept checkpoints."""
    best = checkpoints.best_by_eval_loss(refs)
    return {
        "checkpoints": checkpoints.history(refs),
        "best_checkpoint": checkpoints.history_entry(best) if best else None,
    }


def _eval_figures(ctx: Context, metrics_log: curves.MetricsLog) -> None:
    """The eval losses the summary carries: before training, at the end, the best (from
    metrics.jsonl, which holds the earlier pods' evaluations too)."""
    from finetune_trainer.evaluation import EvalPoint, trend

    points = [
        EvalPoint(int(r["step"]), float(r["evalLoss"]), r.get("evalTokenAccuracy"))
        for r in metrics_log.records
        if r.get("kind") == "eval" and isinstance(r.get("evalLoss"), int | float)
    ]
    if not points:
        return
    best = trend(points, ctx.job.spec.evaluation.min_delta).best
    first = next((p for p in points if p.step == 0), None)
    ctx.result.update(
        evalLossBefore=first.loss if first else None,
        finalEvalLoss=points[-1].loss,
        finalEvalTokenAccuracy=points[-1].token_accuracy,
        bestEvalLoss=best.loss if best else None,
        bestEvalStep=best.step if best else None,
        evaluations=len(points),
    )


def _pick_adapter(
    ctx: Context, store: ObjectStore, uploader: checkpoints.CheckpointUploader, adapter_dir: Path, last: int
) -> None:
    """Put the weights to export in `adapter_dir`: the last ones (already there) or, with
    export.fromCheckpoint best, the adapter of the checkpoint with the lowest eval loss."""
    choice = ctx.job.spec.export.from_checkpoint
    ctx.result.update(exportedFrom="last", exportedStep=last)
    if choice != "best":
        return
    # The final checkpoint may be the best: its upload must be complete to be compared.
    if not uploader.wait(FINAL_UPLOAD_TIMEOUT):
        log.warning("the final checkpoint is still uploading; choosing the best among the others")
    best = checkpoints.best_by_eval_loss(checkpoints.list_complete(store, uploader.fingerprint))
    if best is None:
        log.warning("export.fromCheckpoint best: no evaluated checkpoint; exporting the last weights")
        ctx.result["exportedFromReason"] = "no evaluated checkpoint"
        return
    ctx.result.update(
        exportedFrom="best", exportedStep=best.step, exportedEvalLoss=checkpoints.eval_loss_of(best)
    )
    if best.step != last:
        for name in checkpoints.ADAPTER_FILES:
            (adapter_dir / name).unlink(missing_ok=True)
        checkpoints.download(store, best, adapter_dir, only=checkpoints.ADAPTER_FILES)
    log.info(
        "exporting the best checkpoint: step %d, eval loss %.4f",
        best.step,
        ctx.result["exportedEvalLoss"],
        extra={"fields": {"event": "export-from", "step": best.step, "uri": best.uri}},
    )


def _publish_curves(ctx: Context, store: ObjectStore, metrics_log: curves.MetricsLog) -> list[dict[str, Any]]:
    """metrics.jsonl and loss.png into the artifacts (and to the tracking run)."""
    png = curves.plot(
        metrics_log.records, ctx.workdir / curves.PLOT_NAME, f"{_job_label(ctx)}: loss against step"
    )
    ctx.tracked_files += [png, metrics_log.path]
    return [
        art.public(
            art.upload_file(store, "metrics", f"{art.ARTIFACTS_PREFIX}{curves.FILE_NAME}", metrics_log.path)
        ),
        art.public(art.upload_file(store, "loss-plot", f"{art.ARTIFACTS_PREFIX}{curves.PLOT_NAME}", png)),
    ]


def _publish_samples(ctx: Context, store: ObjectStore) -> None:
    """The first lines of the sample answers into progress (status shows them)."""
    records = samples.load_records(store) if ctx.job.spec.samples.prompts else None
    if records:
        ctx.progress.update(samples=samples.status_lines(records))
        local = ctx.workdir / "export" / "artifacts"
        ctx.tracked_files += [p for p in (local / "samples.md", local / "samples.json") if p.is_file()]


def _finish_tracking(ctx: Context, outcome: str) -> None:
    """Close the tracking run, bounded in time (on SIGTERM within what the grace period leaves)."""
    if ctx.tracker.kind == "none":
        return
    timeout = TRACKING_FINISH_TIMEOUT
    if outcome == "interrupted":
        grace = ctx.job.spec.checkpoint.grace_period_seconds
        timeout = min(timeout, max(1.0, ctx.stop.remaining(grace, grace_margin(grace))))
    artifacts = ctx.result.get("artifacts") or []

    def finish() -> None:
        try:
            ctx.tracker.finish(outcome, artifacts, ctx.tracked_files)
        except Exception as e:
            log.warning("tracking: closing the run failed: %s", e)

    worker = threading.Thread(target=finish, name="tracking-finish", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        log.warning("tracking: the run did not close within %.0fs; left as it is", timeout)


def _interrupted(ctx: Context, uploader: checkpoints.CheckpointUploader) -> int:
    grace = ctx.job.spec.checkpoint.grace_period_seconds
    budget = ctx.stop.remaining(grace, grace_margin(grace))
    log.info("waiting up to %.1fs for the checkpoint upload", budget)
    if not uploader.wait(budget):
        log.error("checkpoint upload did not finish within the grace period; the next pod resumes earlier")
    ctx.result["exitReason"] = "interrupted"
    return EXIT_INTERRUPTED


def _record_checkpoint(ctx: Context, uploader: checkpoints.CheckpointUploader) -> None:
    ref = uploader.last_complete
    ctx.result["checkpointUri"] = ref.uri if ref else None
    ctx.result["checkpointStep"] = ref.step if ref else None
    ctx.result["checkpointTime"] = ref.manifest.get("created_at") if ref else None
    ctx.result["checkpointFailures"] = uploader.failures
    if uploader.last_error:
        ctx.result["checkpointError"] = uploader.last_error


def _checkpoint_status(ref: checkpoints.CheckpointRef, upload_seconds: float | None = None) -> dict[str, Any]:
    """The checkpoint as progress reports carry it; uploadSeconds feeds the operator's checkpoint
    duration histogram."""
    status = {"uri": ref.uri, "step": ref.step, "time": ref.manifest.get("created_at")}
    if upload_seconds is not None:
        status["uploadSeconds"] = round(upload_seconds, 3)
    return status


def export_artifacts(
    spec: Any, base_dir: Path, adapter_dir: Path, store: ObjectStore, *, workdir: Path, device: str
) -> list[dict[str, Any]]:
    """Adapter, merged model, GGUF, samples (export.py); resumes a half-done export of this job."""
    from finetune_trainer.export import run_export

    return run_export(spec, base_dir, adapter_dir, store, workdir, device)


def build_summary(ctx: Context, snapshot: dict[str, Any]) -> dict[str, Any]:
    """The termination-message summary: scalar figures first, artifacts last (trimmed first)."""
    result = dict(ctx.result)
    result.setdefault("steps", snapshot["step"])
    result.setdefault("finalLoss", snapshot["loss"])
    result["peakHostMemoryGiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    result["finishedAt"] = rfc3339()
    artifacts = result.pop("artifacts", None)
    if artifacts is not None:
        result["artifacts"] = artifacts
    return result


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "artifacts"}


def _activation_plan(spec: Any, device: str, model: Any, model_source: str) -> Any:
    """engines.cuda.ActivationPlan for `gradientCheckpointing: auto` on CUDA, else None."""
    if device != "cuda":
        return None
    from finetune_trainer.engines import cuda

    return cuda.activation_plan(spec, model, memory.model_config(model_source))


def _batch_plan(
    spec: Any, lengths: list[int], device: str, model_source: str, ranks: distributed.Ranks
) -> batching.BatchPlan:
    """The step split; the same on every rank (each runs its share of a step's rows in the same
    micro-batches), planned from the smallest free memory of their GPUs."""
    if device != "cuda":
        return batching.plan(spec, lengths, device=device)
    import torch

    free = ranks.min_float(float(torch.cuda.mem_get_info()[0]))
    model = memory.ModelMemory.from_config(memory.model_config(model_source))
    return batching.plan(spec, lengths, device=device, memory=model, free_bytes=free)


def _peak_gpu_gib(device: str, progress: ProgressState) -> float | None:
    """This GPU's peak reserved memory; with several ranks the largest of theirs (as of the last
    step's report)."""
    if device != "cuda":
        return None
    per_rank = progress.snapshot()["gpuMemoryPerRankGiB"]
    if per_rank:
        return max(per_rank)
    return memory.peak_gpu_memory_gib(device)
