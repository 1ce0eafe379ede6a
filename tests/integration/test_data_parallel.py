"""Data-parallel training on the CPU: two ranks (gloo) of the real trainer on the tiny 4-bit Llama,
launched as a pod launches them (`python -m finetune_trainer run` with FINETUNE_NPROC_PER_NODE=2:
the launcher starts the ranks through torchrun's agent), checkpointing to moto's S3 server.

Scenario (module fixture, runs once): a one-rank run of 8 rows per step (batchSize 4 x
gradientAccumulationSteps 2); a two-rank run of the same rows per step (2 x 2 x 2 ranks); the
two-rank job stopped by SIGTERM to the launcher after step STOP_AFTER, then resumed; a two-rank job
whose rank 1 is killed -9 after step KILL_AFTER, then run again; a one-rank run on a two-rank
job's checkpoints.

Tolerances: one rank against two, 1e-6 relative on every step's loss (measured: 1.2e-7 at most):
the same rows and the same normalisation (each rank's loss is divided by the tokens of the whole
step and the gradients are averaged), but the sums are ordered differently (two micro-batches of
4 rows, an all-reduce) and the padded lengths differ, so float32 rounding differs. Resumed runs against the
uninterrupted two-rank run: exact (same ranks, each rank's RNG state restored, the same batches).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trainer_runs
from finetune_trainer import checkpoints
from finetune_trainer.errors import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED
from finetune_trainer.jobfile import load_job
from finetune_trainer.storage import S3Store
from trainer_fixtures import alpaca_rows, job_manifest, write_job, write_jsonl
from trainer_runs import process_env

pytestmark = pytest.mark.slow

MAX_STEPS = 8
STOP_AFTER = 3
KILL_AFTER = 5
RUN_TIMEOUT = 420
ONE_RANK_TOLERANCE = 1e-6
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


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the trainer rank `rank` the launcher started (its child with RANK=rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def run_ranks(job: Path, tmp: Path, ranks: int = 2, signal_after: tuple[int, str] | None = None) -> Run:
    """`python -m finetune_trainer run` with FINETUNE_NPROC_PER_NODE=`ranks`; with `signal_after`
    (step, "term" or "kill-rank-1"): SIGTERM to the launcher, or SIGKILL to rank 1, once that step
    is logged."""
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    args = [sys.executable, "-m", "finetune_trainer", "run", str(job), "--log-format", "json"]
    env = process_env(tmp, FINETUNE_NPROC_PER_NODE=str(ranks), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*args, "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
    )
    events, lines = [], []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        events.append(event)
        if signal_after and event.get("event") == "progress" and event["step"] >= signal_after[0]:
            if signal_after[1] == "term":
                proc.send_signal(signal.SIGTERM)
            else:
                pid = rank_pid(proc.pid, 1)
                assert pid is not None, "rank 1 not found among the launcher's children"
                os.kill(pid, signal.SIGKILL)
            signal_after = None
    code = proc.wait(timeout=RUN_TIMEOUT)
    print(f"{job.name} x{ranks}: exit {code} after {time.monotonic() - started:.1f}s")
    summary_file = tmp / "summary.json"
    text = summary_file.read_text() if summary_file.exists() else ""
    return Run(code, events, "".join(lines), json.loads(text) if text.strip() else {})


def run_in_process(job: Path, tmp: Path) -> Run:
    done = trainer_runs.run_in_process(job, tmp)
    events = [
        {"level": r.levelname.lower(), "msg": r.getMessage(), **f}
        for r, f in zip(done.records, done.fields(), strict=True)
    ]
    return Run(done.code, events, "\n".join(e["msg"] for e in events), done.summary)


@dataclass
class Scenario:
    endpoint: str
    bucket: str
    jobs: dict[str, Path]
    one: Run
    two: Run
    stopped: Run
    resumed: Run
    killed: Run
    killed_complete: list[int]
    retried: Run
    other_size: Run


def complete_steps(endpoint: str, bucket: str, prefix: str, job: Path, dest: Path) -> list[int]:
    """The steps list_complete takes for complete, each downloaded and checked against its manifest
    (sizes and sha256) to prove it is."""
    store = S3Store(f"s3://{bucket}/{prefix}", endpoint=endpoint)
    refs = checkpoints.list_complete(store, checkpoints.config_fingerprint(load_job(job).spec))
    for ref in refs:
        checkpoints.download(store, ref, dest / f"step-{ref.step}")
    return sorted(ref.step for ref in refs)


@pytest.fixture(scope="module")
def scenario(s3: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    endpoint, client = s3.endpoint_url, s3.client()
    tmp = tmp_path_factory.mktemp("data-parallel")
    data = write_jsonl(tmp / "rows.jsonl", alpaca_rows(96))
    bucket = f"ddp-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)

    def job(name: str, batch: int, accumulation: int, **checkpoint: Any) -> Path:
        manifest = job_manifest(
            tiny_model_dir,
            data,
            f"s3://{bucket}/jobs/{name}",
            endpoint,
            name=name,
            template=SHORT_TEMPLATE,
            lora={"r": 8, "alpha": 16, "gradientCheckpointing": "false"},
        )
        manifest["spec"]["model"]["maxSeqLength"] = 64
        manifest["spec"]["training"].update(
            {"maxSteps": MAX_STEPS, "batchSize": batch, "gradientAccumulationSteps": accumulation}
        )
        manifest["spec"]["checkpoint"].update(checkpoint)
        return write_job(tmp / f"{name}.yaml", manifest)

    jobs = {
        "one": job("one", 4, 2),
        "two": job("two", 2, 2),
        "main": job("main", 2, 2),
        "killed": job("killed", 2, 2, everySteps=2),
    }
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    one = run_in_process(jobs["one"], tmp / "one")
    two = run_ranks(jobs["two"], tmp / "two")
    stopped = run_ranks(jobs["main"], tmp / "stopped", signal_after=(STOP_AFTER, "term"))
    resumed = run_ranks(jobs["main"], tmp / "resumed")
    killed = run_ranks(jobs["killed"], tmp / "killed", signal_after=(KILL_AFTER, "kill-rank-1"))
    killed_complete = complete_steps(endpoint, bucket, "jobs/killed", jobs["killed"], tmp / "verify")
    retried = run_ranks(jobs["killed"], tmp / "retried")
    other_size = run_in_process(jobs["main"], tmp / "other-size")
    return Scenario(
        endpoint, bucket, jobs, one, two, stopped, resumed, killed, killed_complete, retried, other_size
    )


def test_two_ranks_train_the_steps_of_one_rank_at_the_same_effective_batch(scenario: Scenario) -> None:
    one, two = scenario.one, scenario.two
    assert one.code == 0, one.stderr[-3000:]
    assert two.code == 0, two.stderr[-3000:]
    assert sorted(two.losses()) == list(range(1, MAX_STEPS + 1))
    for step, loss in one.losses().items():
        assert math.isclose(two.losses()[step], loss, rel_tol=ONE_RANK_TOLERANCE), (step, loss, two.losses())
    # The same rows, so the same real tokens: counted over both ranks.
    assert two.summary["tokens"] == one.summary["tokens"] > 0
    assert two.summary["ranks"] == 2 and one.summary["ranks"] == 1
    plans = [e for e in two.events if e.get("event") == "batch-plan"]
    assert [(p["batchSize"], p["gradientAccumulationSteps"]) for p in plans] == [(4, 1)]  # per rank


def test_only_rank_zero_reports(scenario: Scenario) -> None:
    """One progress line per step (rank 0's), one summary, one adapter upload."""
    steps = [e["step"] for e in scenario.two.events if e.get("event") == "progress"]
    assert steps == list(range(1, MAX_STEPS + 1))
    joined = [e for e in scenario.two.events if e.get("event") == "rank"]
    assert joined == [] or all(e["rank"] == 0 for e in joined)  # rank 1 logs warnings only
    assert scenario.two.summary["exitReason"] == "completed"


def test_sigterm_with_two_ranks_loses_no_step_and_resumes_exactly(scenario: Scenario) -> None:
    stopped, resumed, two = scenario.stopped, scenario.resumed, scenario.two
    assert stopped.code == EXIT_INTERRUPTED, stopped.stderr[-3000:]
    done = max(stopped.losses())
    assert done >= STOP_AFTER
    assert stopped.summary["exitReason"] == "interrupted"
    assert stopped.summary["checkpointStep"] == done  # the step both ranks agreed to stop at
    for step, loss in stopped.losses().items():
        assert loss == two.losses()[step]
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert resumed.resumed_from() == done
    assert sorted(resumed.losses()) == list(range(done + 1, MAX_STEPS + 1))
    for step, loss in resumed.losses().items():
        assert loss == two.losses()[step], step


def test_a_rank_killed_fails_the_attempt_and_the_next_resumes_from_a_complete_checkpoint(
    scenario: Scenario,
) -> None:
    killed, retried, two = scenario.killed, scenario.retried, scenario.two
    assert killed.code == 1, killed.stderr[-3000:]
    assert killed.summary["exitReason"] == "error"
    assert "rank 1 was killed by SIGKILL" in killed.summary["message"]
    reached = max(killed.losses())
    # Every checkpoint listed as complete is (downloaded and verified); none is past the kill.
    assert scenario.killed_complete and all(s % 2 == 0 and s <= reached for s in scenario.killed_complete)
    assert retried.code == 0, retried.stderr[-3000:]
    assert retried.resumed_from() == max(scenario.killed_complete)
    for step, loss in retried.losses().items():
        assert loss == two.losses()[step], step


def test_resuming_on_another_number_of_ranks_is_refused(scenario: Scenario) -> None:
    run = scenario.other_size
    assert run.code == EXIT_CONFIG_ERROR
    assert run.summary["exitReason"] == "config-error"
    assert "spec.resources.gpus" in run.summary["message"]
    assert "trained on 2 rank(s) (GPUs), this pod runs 1" in run.summary["message"]


def test_checkpoints_record_the_world_size(scenario: Scenario, s3: Any) -> None:
    body = (
        s3.client()
        .get_object(Bucket=scenario.bucket, Key=f"jobs/main/checkpoints/step-{MAX_STEPS:08d}/manifest.json")[
            "Body"
        ]
        .read()
    )
    manifest = json.loads(body)
    assert manifest["trainer_state"]["worldSize"] == 2
    names = {f["path"] for f in manifest["files"]}
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= names
