"""Live progress: one shared state, reported to the operator (report.py) and served as Prometheus
text on /metrics.

The training loop writes the state through `ProgressState.update`; the HTTP server thread and the
report client read consistent copies through `snapshot`. The operator learns progress from the
reports alone (it never polls the pod), so the endpoint serves only what Prometheus scrapes.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

DEFAULT_PORT = 9090


@dataclass
class ProgressState:
    """What the reports carry. Field names are the wire names of the FineTuneJob status."""

    phase: str = "Starting"
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    diverged: bool = False
    """The latest step's loss was NaN or infinite (reported as a null loss)."""
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    gpu_memory_gib: float | None = None
    """Peak GPU memory reserved: the largest of the ranks'."""
    gpu_memory_per_rank_gib: list[float] | None = None
    """Each rank's peak GPU memory reserved, by rank (data-parallel runs)."""
    ranks: int | None = None
    """Trainer processes (one per GPU) training together."""
    tokens: int = 0
    checkpoint: dict[str, Any] | None = None
    checkpoint_failures: int = 0
    resumed_from_step: int | None = None
    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    batch_plan: str | None = None
    eval_loss: float | None = None
    eval_token_accuracy: float | None = None
    eval_step: int | None = None
    evals_since_best: int | None = None
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    checkpoints: list[dict[str, Any]] | None = None
    """The kept checkpoints, newest first, with their losses (runner.checkpoint_history)."""
    best_checkpoint: dict[str, Any] | None = None
    samples: list[dict[str, Any]] | None = None
    """First lines of the before/after sample answers, once exported."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def update(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                if not hasattr(self, name) or name.startswith("_"):
                    raise AttributeError(name)
                setattr(self, name, value)

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy in the wire format (camelCase)."""
        with self._lock:
            percent = round(100.0 * self.step / self.total_steps, 2) if self.total_steps else None
            return {
                "phase": self.phase,
                "step": self.step,
                "totalSteps": self.total_steps,
                "percent": percent,
                "loss": self.loss,
                "diverged": self.diverged,
                "learningRate": self.learning_rate,
                "tokensPerSecond": self.tokens_per_second,
                "etaSeconds": self.eta_seconds,
                "gpuMemoryGiB": self.gpu_memory_gib,
                "gpuMemoryPerRankGiB": list(self.gpu_memory_per_rank_gib)
                if self.gpu_memory_per_rank_gib is not None
                else None,
                "ranks": self.ranks,
                "tokens": self.tokens,
                "checkpoint": dict(self.checkpoint) if self.checkpoint else None,
                "checkpointFailures": self.checkpoint_failures,
                "resumedFromStep": self.resumed_from_step,
                "batchSize": self.batch_size,
                "gradientAccumulationSteps": self.gradient_accumulation_steps,
                "batchPlan": self.batch_plan,
                "evalLoss": self.eval_loss,
                "evalTokenAccuracy": self.eval_token_accuracy,
                "evalStep": self.eval_step,
                "evalsSinceBest": self.evals_since_best,
                "bestEvalLoss": self.best_eval_loss,
                "bestEvalStep": self.best_eval_step,
                "checkpoints": [dict(c) for c in self.checkpoints] if self.checkpoints is not None else None,
                "bestCheckpoint": dict(self.best_checkpoint) if self.best_checkpoint else None,
                "samples": [dict(x) for x in self.samples] if self.samples is not None else None,
            }


class Metrics:
    """The trainer's Prometheus metrics, in their own registry (no process collectors)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge("finetune_trainer_step", "Optimizer steps done.", registry=r)
        self.total_steps = Gauge("finetune_trainer_total_steps", "Optimizer steps planned.", registry=r)
        self.loss = Gauge("finetune_trainer_loss", "Latest logged training loss.", registry=r)
        self.learning_rate = Gauge("finetune_trainer_learning_rate", "Latest learning rate.", registry=r)
        self.tokens_per_second = Gauge(
            "finetune_trainer_tokens_per_second", "Real (non-padding) tokens per second.", registry=r
        )
        self.tokens = Gauge(
            "finetune_trainer_tokens", "Real tokens trained on, by all ranks together.", registry=r
        )
        self.gpu_memory = Gauge(
            "finetune_trainer_gpu_memory_gib", "Peak GPU memory reserved (GiB).", registry=r
        )
        self.eval_loss = Gauge(
            "finetune_trainer_eval_loss", "Latest loss on the validation rows.", registry=r
        )
        self.checkpoint_step = Gauge(
            "finetune_trainer_checkpoint_step", "Step of the newest complete checkpoint.", registry=r
        )
        self.checkpoint_upload = Histogram(
            "finetune_trainer_checkpoint_upload_seconds",
            "Time from saving a checkpoint to its manifest being stored.",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "finetune_trainer_checkpoint_failures",
            "Checkpoint upload attempts that failed, retries included.",
            registry=r,
        )

    def observe(self, state: dict[str, Any]) -> None:
        """Copy a progress snapshot into the gauges."""
        self.step.set(state["step"])
        self.tokens.set(state["tokens"])
        for gauge, key in (
            (self.total_steps, "totalSteps"),
            (self.loss, "loss"),
            (self.learning_rate, "learningRate"),
            (self.tokens_per_second, "tokensPerSecond"),
            (self.gpu_memory, "gpuMemoryGiB"),
            (self.eval_loss, "evalLoss"),
        ):
            if state[key] is not None:
                gauge.set(state[key])
        if state["checkpoint"]:
            self.checkpoint_step.set(state["checkpoint"]["step"])


def port_from_env() -> int:
    """FINETUNE_PROGRESS_PORT (default 9090; 0 turns the endpoint off)."""
    raw = os.environ.get("FINETUNE_PROGRESS_PORT", str(DEFAULT_PORT))
    try:
        return int(raw)
    except ValueError:
        log.warning("FINETUNE_PROGRESS_PORT=%r is not a port number; progress endpoint off", raw)
        return 0


class ProgressServer:
    """The HTTP endpoint in a daemon thread."""

    def __init__(self, state: ProgressState, metrics: Metrics, port: int, host: str = "0.0.0.0") -> None:
        handler = _handler(state, metrics)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="progress-http", daemon=True)

    def start(self) -> ProgressServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_server(state: ProgressState, metrics: Metrics, port: int) -> ProgressServer | None:
    """Start the endpoint on `port` (0: off). A port in use is logged, never fatal."""
    if port == 0:
        return None
    try:
        server = ProgressServer(state, metrics, port).start()
    except OSError as e:
        log.warning("progress endpoint not started on port %d: %s", port, e)
        return None
    log.info("metrics endpoint on port %d (/metrics)", server.port)
    return server


def _handler(state: ProgressState, metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path != "/metrics":
                self.send_error(404, "try /metrics")
                return
            metrics.observe(state.snapshot())
            body = generate_latest(metrics.registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes every few seconds would flood the training log

    return Handler
