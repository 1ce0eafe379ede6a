"""`python -m finetune_operator run`: HTTP endpoints, leader election, kopf, periodic resync.

Every replica serves /healthz, /readyz, /metrics and the progress endpoint; only the Lease holder
(or the only replica, without leader election) runs the kopf watches and reconciles, and so only it
accepts progress reports (the reconcile writes them to status; a standby answers 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

import kopf
from aiohttp import web
from finetune_trainer.logs import JsonFormatter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from finetune_operator.config import ConfigFileError, OperatorConfig, load_config
from finetune_operator.handlers import Controller, register
from finetune_operator.jobbuilder import resolved_storage
from finetune_operator.kube import Kube, load_client_config
from finetune_operator.leader import LeaderElector, LostLeadershipError
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.progress_server import Authenticator, ProgressBook, ProgressService, RateLimiter

log = logging.getLogger("finetune_operator")


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("FINETUNE_OPERATOR_LOG_LEVEL", "INFO"))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    # kopf logs "Handler ... succeeded" at INFO for every watch event of every Job and Pod (most of
    # the log, saying nothing); its warnings and errors still show.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)


class Health:
    """Liveness: the event loop answers and kopf (when leading) has not died.
    Readiness: the endpoints are up and, when leading, kopf is ready."""

    def __init__(self) -> None:
        self.kopf_task: asyncio.Task[None] | None = None
        self.kopf_ready = asyncio.Event()
        self.leading = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    async def healthz(self, _: web.Request) -> web.Response:
        if self.kopf_task is not None and self.kopf_task.done():
            return web.Response(status=503, text="controller stopped\n")
        return web.Response(text="ok\n")

    async def readyz(self, _: web.Request) -> web.Response:
        if self.leading and not self.kopf_ready.is_set():
            return web.Response(status=503, text="controller starting\n")
        return web.Response(text="ok\n")


def metrics_app(metrics: OperatorMetrics) -> web.Application:
    async def serve(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", serve)
    return app


async def _serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def run(cfg: OperatorConfig, stop: asyncio.Event | None = None) -> int:
    """Run until `stop` is set or a signal arrives (0), or leadership is lost (1)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    load_client_config()
    kube = Kube()
    metrics = OperatorMetrics()
    book = ProgressBook()
    controller = Controller(cfg, kube, metrics, book)
    health = Health()
    progress = ProgressService(
        Authenticator(kube, cfg.report_audience, on_review=metrics.token_reviews.inc),
        metrics,
        book,
        controller,
        interval=cfg.status_write_interval_seconds,
        storage_prefix=lambda ftj: resolved_storage(ftj, cfg)["uri"],
        limiter=RateLimiter(cfg.report_rate_per_second, cfg.report_burst),
        leading=lambda: health.leading,
    )
    runners = [
        await _serve(health.app(), cfg.ports.health),
        await _serve(metrics_app(metrics), cfg.ports.metrics),
        await _serve(progress.app(), cfg.ports.progress),
    ]
    tasks: list[asyncio.Task[Any]] = []
    stopper = loop.create_task(stop.wait())
    code = 0
    try:
        elector = None
        if cfg.leader_election.enabled:
            identity = f"{socket.gethostname()}_{os.getpid()}"
            elector = LeaderElector(kube, cfg.leader_election, identity)
            acquire = loop.create_task(elector.acquire())
            await asyncio.wait([acquire, stopper], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                acquire.cancel()
                return 0
            tasks.append(loop.create_task(elector.hold()))
        health.leading = True
        registry = kopf.OperatorRegistry()
        register(registry, cfg)
        kopf_stop = asyncio.Event()
        health.kopf_task = loop.create_task(
            kopf.operator(
                registry=registry,
                standalone=True,
                clusterwide=not cfg.namespaces,
                namespaces=cfg.namespaces,
                stop_flag=kopf_stop,
                ready_flag=health.kopf_ready,
                memo=kopf.Memo(controller=controller),
            )
        )
        tasks.append(loop.create_task(controller.resync()))
        watched = [health.kopf_task, stopper, *tasks]
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and task.exception():
                exc = task.exception()
                if isinstance(exc, LostLeadershipError):
                    log.error("lost leadership; exiting so a fresh process becomes a standby")
                elif task is health.kopf_task:
                    # Not silent: kopf stops at once on, for example, a user without a passwd entry.
                    log.error("kopf stopped: %r", exc)
                else:
                    log.error("background task failed: %r", exc)
                code = 1
        kopf_stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(health.kopf_task, timeout=10)
        return code
    finally:
        for task in [*tasks, stopper]:
            task.cancel()
        for runner in runners:
            await runner.cleanup()


def main() -> int:
    configure_logging()
    try:
        cfg = load_config()
    except ConfigFileError as e:
        log.error("configuration: %s", e)
        return 2
    return asyncio.run(run(cfg))
