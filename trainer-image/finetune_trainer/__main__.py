"""`python -m finetune_trainer run|preflight JOB.yaml`: the same job.yaml as on the cluster."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from finetune_trainer import logs
from finetune_trainer.errors import EXIT_CONFIG_ERROR, ConfigError

log = logging.getLogger("finetune_trainer")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune_trainer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="preflight, train (resuming from the newest checkpoint), export")
    run.add_argument("job", help="FineTuneJob manifest or its bare spec (YAML)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pre = sub.add_parser("preflight", help="check tokenizer, data and template; print length figures")
    pre.add_argument("job", help="FineTuneJob manifest or its bare spec (YAML)")
    for command in (run, pre):
        command.add_argument("--log-format", default="auto", choices=["auto", "json", "text"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    json_lines = logs.setup({"auto": None, "json": True, "text": False}[args.log_format])
    from finetune_trainer.jobfile import load_job

    try:
        job = load_job(args.job)
    except ConfigError as e:
        log.error("config error: %s", e, extra={"fields": {"field": e.field}})
        if args.command == "run":  # the pod's termination message: status names the field
            from finetune_trainer import summary

            summary.write({"exitReason": "config-error", "message": str(e)})
        return EXIT_CONFIG_ERROR
    if args.command == "preflight":
        return _preflight(job)
    if "LOCAL_RANK" not in os.environ:  # not a rank torchrun started: maybe the launcher
        launched = _launch(job, argv if argv is not None else sys.argv[1:], args.device)
        if launched is not None:
            return launched
    from finetune_trainer.runner import run

    return run(job, args.device, json_lines)


def _launch(job: object, argv: list[str], device_request: str) -> int | None:
    """One process per GPU through torchrun when FINETUNE_NPROC_PER_NODE asks for it (launch.py):
    the ranks' combined exit code, or None to train in this process."""
    from finetune_trainer import engines, launch, summary

    try:
        device = engines.detect_device(device_request)
        visible = _visible_gpus() if device == "cuda" else 0
        plan = launch.plan(device, visible, os.environ)
    except ConfigError as e:
        log.error("config error: %s", e, extra={"fields": {"field": e.field}})
        summary.write({"exitReason": "config-error", "message": str(e)})
        return EXIT_CONFIG_ERROR
    if plan is None:
        return None
    grace = job.spec.checkpoint.grace_period_seconds  # type: ignore[attr-defined]
    return launch.run_ranks(argv, plan, grace)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _preflight(job: object) -> int:
    import tempfile
    from pathlib import Path

    from finetune_trainer import preflight

    with tempfile.TemporaryDirectory(prefix="finetune-preflight-") as tmp:
        try:
            checked = preflight.check(job.spec, Path(tmp), tokenizer_only=True)  # type: ignore[attr-defined]
        except ConfigError as e:
            log.error("config error: %s", e, extra={"fields": {"field": e.field}})
            return EXIT_CONFIG_ERROR
    print(preflight.report(checked.data.stats, checked.validation_stats))
    return 0


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown. When `main` returns the run is over (summary
    written, uploads waited for, reporter closed); what remains is garbage-collecting torch's and
    transformers' object graphs, which took 1 to 35 s on a busy node: time a SIGTERMed pod does not
    have, its grace period being for the emergency checkpoint (the kubelet SIGKILLed trainers that
    had checkpointed and written their summary, turning exit 143 into 137)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
