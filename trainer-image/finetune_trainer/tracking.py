"""Experiment tracking: MLflow or Weights & Biases, one run per job, continued across preemptions.

What a run gets: the spec as parameters (flattened, `training.learningRate`), every record of
metrics.jsonl as it is written (train loss, learning rate, grad norm, tokens/s, GPU memory; eval
loss and token accuracy; a `resumed_from_step` point per resume), and at the end the artifacts'
URIs (tags / summary) with loss.png, metrics.jsonl and the samples attached.

One run per job: the first pod creates the run and stores its id in the job's storage
(`tracking/<type>.json`, next to the checkpoints); a pod that resumes the job reopens that run. The
run ends FINISHED (W&B: exit code 0) when the job succeeds, FAILED when it fails, and stays RUNNING
while the job waits for a new pod after a preemption.

Credentials arrive only as environment variables from Secrets (MLFLOW_TRACKING_TOKEN,
MLFLOW_TRACKING_USERNAME/PASSWORD, WANDB_API_KEY); W&B without a key runs offline and the run's
files are stored under `tracking/wandb/` for `wandb sync`. A tracker that fails is logged and then
ignored: tracking never stops training.

HF Trainer's own MLflow/W&B callbacks are not used: they log TrainingArguments rather than the
spec, end the run when training ends (before export, so without the artifacts), and neither keeps
one run across pods.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune_trainer.spec import TrackingSpec
from finetune_trainer.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "finetune-operator"
PARAM_CHARS = 500
"""Longest parameter value logged (MLflow refuses values over 6000 characters; prompts run long)."""

METRIC_NAMES = {
    "train": {
        "loss": "train/loss",
        "learningRate": "train/learning_rate",
        "gradNorm": "train/grad_norm",
        "tokensPerSecond": "train/tokens_per_second",
        "gpuMemoryGiB": "train/gpu_memory_gib",
        "epoch": "train/epoch",
    },
    "eval": {"evalLoss": "eval/loss", "evalTokenAccuracy": "eval/token_accuracy"},
}
"""metrics.jsonl record kind and key -> tracked metric name."""


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """The tracked metrics of one metrics.jsonl record (a resume is `resumed_from_step`)."""
    if record.get("kind") == "resume":
        return {"resumed_from_step": float(record["step"])}
    names = METRIC_NAMES.get(str(record.get("kind")), {})
    return {names[k]: float(v) for k, v in record.items() if k in names and isinstance(v, int | float)}


def flatten_params(doc: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec -> {"training.learningRate": "0.0002", ...}; lists as JSON, long values cut."""
    if isinstance(doc, dict):
        out: dict[str, str] = {}
        for key, value in doc.items():
            out |= flatten_params(value, f"{prefix}{key}.")
        return out
    text = json.dumps(doc) if isinstance(doc, list) else str(doc)
    return {prefix.rstrip("."): text if len(text) <= PARAM_CHARS else text[: PARAM_CHARS - 3] + "..."}


def run_pointer_key(kind: str) -> str:
    return f"tracking/{kind}.json"


def _load_pointer(store: ObjectStore, kind: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_bytes(run_pointer_key(kind)))
    except ObjectNotFound:
        return None
    except ValueError:
        log.warning("tracking: %s is not JSON; starting a new run", store.uri(run_pointer_key(kind)))
        return None


class Tracker:
    """No tracking (type none), and the interface of the real ones."""

    kind = "none"

    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record."""

    def finish(self, outcome: str, artifacts: list[dict[str, Any]], files: list[Path]) -> None:
        """End of this pod's part: `outcome` is succeeded, failed or interrupted."""


def open_tracker(
    spec: TrackingSpec,
    *,
    store: ObjectStore,
    workdir: Path,
    run_name: str,
    params: dict[str, str],
) -> Tracker:
    """The job's tracker, its run created or reopened; a plain Tracker when tracking is off or the
    tracker cannot start (logged)."""
    if spec.type == "none":
        return Tracker()
    try:
        if spec.type == "mlflow":
            return MlflowTracker(spec, store=store, run_name=run_name, params=params)
        return WandbTracker(spec, store=store, workdir=workdir, run_name=run_name, params=params)
    except Exception as e:
        log.warning("tracking (%s) could not start; training goes on without it: %s", spec.type, e)
        return Tracker()


