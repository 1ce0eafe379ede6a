"""Did it work? The real trainer on the tiny 4-bit Llama with validation data, against moto's S3 over
HTTP, a real MLflow tracking server (the `mlflow` package's, started here) and W&B offline.

Two jobs, each stopped by SIGTERM partway and resumed by a second run (in this process: the signal
goes to this process, whose handler the trainer installs, as the kubelet's would):

- learn: rows of a fixed mapping (what colour each object is) the model can learn, 25% held out;
  sample prompts; tracked in MLflow. Eval loss must fall; the resumed run must reuse the base
  model's answers and continue the same MLflow run.
- overfit: 8 questions trained with one random answer each and validated (a file of its own)
  with another random answer to the same questions: nothing generalises, so the training loss
  keeps falling while the eval loss stops improving. Early stopping must fire, and export from
  the best checkpoint must take the one with the lowest eval loss; tracked in W&B offline.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trainer_runs
from finetune_trainer.errors import EXIT_INTERRUPTED
from mlflowserver import MlflowServer
from trainer_fixtures import job_manifest, words, write_job, write_jsonl

pytestmark = pytest.mark.slow

TEMPLATE = {"type": "custom", "format": "### Q: {instruction}\n### A: {output}"}
COLOURS = {
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "banana": "yellow",
    "cherry": "red",
    "orange": "orange",
    "plum": "purple",
}
LEARN_STEPS, LEARN_STOP = 12, 5
OVERFIT_STEPS, OVERFIT_STOP = 60, 7
PROMPTS = ["What colour is the sky?", "What colour is the snow?"]


def colour_rows() -> list[dict[str, str]]:
    asks = [
        "What colour is the {}?",
        "Which colour has the {}?",
        "Tell me the colour of the {}.",
        "The {} has what colour?",
        "Name the colour of the {}.",
        "Say what colour the {} is.",
    ]
    return [
        {"instruction": a.format(o), "output": f"The {o} is {c}."} for a in asks for o, c in COLOURS.items()
    ]


@dataclass
class Job:
    bucket: str
    prefix: str
    first: trainer_runs.InProcessRun
    resumed: trainer_runs.InProcessRun
    before_answers: dict[str, Any]
    """samples-before.json as the first run left it (body and LastModified)."""

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}/{key}"


@dataclass
class Scenario:
    learn: Job
    overfit: Job
    mlflow: MlflowServer
    s3: Any

    def get(self, job: Job, key: str) -> bytes:
        return self.s3.client().get_object(Bucket=job.bucket, Key=f"{job.prefix}/{key}")["Body"].read()

    def keys(self, job: Job, under: str) -> list[str]:
        pages = (
            self.s3.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=job.bucket, Prefix=f"{job.prefix}/{under}")
        )
        return [o["Key"].removeprefix(f"{job.prefix}/") for p in pages for o in p.get("Contents", [])]

    def records(self, job: Job) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.get(job, "artifacts/metrics.jsonl").decode().splitlines()]

    def manifests(self, job: Job) -> dict[int, dict[str, Any]]:
        found = [k for k in self.keys(job, "checkpoints/") if k.endswith("/manifest.json")]
        return {int(k.split("/")[1].removeprefix("step-")): json.loads(self.get(job, k)) for k in found}


def run_twice(tmp: Path, name: str, manifest: dict[str, Any], stop_after: int, s3: Any) -> Job:
    """The job stopped by SIGTERM once `stop_after` is logged, then run again to its end."""
    job = write_job(tmp / f"{name}.yaml", manifest)
    bucket, prefix = manifest["spec"]["storage"]["uri"].removeprefix("s3://").split("/", 1)
    first = trainer_runs.run_in_process(job, tmp / f"{name}-1", stop_after_step=stop_after)
    assert first.code == EXIT_INTERRUPTED, first.summary
    before: dict[str, Any] = {}
    if manifest["spec"].get("samples"):
        stored = s3.client().get_object(Bucket=bucket, Key=f"{prefix}/export/samples-before.json")
        before = {"body": stored["Body"].read(), "modified": stored["LastModified"]}
    resumed = trainer_runs.run_in_process(job, tmp / f"{name}-2")
    assert resumed.code == 0, resumed.summary
    return Job(bucket, prefix, first, resumed, before)


@pytest.fixture(scope="module")
def scenario(s3: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("evaluation-run")
    mlflow = MlflowServer.start(tmp / "mlflow")  # starts while the W&B job trains
    client = s3.client()
    bucket = f"eval-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    try:
        rng = random.Random(5)
        questions = [words(rng, 3) for _ in range(8)]
        train = write_jsonl(
            tmp / "noise.jsonl", [{"instruction": q, "output": words(rng, 6)} for q in questions]
        )
        other = write_jsonl(
            tmp / "noise-val.jsonl", [{"instruction": q, "output": words(rng, 6)} for q in questions]
        )
        overfit = job_manifest(
            tiny_model_dir,
            train,
            f"s3://{bucket}/jobs/overfit",
            s3.endpoint_url,
            name="overfit",
            template=TEMPLATE,
            lora={"r": 16, "alpha": 32, "gradientCheckpointing": "false"},
            evaluation={"everySteps": 2, "patience": 2, "earlyStopping": True},
            checkpoint={"everySteps": 2, "keepLast": 1, "gracePeriodSeconds": 60},
            export={"gguf": [], "fromCheckpoint": "best"},
            tracking={"type": "wandb", "project": "tests"},
        )
        overfit["spec"]["model"]["maxSeqLength"] = 64
        overfit["spec"]["data"]["validation"] = {"path": str(other), "split": "train"}
        overfit["spec"]["training"].update(
            maxSteps=OVERFIT_STEPS,
            learningRate=5e-3,
            batchSize=4,
            gradientAccumulationSteps=1,
            warmupSteps=0,
            lrScheduler="constant",
        )
        overfitted = run_twice(tmp, "overfit", overfit, OVERFIT_STOP, s3)

        colours = write_jsonl(tmp / "colours.jsonl", colour_rows())
        learn = job_manifest(
            tiny_model_dir,
            colours,
            f"s3://{bucket}/jobs/learn",
            s3.endpoint_url,
            name="learn",
            template=TEMPLATE,
            lora={"r": 16, "alpha": 32, "gradientCheckpointing": "false"},
            evaluation={"everySteps": 3},
            checkpoint={"everySteps": 4, "keepLast": 2, "gracePeriodSeconds": 60},
            samples={"prompts": PROMPTS, "maxNewTokens": 8},
        )
        learn["spec"]["model"]["maxSeqLength"] = 64
        learn["spec"]["data"]["validation"] = {"fraction": 0.25}
        learn["spec"]["training"].update(maxSteps=LEARN_STEPS, learningRate=5e-3, batchSize=4, warmupSteps=0)
        learn["spec"]["tracking"] = {"type": "mlflow", "uri": mlflow.wait().uri, "project": "tests"}
        learned = run_twice(tmp, "learn", learn, LEARN_STOP, s3)
        yield Scenario(learned, overfitted, mlflow, s3)
    finally:
        mlflow.stop()


def test_eval_loss_falls_on_learnable_data_and_each_checkpoint_carries_it(scenario: Scenario) -> None:
    job = scenario.learn
    summary = job.resumed.summary
    assert summary["validationRows"] == 12  # a quarter of the 48 rows, never trained on
    assert summary["evalLossBefore"] > 1.2 * summary["finalEvalLoss"], summary
    evals = [r for r in scenario.records(job) if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == LEARN_STEPS
    assert evals[-1]["evalLoss"] < evals[0]["evalLoss"]
    assert all(0 <= r["evalTokenAccuracy"] <= 1 for r in evals)
    assert evals[-1]["evalTokenAccuracy"] > evals[0]["evalTokenAccuracy"]
    # Every periodic checkpoint is evaluated; the SIGTERM one is not (the grace period is for saving).
    stopped = job.first.summary["checkpointStep"]
    for step, manifest in scenario.manifests(job).items():
        state = manifest["trainer_state"]
        if step == stopped:
            assert "evalLoss" not in state
        else:
            assert state["evalLoss"] == next(r["evalLoss"] for r in evals if r["step"] == step)


def test_resume_reuses_the_base_models_answers(scenario: Scenario) -> None:
    job = scenario.learn
    assert job.first.summary["samplesBefore"] == "generated"
    assert job.resumed.summary["samplesBefore"] == "reused"
    stored = scenario.s3.client().get_object(
        Bucket=job.bucket, Key=f"{job.prefix}/export/samples-before.json"
    )
    assert stored["Body"].read() == job.before_answers["body"]
    assert stored["LastModified"] == job.before_answers["modified"]
    assert any("stored by an earlier pod; reused" in m for m in job.resumed.messages())


def test_before_and_after_answers_exist_and_differ(scenario: Scenario) -> None:
    job = scenario.learn
    records = json.loads(scenario.get(job, "artifacts/samples.json"))
    assert [r["prompt"] for r in records] == PROMPTS
    before = json.loads(job.before_answers["body"])["answers"]
    for record, base in zip(records, before, strict=True):
        assert record["before"] == base and record["after"]
        assert record["before"] != record["after"]
    markdown = scenario.get(job, "artifacts/samples.md").decode()
    assert "_not recorded_" not in markdown and markdown.count("**Before training (base model)**") == 2


def test_metrics_and_loss_plot_are_stored_with_the_artifacts_resume_marked(scenario: Scenario) -> None:
    job = scenario.learn
    resumed_from = job.resumed.summary["resumedFromStep"]
    assert resumed_from == job.first.summary["checkpointStep"] >= LEARN_STOP
    records = scenario.records(job)
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, LEARN_STEPS + 1))  # the steps the first pod lost appear once
    assert [r["step"] for r in records if r["kind"] == "resume"] == [resumed_from]
    for r in records:
        if r["kind"] == "train":
            assert {"loss", "learningRate", "gradNorm", "tokensPerSecond", "gpuMemoryGiB"} <= r.keys()
    artifacts = {a["name"]: a for a in job.resumed.summary["artifacts"]}
    for name, key in (("metrics", "artifacts/metrics.jsonl"), ("loss-plot", "artifacts/loss.png")):
        body = scenario.get(job, key)
        assert artifacts[name]["uri"] == job.uri(key)
        assert artifacts[name]["sha256"] == hashlib.sha256(body).hexdigest()
    assert scenario.get(job, "artifacts/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_run_has_the_spec_metrics_by_step_and_continues_across_the_resume(scenario: Scenario) -> None:
    from mlflow.tracking import MlflowClient

    job = scenario.learn
    client = MlflowClient(tracking_uri=scenario.mlflow.uri)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run for the job, both pods
    run = runs[0]
    pointer = json.loads(scenario.get(job, "tracking/mlflow.json"))
    assert pointer["runId"] == run.info.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "learn"
    assert run.data.params["training.learningRate"] == "0.005" and run.data.params["lora.r"] == "16"
    assert run.data.params["data.validation.fraction"] == "0.25"
    assert run.data.tags["finetune.resumes"] == "1"
    assert run.data.tags["artifact.adapter"] == job.uri("artifacts/adapter/")

    def history(name: str) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for m in client.get_metric_history(run.info.run_id, name):
            out.setdefault(m.step, []).append(m.value)
        return out

    resumed_from = job.resumed.summary["resumedFromStep"]
    loss = history("train/loss")
    assert sorted(loss) == list(range(1, LEARN_STEPS + 1))
    # The steps after the checkpoint were trained twice (by the first pod, lost, and again): the
    # same values, since the CPU run is deterministic and resume exact.
    for step in range(resumed_from + 1, job.first.summary["steps"] + 1):
        assert len(set(loss[step])) == 1, (step, loss[step])
    evals = history("eval/loss")
    assert 0 in evals and LEARN_STEPS in evals
    assert evals[LEARN_STEPS][-1] == pytest.approx(job.resumed.summary["finalEvalLoss"])
    assert history("resumed_from_step") == {resumed_from: [float(resumed_from)]}
    attached = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "metrics.jsonl", "samples.md"} <= attached


def test_early_stopping_fires_on_data_that_overfits(scenario: Scenario) -> None:
    job = scenario.overfit
    summary = job.resumed.summary
    assert summary["exitReason"] == "early-stopped", summary
    assert summary["steps"] < OVERFIT_STEPS
    assert summary["stopReason"].startswith(f"stopped early at step {summary['steps']}: eval loss did not")
    records = scenario.records(job)
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    evals = {r["step"]: r["evalLoss"] for r in records if r["kind"] == "eval"}
    best = min(evals, key=evals.__getitem__)
    assert best == summary["bestEvalStep"] < summary["steps"]
    # Overfitting: after the best evaluation the training loss went on falling, the eval loss did not.
    assert train[summary["steps"]] < train[best] and evals[summary["steps"]] > evals[best]
    # The early stop survived the resume: patience was counted from the checkpoint's evaluations.
    assert job.resumed.summary["resumedFromStep"] < best


def test_export_from_best_takes_the_checkpoint_with_the_lowest_eval_loss(scenario: Scenario) -> None:
    job = scenario.overfit
    summary = job.resumed.summary
    manifests = scenario.manifests(job)
    # keepLast 1 keeps the last checkpoint; the best one is kept beside it.
    assert sorted(manifests) == sorted({summary["exportedStep"], summary["checkpointStep"]})
    evaluated = {
        r["step"]: r["evalLoss"] for r in scenario.records(job) if r["kind"] == "eval" and r["step"] > 0
    }
    best = min(evaluated, key=evaluated.__getitem__)  # every evaluation after step 0 was a checkpoint's
    assert summary["exportedFrom"] == "best" and summary["exportedStep"] == best != summary["checkpointStep"]
    assert manifests[best]["trainer_state"]["evalLoss"] == evaluated[best] == summary["exportedEvalLoss"]
    saved = {f["path"]: f["sha256"] for f in manifests[best]["files"]}
    exported = scenario.get(job, "artifacts/adapter/adapter_model.safetensors")
    assert hashlib.sha256(exported).hexdigest() == saved["adapter_model.safetensors"]
    last = {f["path"]: f["sha256"] for f in manifests[summary["checkpointStep"]]["files"]}
    assert last["adapter_model.safetensors"] != saved["adapter_model.safetensors"]


def wandb_records(path: Path | bytes) -> list[Any]:
    """The records of a W&B transaction log (`run-<id>.wandb`): LevelDB's log format (32 KiB blocks,
    7-byte chunk headers) after a 7-byte `:W&B` header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path if isinstance(path, bytes) else path.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def test_wandb_offline_run_has_metrics_by_step_and_continues_across_the_resume(scenario: Scenario) -> None:
    job = scenario.overfit
    run_id = json.loads(scenario.get(job, "tracking/wandb.json"))["runId"]
    logs = sorted(k for k in scenario.keys(job, "tracking/wandb/") if k.endswith(".wandb"))
    assert len(logs) == 2 and all(k.endswith(f"/run-{run_id}.wandb") for k in logs)  # one run, two pods
    steps = []
    for key in logs:
        records = wandb_records(scenario.get(job, key))
        assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {run_id}
        history = [
            {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        steps.append(sorted({h["train/global_step"] for h in history if "train/loss" in h}))
        config = next(r.run.config for r in records if r.WhichOneof("record_type") == "run")
        assert any(item.key == "training.learningRate" for item in config.update)
    resumed_from = job.resumed.summary["resumedFromStep"]
    assert steps[0] == list(range(1, job.first.summary["steps"] + 1))
    assert steps[1] == list(range(resumed_from + 1, job.resumed.summary["steps"] + 1))
