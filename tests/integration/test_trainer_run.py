"""The real trainer on a tiny 4-bit Llama against a real S3 server (moto's standalone server over
HTTP). The SIGTERM run and the config-error run are subprocesses (`python -m finetune_trainer
run`, exit codes as a pod reports them); the other runs call `runner.run` in this process.

Uses the `s3` fixture of tests/localkube (moto over HTTP); each scenario gets its own bucket.

Scenario (module fixture, runs once): an uninterrupted run; the same job stopped by SIGTERM
after step STOP_AFTER is logged (the subprocess, signalled as a pod is); a half-uploaded and a
corrupt checkpoint planted above the real one; a run of another training config on the same
prefix; the first job restarted. The tests then check exit codes, what is in S3, which checkpoint
was resumed, and that the resumed per-step losses equal the uninterrupted run's.

Tolerance for the losses: none (exact float equality). On the CPU every kernel is deterministic for
a fixed thread count, the resumed run restores the adapter, optimizer, scheduler and RNG states
from the checkpoint, and HF Trainer skips the batches already seen in the epoch, so step k+1 sees
the same weights and the same batch as in the uninterrupted run. (This needs the LoRA weights in
fp32 throughout: see train.adapters_to_fp32.)
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trainer_runs
from finetune_trainer.errors import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED
from trainer_fixtures import alpaca_rows, job_manifest, write_job, write_jsonl
from trainer_runs import process_env

pytestmark = pytest.mark.slow

MAX_STEPS = 10
STOP_AFTER = 3
RUN_TIMEOUT = 300
SHORT_TEMPLATE = {"type": "custom", "format": "### Q: {instruction}\n### A: {output}"}


@dataclass
class Run:
    code: int
    events: list[dict[str, Any]]
    stderr: str
    summary: dict[str, Any] = field(default_factory=dict)

    def losses(self) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in self.events if e.get("event") == "progress"}

    def resumed_from(self) -> int | None:
        return next(e["step"] for e in self.events if e.get("event") == "resume")


def run_in_process(job: Path, tmp: Path) -> Run:
    """The trainer in this process (imports paid once), its log records as the JSON lines' events."""
    done = trainer_runs.run_in_process(job, tmp)
    events = [
        {"level": r.levelname.lower(), "msg": r.getMessage(), **f}
        for r, f in zip(done.records, done.fields(), strict=True)
    ]
    return Run(done.code, events, "\n".join(e["msg"] for e in events), done.summary)


def run_trainer(job: Path, tmp: Path, stop_after_step: int | None = None, command: str = "run") -> Run:
    """Run the trainer to its end; with `stop_after_step`, send SIGTERM once that step is logged."""
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    args = [sys.executable, "-m", "finetune_trainer", command, str(job), "--log-format", "json"]
    if command == "run":
        args += ["--device", "cpu"]
    proc = subprocess.Popen(
        args, env=process_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp
    )
    events, lines = [], []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        events.append(event)
        if (
            stop_after_step is not None
            and event.get("event") == "progress"
            and event["step"] >= stop_after_step
        ):
            proc.send_signal(signal.SIGTERM)
            stop_after_step = None
    code = proc.wait(timeout=RUN_TIMEOUT)
    print(f"{job.name} {command}: exit {code} after {time.monotonic() - started:.1f}s")
    summary_file = tmp / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return Run(code, events, "".join(lines), summary)


def new_bucket(client: Any) -> str:
    name = f"trainer-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def keys(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def plant_bad_checkpoints(client: Any, bucket: str, root: str, good: int) -> tuple[int, int]:
    """Copy the good checkpoint to step good+2 without a manifest (an upload cut short) and to
    step good+3 with a manifest but one file's bytes changed (same size: only sha256 tells)."""
    src = f"{root}/checkpoints/step-{good:08d}/"
    partial, corrupt = good + 2, good + 3
    for key in keys(client, bucket, src):
        rel = key[len(src) :]
        for step in (partial, corrupt):
            if step == partial and rel == "manifest.json":
                continue
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            if rel == "manifest.json":
                manifest = json.loads(body)
                manifest["step"] = step
                body = json.dumps(manifest).encode()
            if step == corrupt and rel == "adapter_model.safetensors":
                body = body[:-8] + b"\x00" * 8
            client.put_object(Bucket=bucket, Key=f"{root}/checkpoints/step-{step:08d}/{rel}", Body=body)
    return partial, corrupt


@dataclass
class Scenario:
    bucket: str
    full: Run
    stopped: Run
    stopped_keys: dict[str, int]
    other: Run
    resumed: Run
    planted: tuple[int, int]


