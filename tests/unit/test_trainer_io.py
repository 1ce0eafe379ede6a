"""The trainer's small I/O pieces: checkpoint policy, summary trimming, the progress endpoint and
the report client (real HTTP on loopback, no mocks)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import summary
from finetune_trainer.engines import cpu
from finetune_trainer.jobfile import parse_job
from finetune_trainer.progress import Metrics, ProgressState, start_server
from finetune_trainer.report import Reporter
from finetune_trainer.signals import StopRequest, grace_margin
from finetune_trainer.train import checkpoint_decision, resolve_precision


@pytest.mark.parametrize(
    ("step", "policy", "expected"),
    [
        (
            5,
            {"every_steps": 20, "every_minutes": 15.0, "minutes_since_save": 1.0, "stop_requested": True},
            (True, True),
        ),
        (
            60,
            {"every_steps": 20, "every_minutes": None, "minutes_since_save": 0.0},
            (True, False),
        ),  # last step
        (40, {"every_steps": 20, "every_minutes": None, "minutes_since_save": 0.0}, (True, False)),
        (41, {"every_steps": 20, "every_minutes": None, "minutes_since_save": 0.0}, (False, False)),
        (41, {"every_steps": None, "every_minutes": 15.0, "minutes_since_save": 15.5}, (True, False)),
        (41, {"every_steps": 20, "every_minutes": 15.0, "minutes_since_save": 14.9}, (False, False)),
    ],
)
def test_checkpoint_decision(step: int, policy: dict[str, Any], expected: tuple[bool, bool]) -> None:
    """(save, stop) at the end of a step of a 60-step run."""
    assert checkpoint_decision(step, 60, **{"stop_requested": False, **policy}) == expected


def test_precision_and_cpu_optimizer() -> None:
    assert resolve_precision("auto", "cpu", False) == "fp32"
    assert resolve_precision("auto", "cuda", True) == "bf16"
    assert resolve_precision("auto", "cuda", False) == "fp16"
    assert resolve_precision("fp16", "cuda", True) == "fp16"
    assert cpu.optimizer("adamw_8bit") == "adamw_torch" and cpu.optimizer("sgd") == "sgd"


@pytest.mark.parametrize(
    ("training", "lora", "expected"),
    [
        ({"optimizer": "adamw_8bit"}, {}, ["training.optimizer: adamw_8bit -> adamw_torch"]),
        ({"optimizer": "paged_adamw_8bit"}, {}, ["training.optimizer: paged_adamw_8bit -> adamw_torch"]),
        ({"optimizer": "sgd"}, {"gradientCheckpointing": "auto"}, []),
        (
            {"optimizer": "adamw_torch"},
            {"gradientCheckpointing": "unsloth"},
            ["lora.gradientCheckpointing: unsloth -> true"],
        ),
    ],
)
def test_cpu_substitutions_say_what_runs_instead(training: dict, lora: dict, expected: list[str]) -> None:
    spec = parse_job(
        {"model": {"hub": "m/x"}, "data": {"hub": "d/x"}, "training": training, "lora": lora}
    ).spec
    assert cpu.substitutions(spec) == expected


def test_grace_budget_keeps_a_margin() -> None:
    stop = StopRequest()
    assert stop.remaining(120, grace_margin(120)) == 120 - 12
    stop.set("SIGTERM")
    assert 0 < stop.remaining(120, grace_margin(120)) <= 108
    assert stop.remaining(10, 15) == 0.0


def test_summary_is_trimmed_to_the_termination_message_limit(tmp_path: Path) -> None:
    artifacts = [
        {"name": f"gguf-{i}", "uri": "s3://b/" + "x" * 300, "sizeBytes": i, "sha256": "f" * 64}
        for i in range(20)
    ]
    full = {
        "exitReason": "completed",
        "steps": 60,
        "finalLoss": 1.25,
        "adapterUri": "s3://b/a/",
        "artifacts": artifacts,
    }
    text = summary.encode(full)
    parsed = json.loads(text)
    assert len(text.encode()) <= summary.LIMIT_BYTES
    assert parsed["steps"] == 60 and parsed["artifactCount"] == 20
    assert 0 < len(parsed["artifacts"]) < 20 and "sha256" not in parsed["artifacts"][0]
    small = {"exitReason": "completed", "steps": 3}
    assert json.loads(summary.encode(small)) == small
    path = summary.write(full, tmp_path / "termination-log")
    assert json.loads(path.read_text())["exitReason"] == "completed"


def test_metrics_endpoint_serves_prometheus_text_only() -> None:
    state, metrics = ProgressState(), Metrics()
    server = start_server(state, metrics, port=0)
    assert server is None  # 0 turns it off
    server = start_server(state, metrics, port=_free_port())
    assert server is not None
    try:
        state.update(phase="Training", step=7, total_steps=10, loss=1.5, tokens_per_second=321.0)
        state.update(checkpoint={"uri": "s3://b/checkpoints/step-00000005/", "step": 5, "time": "t"})
        metrics.checkpoint_upload.observe(1.2)
        metrics.checkpoint_failures.inc()
        base = f"http://127.0.0.1:{server.port}"
        with pytest.raises(urllib.error.HTTPError) as gone:  # the operator reads reports, not the pod
            urllib.request.urlopen(base + "/progress", timeout=5)
        assert gone.value.code == 404
        text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert "finetune_trainer_step 7.0" in text and "finetune_trainer_loss 1.5" in text
        assert "finetune_trainer_tokens_per_second 321.0" in text
        assert "finetune_trainer_checkpoint_upload_seconds_count 1.0" in text
        assert "finetune_trainer_checkpoint_failures_total 1.0" in text
        assert "finetune_trainer_checkpoint_step 5.0" in text
    finally:
        server.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A real HTTP server recording the reports it gets; answers `first` in turn, then `status`."""

    def __init__(self, status: int = 200, first: tuple[int, ...] = (), port: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.status = status
        self.first = list(first)
        self.got = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                receiver.auth.append(self.headers.get("Authorization"))
                self.send_response(receiver.first.pop(0) if receiver.first else receiver.status)
                self.end_headers()
                receiver.got.set()

            def log_message(self, *_: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/report"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.httpd.shutdown()


def test_reports_carry_the_token_and_an_increasing_sequence(receiver: Receiver, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token-1\n")
    state = ProgressState(step=3, total_steps=10)
    reporter = Reporter(
        receiver.url, state.snapshot, {"name": "j", "namespace": "ns"}, 3600, str(token)
    ).start()
    assert receiver.got.wait(5)
    token.write_text("sa-token-2")  # rotated on disk by the kubelet
    state.update(step=4, phase="Succeeded")
    reporter.close()
    assert [b["sequence"] for b in receiver.bodies] == [1, 2]
    assert receiver.auth == ["Bearer sa-token-1", "Bearer sa-token-2"]
    last = receiver.bodies[-1]
    assert (
        last["step"] == 4 and last["phase"] == "Succeeded" and last["job"] == {"name": "j", "namespace": "ns"}
    )
    assert last["reportedAt"].endswith("Z")


@pytest.mark.parametrize(("first", "sent"), [((503, 503), 3), ((403,), 1), ((503,) * 99, None)])
def test_the_last_report_is_sent_again_only_while_no_leader_takes_it(
    first: tuple[int, ...], sent: int | None
) -> None:
    """503 is a standby replica of the operator (only the leader writes reports): the last report,
    the only one with the samples, goes again; a refusal (403) is final; the retries are bounded in
    time (None: as many as fit)."""
    receiver = Receiver(first=(200, *first))
    try:
        reporter = Reporter(receiver.url, ProgressState(step=9).snapshot, {}, 3600).start()
        assert receiver.got.wait(5)  # the thread's first report, accepted
        began = time.monotonic()
        reporter.close(retry_for=1.0, pause=0.1)
        spent = time.monotonic() - began
    finally:
        receiver.httpd.shutdown()
    if sent is None:
        assert 5 <= len(receiver.bodies) - 1 <= 11 and spent < 2.0
    else:
        assert len(receiver.bodies) - 1 == sent
    assert [b["sequence"] for b in receiver.bodies] == list(range(1, len(receiver.bodies) + 1))
    assert all(b["step"] == 9 for b in receiver.bodies)


def test_the_last_report_is_sent_again_while_no_operator_answers() -> None:
    """The operator restarting (connection refused): the last report goes again, within the bound,
    and reaches it once it listens."""
    port = _free_port()
    reporter = Reporter(f"http://127.0.0.1:{port}/report", ProgressState(step=9).snapshot, {}, 3600)
    receiver: list[Receiver] = []

    def operator_back() -> None:
        time.sleep(0.3)
        r = Receiver(port=port)
        receiver.append(r)

    threading.Thread(target=operator_back).start()
    reporter.start()  # its first send finds no operator
    try:
        reporter.close(retry_for=3.0, pause=0.1)
        assert receiver and [b["step"] for b in receiver[0].bodies] == [9]
    finally:
        for r in receiver:
            r.httpd.shutdown()


def test_report_failures_are_logged_without_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver(status=403)
    token = tmp_path / "token"
    token.write_text("secret-token-value")
    try:
        reporter = Reporter(receiver.url, ProgressState().snapshot, {}, 3600, str(token))
        assert reporter.send_once() is False
        assert reporter.send_once() is False
    finally:
        receiver.httpd.shutdown()
    warnings = [r.getMessage() for r in caplog.records if "progress report" in r.getMessage()]
    assert len(warnings) == 1 and "HTTP 403" in warnings[0]  # at most one a minute
    assert "secret-token-value" not in caplog.text
