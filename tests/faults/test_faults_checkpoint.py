"""S3 stopped in the middle of a checkpoint upload, with the real trainer on the tiny model.

The trainer runs in this process (imports paid once); the S3 server (moto over HTTP) stops right
after the files of the step-4 checkpoint are stored, before its manifest, so step 4 is left half-
uploaded: files, no manifest. S3 stays down for the rest of the run. Checked: training goes on to
its last step; the uploader retries each checkpoint with doubling delays; the trainer's progress
reports say checkpoints are failing from the first failed attempt, and the status the operator
derives from such a report has CheckpointsFailing=True; the run ends (the adapter cannot be
exported) and the next run, with S3 back, resumes from step 2, the newest complete checkpoint,
never from the half-uploaded step 4.

A corrupt checkpoint (a file whose bytes no longer match the manifest's sha256) is covered where
it is cheapest: tests/integration/test_checkpoints_s3.py (resolve_resume skips it) and
tests/integration/test_trainer_run.py (the real trainer resumes from the checkpoint before it).

S3's retries are shortened for the test through their named settings (`storage.S3_RETRIES`:
botocore 1 attempt; `CHECKPOINT_UPLOAD_RETRY`: 4 checkpoint attempts from 0.25 s): in production
the first failed attempt takes about 25 s to surface.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from finetune_operator.status import derive_status
from finetune_trainer import checkpoints, storage
from s3server import start_moto_server
from trainer_fixtures import job_manifest, write_job
from trainer_runs import run_in_process

pytestmark = pytest.mark.slow


class Reports:
    """A stand-in for the operator's progress endpoint: keeps every report the trainer posts."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        reports = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                reports.received.append(json.loads(body))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/progress"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def objects(endpoint: str, bucket: str) -> dict[str, int]:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    found = client.list_objects_v2(Bucket=bucket).get("Contents") or []
    return {o["Key"]: o["Size"] for o in found}


def step_files(keys: dict[str, int], step: int) -> list[str]:
    return [k.rsplit("/", 1)[1] for k in keys if f"/checkpoints/step-{step:08d}/" in k]


def test_s3_stopped_during_a_checkpoint_upload(
    tmp_path: Path, tiny_model_dir: Path, alpaca_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, stop = start_moto_server()
    port = int(endpoint.rsplit(":", 1)[1])
    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="t", aws_secret_access_key="t", region_name="us-east-1"
    ).create_bucket(Bucket=bucket)
    manifest = job_manifest(
        tiny_model_dir,
        alpaca_jsonl,
        storage_uri=f"s3://{bucket}/jobs/ns/s3-down",
        endpoint=endpoint,
        name="s3-down",
        model={"path": str(tiny_model_dir), "maxSeqLength": 1024},
        training={
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "maxSteps": 8,
            "warmupSteps": 1,
            "learningRate": 1e-3,
            "optimizer": "adamw_torch",
        },
        checkpoint={"everySteps": 2, "everyMinutes": 0, "keepLast": 3, "gracePeriodSeconds": 30},
    )
    job = write_job(tmp_path / "job.yaml", manifest)

    # Short retries (see the module docstring); S3 stops once step 4's files are stored, before its
    # manifest.
    monkeypatch.setattr(storage, "S3_RETRIES", {"mode": "standard", "total_max_attempts": 1})
    monkeypatch.setattr(
        checkpoints.uploader,
        "CHECKPOINT_UPLOAD_RETRY",
        storage.RetryPolicy("checkpoint-upload", attempts=4, backoff=0.25),
    )
    real_put_files = storage.S3Store.put_files
    stopped = threading.Event()

    def put_files(self: storage.S3Store, files: Sequence[tuple[str, Path]]) -> None:
        real_put_files(self, files)
        if any(key.startswith("checkpoints/step-00000004/") for key, _ in files) and not stopped.is_set():
            stopped.set()
            stop()

    monkeypatch.setattr(storage.S3Store, "put_files", put_files)
    reports = Reports()
    try:
        first = run_in_process(
            job, tmp_path / "run1", FINETUNE_REPORT_URL=reports.url, FINETUNE_REPORT_INTERVAL="1"
        )
        assert stopped.is_set()
    finally:
        reports.close()

    # Training went on to the end; only exporting the adapter needs S3 and failed.
    summary = first.summary
    assert summary["steps"] == 8, summary
    assert first.code == 1 and "export" in summary["message"], summary  # the Job retries the pod
    retries = [msg for msg in first.messages() if "failed, retrying in" in msg]
    assert any("attempt 1 of 4 failed, retrying in 0.25s" in m for m in retries), retries
    assert any("attempt 2 of 4 failed, retrying in 0.50s" in m for m in retries), retries
    assert any("giving up after 4 attempt(s)" in msg for msg in first.messages())

    # The reports said so, and the operator's status says so.
    failing = [r for r in reports.received if (r.get("checkpointFailures") or 0) > 0]
    assert failing, [r.get("checkpointFailures") for r in reports.received]
    assert max(r["step"] for r in failing) > 4, "no report of training going on while S3 was down"
    report = failing[-1]
    ftj = {"metadata": {"name": "s3-down", "namespace": "ns", "generation": 1}, "spec": {}, "status": {}}
    now = datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    job_obj = {"metadata": {"name": "s3-down"}, "spec": {}, "status": {}}
    pod = {
        "metadata": {"name": "s3-down-a", "uid": "a", "creationTimestamp": stamp},
        "status": {
            "phase": "Running",
            "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": stamp}}}],
        },
    }
    status = derive_status(ftj, job_obj, [pod], report, now)
    failing_condition = next(c for c in status["conditions"] if c["type"] == "CheckpointsFailing")
    assert failing_condition["status"] == "True"
    assert "checkpoint uploads failed" in failing_condition["message"]
    assert status["progress"]["checkpointFailures"] == report["checkpointFailures"]

    # What S3 holds: step 2 complete, step 4 half-uploaded (no manifest), nothing newer complete.
    endpoint_again, stop = start_moto_server(port)
    assert endpoint_again == endpoint
    try:
        keys = objects(endpoint, bucket)
        assert "manifest.json" in step_files(keys, 2)
        assert step_files(keys, 4) and "manifest.json" not in step_files(keys, 4)
        assert all("manifest.json" not in step_files(keys, s) for s in (6, 8))

        # The next run (S3 back) resumes from step 2, never from the half-uploaded step 4.
        reports = Reports()
        try:
            second = run_in_process(
                job, tmp_path / "run2", FINETUNE_REPORT_URL=reports.url, FINETUNE_REPORT_INTERVAL="1"
            )
        finally:
            reports.close()
        resumed = [f for f in second.fields() if f.get("event") == "resume"]
        assert resumed and resumed[0]["step"] == 2, resumed
        assert second.code == 0, second.summary
        assert second.summary["resumedFromStep"] == 2 and second.summary["steps"] == 8
        assert "manifest.json" in step_files(objects(endpoint, bucket), 8)
    finally:
        stop()