class MlflowTracker(Tracker):
    kind = "mlflow"

    def __init__(
        self, spec: TrackingSpec, *, store: ObjectStore, run_name: str, params: dict[str, str]
    ) -> None:
        # A tracking server that is down must not hold the pod for the client's default ~4 minutes
        # of retries per call; metrics are logged asynchronously, so training never waits on them.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        import mlflow
        from mlflow.tracking import MlflowClient

        assert spec.uri is not None  # the spec requires it for mlflow
        # The process-wide URI too: flush_async_logging flushes the default store's queue (without
        # it, MLflow 3 opens a default ./mlflow.db to flush).
        mlflow.set_tracking_uri(spec.uri)
        self.client = MlflowClient(tracking_uri=spec.uri)
        self.store = store
        pointer = _load_pointer(store, self.kind)
        run = None
        if pointer and pointer.get("uri") == spec.uri:
            try:
                run = self.client.get_run(pointer["runId"])
            except Exception as e:
                log.warning(
                    "tracking: run %s not found on %s (%s); starting a new one", pointer["runId"], spec.uri, e
                )
        if run is None:
            run = self._create(spec, run_name)
            store.put_bytes(
                run_pointer_key(self.kind), json.dumps({"uri": spec.uri, "runId": run.info.run_id}).encode()
            )
            log.info("tracking: MLflow run %s created on %s", run.info.run_id, spec.uri)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            log.info("tracking: MLflow run %s continued on %s", run.info.run_id, spec.uri)
        self.run_id = run.info.run_id
        self.resumes = int(run.data.tags.get("finetune.resumes", "0"))
        self._log_params(params, run.data.params)

    def _create(self, spec: TrackingSpec, run_name: str) -> Any:
        from mlflow.exceptions import MlflowException

        name = spec.project or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException:  # created by another job in between
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        return self.client.create_run(experiment_id, run_name=run_name, tags={"finetune.resumes": "0"})

    def _log_params(self, params: dict[str, str], logged: dict[str, str]) -> None:
        from mlflow.entities import Param

        # Parameters are write-once in MLflow: a resumed pod logs only those still missing.
        todo = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(todo), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=todo[start : start + 100])

    def record(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        values = metrics_of(record)
        if not values:
            return
        stamp = _millis(record.get("time"))
        step = int(record["step"])
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()], synchronous=False
        )
        if record.get("kind") == "resume":
            self.resumes += 1
            self.client.set_tag(self.run_id, "finetune.resumes", str(self.resumes))

    def finish(self, outcome: str, artifacts: list[dict[str, Any]], files: list[Path]) -> None:
        import mlflow

        mlflow.flush_async_logging()
        for a in artifacts:
            self.client.set_tag(self.run_id, f"artifact.{a['name']}", a["uri"])
        for path in files:
            try:
                self.client.log_artifact(self.run_id, str(path))
            except Exception as e:
                log.warning("tracking: %s not attached to the MLflow run: %s", path.name, e)
        if outcome != "interrupted":
            self.client.set_terminated(self.run_id, "FINISHED" if outcome == "succeeded" else "FAILED")


class WandbTracker(Tracker):
    kind = "wandb"

    def __init__(
        self, spec: TrackingSpec, *, store: ObjectStore, workdir: Path, run_name: str, params: dict[str, str]
    ) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb
        from wandb.sdk.lib import runid

        self.store = store
        self.offline = not os.environ.get("WANDB_API_KEY")
        pointer = _load_pointer(store, self.kind)
        run_id = pointer["runId"] if pointer else runid.generate_id()
        if pointer is None:
            store.put_bytes(run_pointer_key(self.kind), json.dumps({"runId": run_id}).encode())
        self.dir = workdir / "wandb-run"
        self.dir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {"console": "off", "x_disable_stats": True}
        if spec.uri:
            settings["base_url"] = spec.uri
        self.run = wandb.init(
            project=spec.project or DEFAULT_PROJECT,
            entity=spec.entity,
            name=run_name,
            id=run_id,
            resume="allow",
            mode="offline" if self.offline else "online",
            dir=str(self.dir),
            config=params,
            allow_val_change=True,
            settings=wandb.Settings(**settings),
        )
        # The x axis is the optimizer step, not W&B's own counter: a resumed pod logs steps the
        # previous pod had already logged, which W&B's step would refuse as going backwards.
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step")
        log.info(
            "tracking: W&B run %s %s (%s)",
            run_id,
            "continued" if pointer else "created",
            "offline: stored under tracking/wandb/ for wandb sync" if self.offline else "online",
        )

    def record(self, record: dict[str, Any]) -> None:
        values = metrics_of(record)
        if values:
            self.run.log({"train/global_step": int(record["step"]), **values})

    def finish(self, outcome: str, artifacts: list[dict[str, Any]], files: list[Path]) -> None:
        import wandb

        for a in artifacts:
            self.run.summary[f"artifact/{a['name']}"] = a["uri"]
        for path in files:
            if path.suffix == ".png":
                self.run.log({"loss_plot": wandb.Image(str(path))})
        self.run.finish(exit_code=0 if outcome in ("succeeded", "interrupted") else 1)
        if self.offline:
            self._store_offline_run()

    def _store_offline_run(self) -> None:
        """Upload this pod's offline run folder(s) to tracking/wandb/ (each pod has its own;
        `wandb sync` of all of them rebuilds the one run)."""
        for folder in sorted((self.dir / "wandb").glob("offline-run-*")):
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                key = f"tracking/wandb/{folder.name}/{path.relative_to(folder).as_posix()}"
                self.store.put_file(key, path)
            log.info(
                "tracking: W&B offline run stored at %s", self.store.uri(f"tracking/wandb/{folder.name}/")
            )


def _millis(stamp: Any) -> int:
    if isinstance(stamp, str):
        try:
            return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)
        except ValueError:
            pass
    return int(datetime.now().timestamp() * 1000)