@pytest.fixture(scope="module")
def scenario(s3: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    endpoint, client = s3.endpoint_url, s3.client()
    tmp = tmp_path_factory.mktemp("trainer-run")
    data = write_jsonl(tmp / "rows.jsonl", alpaca_rows(48))
    bucket = new_bucket(client)

    def job(name: str, prefix: str, **training: Any) -> Path:
        manifest = job_manifest(
            tiny_model_dir,
            data,
            f"s3://{bucket}/{prefix}",
            endpoint,
            name=name,
            template=SHORT_TEMPLATE,
            lora={"r": 8, "alpha": 16, "gradientCheckpointing": "false"},
        )
        manifest["spec"]["model"]["maxSeqLength"] = 64
        manifest["spec"]["training"].update({"maxSteps": MAX_STEPS, **training})
        return write_job(tmp / f"{name}.yaml", manifest)

    full = run_in_process(job("full", "jobs/full"), tmp / "full")
    main = job("main", "jobs/main")
    stopped = run_trainer(main, tmp / "stopped", stop_after_step=STOP_AFTER)
    good = stopped.summary.get("checkpointStep")
    assert stopped.code == EXIT_INTERRUPTED and good, stopped.stderr[-3000:]
    stopped_keys = keys(client, bucket, "jobs/main/checkpoints/")
    planted = plant_bad_checkpoints(client, bucket, "jobs/main", good)
    other = run_in_process(job("other", "jobs/main", learningRate=5e-4, maxSteps=2), tmp / "other")
    resumed = run_in_process(main, tmp / "resumed")
    return Scenario(bucket, full, stopped, stopped_keys, other, resumed, planted)


def test_uninterrupted_run_completes_with_summary_and_adapter(scenario: Scenario, s3: Any) -> None:
    run = scenario.full
    assert run.code == 0, run.stderr[-3000:]
    assert sorted(run.losses()) == list(range(1, MAX_STEPS + 1))
    s = run.summary
    assert s["exitReason"] == "completed" and s["steps"] == MAX_STEPS
    assert s["tokens"] > 0 and s["tokensPerSecond"] > 0
    assert s["finalLoss"] == run.losses()[MAX_STEPS]
    assert s["checkpointUri"] == f"s3://{scenario.bucket}/jobs/full/checkpoints/step-{MAX_STEPS:08d}/"
    assert s["adapterUri"] == f"s3://{scenario.bucket}/jobs/full/artifacts/adapter/"
    stored = keys(s3.client(), scenario.bucket, "jobs/full/artifacts/adapter/")
    assert "jobs/full/artifacts/adapter/adapter_model.safetensors" in stored


def test_progress_lines_are_structured_with_real_token_counts(scenario: Scenario) -> None:
    progress = [e for e in scenario.full.events if e.get("event") == "progress"]
    for e in progress:
        assert {"step", "total", "loss", "lr", "tokensPerSecond", "etaSeconds", "tokens"} <= e.keys()
        assert e["total"] == MAX_STEPS
    # 4 rows of at most 64 tokens per step; rows shorter than the longest of their batch are padded,
    # and padding is not counted, so some steps count fewer than 4 x 64.
    per_step = [b["tokens"] - a["tokens"] for a, b in itertools.pairwise(progress)]
    assert all(0 < n <= 4 * 64 for n in per_step), per_step
    assert any(n < 4 * 64 for n in per_step), per_step
    assert len(set(per_step)) > 1


def test_sigterm_checkpoints_to_s3_and_exits_143(scenario: Scenario) -> None:
    run = scenario.stopped
    step = run.summary["checkpointStep"]
    assert run.code == EXIT_INTERRUPTED
    assert run.summary["exitReason"] == "interrupted"
    assert STOP_AFTER <= step < MAX_STEPS
    assert max(run.losses()) == step  # the step running at SIGTERM was finished, no further one
    prefix = f"jobs/main/checkpoints/step-{step:08d}/"
    stored = scenario.stopped_keys
    assert prefix + "manifest.json" in stored and prefix + "adapter_model.safetensors" in stored
    assert prefix + "optimizer.pt" in stored and prefix + "rng_state.pth" in stored


def test_resumed_losses_equal_the_uninterrupted_runs_exactly(scenario: Scenario) -> None:
    step = scenario.stopped.summary["checkpointStep"]
    full, resumed = scenario.full.losses(), scenario.resumed.losses()
    assert scenario.resumed.code == 0, scenario.resumed.stderr[-3000:]
    assert sorted(resumed) == list(range(step + 1, MAX_STEPS + 1))
    assert {s: resumed[s] for s in resumed} == {s: full[s] for s in resumed}
    # ... and the steps before the stop were the same too (same seed, same data order).
    assert {s: full[s] for s in range(1, step + 1)} == {
        s: scenario.stopped.losses()[s] for s in range(1, step + 1)
    }


def test_partial_and_corrupt_checkpoints_are_skipped(scenario: Scenario) -> None:
    good = scenario.stopped.summary["checkpointStep"]
    partial, corrupt = scenario.planted
    assert scenario.resumed.resumed_from() == good
    assert f"checkpoint step {partial}: no manifest" in scenario.resumed.stderr
    assert f"checkpoint step {corrupt}: adapter_model.safetensors: sha256" in scenario.resumed.stderr


def test_checkpoint_of_another_config_is_not_used(scenario: Scenario) -> None:
    other = scenario.other
    assert other.code == 0, other.stderr[-3000:]
    assert other.resumed_from() is None
    assert sorted(other.losses()) == [1, 2]
    # ... and the main job, restarted after it, did not take the other config's checkpoint.
    assert scenario.resumed.resumed_from() == scenario.stopped.summary["checkpointStep"]


@pytest.fixture
def quick_job(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    def make(data: Path, **sections: Any) -> Path:
        return write_job(tmp_path / "job.yaml", job_manifest(tiny_model_dir, data, **sections))

    return make


def test_missing_template_column_exits_78_naming_the_field(
    quick_job: Any, alpaca_jsonl: Path, tmp_path: Path
) -> None:
    """The process exit code the operator's podFailurePolicy acts on; the other config errors
    (malformed data, rows that never fit) are tested in-process in tests/unit/test_data.py."""
    run = run_trainer(quick_job(alpaca_jsonl, template={"type": "r1-reasoning"}), tmp_path / "run")
    assert run.code == EXIT_CONFIG_ERROR
    error = next(e for e in run.events if e["level"] == "error")
    assert error["field"] == "spec.template.fields"
    assert "'Question'" in error["msg"] and "input, instruction, output" in error["msg"]
    assert run.summary["exitReason"] == "config-error"
    assert not any(e.get("event") in ("progress", "preflight") for e in run.events)
