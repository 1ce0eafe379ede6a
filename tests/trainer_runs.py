"""The real trainer run from a test: the environment it sees, and a run inside the test's process.

An in-process run (`runner.run`: the whole trainer but argument parsing) pays torch's and
transformers' imports once per test session instead of once per run, most of a tiny run's time.
A test whose subject is the process (a signal, an exit code, an import-time switch) starts
`python -m finetune_trainer` with `process_env` instead.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from s3server import TEST_CREDENTIALS

REPO = Path(__file__).resolve().parents[1]


def trainer_env(tmp: Path, **extra: str) -> dict[str, str]:
    """What a test's trainer run is given: moto's credentials and no AWS config files, no hub access,
    its work folder and summary under `tmp`, a progress port the OS picks; `extra` on top."""
    return {
        **TEST_CREDENTIALS,
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "FINETUNE_PROGRESS_PORT": "0",
        "FINETUNE_WORKDIR": str(tmp / "work"),
        "FINETUNE_SUMMARY_PATH": str(tmp / "summary.json"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def process_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The whole environment of a `python -m finetune_trainer` subprocess: this one's (without an
    AWS profile), `trainer_env`, and the trainer's sources on PYTHONPATH."""
    env = {
        **os.environ,
        **trainer_env(tmp, **extra),
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer-image"), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("AWS_PROFILE", None)
    return env


@dataclass
class InProcessRun:
    code: int
    records: list[logging.LogRecord]
    summary: dict[str, Any]

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def fields(self) -> list[dict[str, Any]]:
        """The structured fields of each record (what a JSON log line carries besides the message)."""
        return [getattr(r, "fields", None) or {} for r in self.records]


class _Keep(logging.Handler):
    def __init__(self, level: int, stop_after_step: int | None = None) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self.stop_after_step = stop_after_step

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        fields = getattr(record, "fields", None) or {}
        if (
            self.stop_after_step is not None
            and fields.get("event") == "progress"
            and fields["step"] >= self.stop_after_step
        ):
            # SIGTERM to this very process, as the kubelet sends it: the trainer's own handler
            # (installed by runner.run in this, the main, thread) turns it into a stop request.
            self.stop_after_step = None
            os.kill(os.getpid(), signal.SIGTERM)


def run_in_process(
    job: Path,
    tmp: Path,
    level: int = logging.INFO,
    device: str = "cpu",
    stop_after_step: int | None = None,
    **extra_env: str,
) -> InProcessRun:
    """`runner.run(job)` on `device` (the CPU unless a GPU test asks for cuda) with
    `trainer_env(tmp, **extra_env)`, keeping every log record at `level` and up; the environment
    and log level are put back afterwards. With `stop_after_step`, SIGTERM once that step is logged
    (the run checkpoints and ends with 143)."""
    from finetune_trainer import runner
    from finetune_trainer.jobfile import load_job

    tmp.mkdir(parents=True, exist_ok=True)
    root, handler = logging.getLogger(), _Keep(level, stop_after_step)
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in trainer_env(tmp, **extra_env).items():
                env.setenv(name, value)
            env.delenv("AWS_PROFILE", raising=False)
            code = runner.run(load_job(job), device, json_lines=True)
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
    summary_file = tmp / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return InProcessRun(code, handler.records, summary)
