"""(a) Our trainer, end to end: `python -m finetune_trainer run job.yaml`, as a pod runs it.

    python bench_trainer.py MODEL_DIR DATA_DIR OUT_DIR ttm ckpt

Scenarios:
- `start`: a short large-step run (6 steps of 32 medical rows, no export): the time to the first
  step, phase by phase, and the memory of a micro-batch whose activations are all kept.
- `ttm` (time to model): the seeds' medical recipe (the first 500 medical rows, batchSize 2 x
  gradientAccumulationSteps 4, 60 steps, the spec's defaults otherwise: microBatches and
  gradientCheckpointing `auto`, export q8_0 verified on 16 tokens) into a local store folder. From
  process start: time to the first step, steady-state tokens/s, the export's stages, and time to
  the q8_0 GGUF in the store (`export: gguf-q8_0 done`, logged once the file is stored).
- `ckpt` then resume: the same recipe on all 6,000 medical rows against moto's S3 server,
  checkpoints every 5 steps, SIGTERM once step 11 is logged and the 4-bit weight cache is stored;
  then a second process on the same storage (a pod that replaces the preempted one) that resumes,
  loads the cached 4-bit weights and is stopped after its first step. Figures: the stall of a
  checkpoint step, SIGTERM to the process's exit (the checkpoint confirmed in S3), and resume to
  the first step.

Each process gets fresh compile caches (Triton, Unsloth), as a new pod has. Figures come from the
trainer's JSON log (timestamps of its lines) and its summary; OUT_DIR gets ttm.json and ckpt.json.
BENCH_DEVICE=cpu checks the harness itself on a CPU (prepare.py's `tiny` shape).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CHECKPOINT_EVERY = 5
SIGTERM_AFTER_STEP = 11


def job_spec(model: Path, data: Path, storage: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"path": str(model), "maxSeqLength": 2048},
        "data": {"path": str(data)},
        "template": {"type": "custom", "format": "{text}"},
        "training": {"batchSize": 2, "gradientAccumulationSteps": 4, "maxSteps": 60},
        "checkpoint": {"everySteps": 0, "everyMinutes": 1440},
        "storage": storage,
    }
    for section, values in overrides.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def stamp(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["time"]).timestamp()


def run_trainer(
    job: Path, workdir: Path, env: dict[str, str], on_line: Any = None
) -> tuple[float, list[dict[str, Any]], dict[str, Any], int]:
    """(wall start, JSON log lines, summary, exit code); `on_line(line, process)` sees every line."""
    summary = workdir / "summary.json"
    caches = Path(tempfile.mkdtemp(prefix="caches-", dir=workdir))
    env = {
        **env,
        "FINETUNE_WORKDIR": str(workdir / "work"),
        "FINETUNE_SUMMARY_PATH": str(summary),
        "TRITON_CACHE_DIR": str(caches / "triton"),
        "UNSLOTH_COMPILE_LOCATION": str(caches / "unsloth"),
    }
    started = time.time()
    device = os.environ.get("BENCH_DEVICE", "cuda")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "finetune_trainer",
            "run",
            str(job),
            "--device",
            device,
            "--log-format",
            "json",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=workdir,
    )
    lines: list[dict[str, Any]] = []
    assert proc.stderr is not None
    with (workdir / "trainer.log").open("w") as log:
        for raw in proc.stderr:
            log.write(raw)
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            line["t"] = stamp(line)
            lines.append(line)
            if on_line is not None:
                on_line(line, proc)
    code = proc.wait()
    return started, lines, json.loads(summary.read_text()) if summary.is_file() else {}, code


def first(lines: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    return next((x for x in lines if x.get("msg", "").startswith(prefix)), None)


def progress_of(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [x for x in lines if x.get("event") == "progress"]


def steady(progress: list[dict[str, Any]], skip: frozenset[int] = frozenset()) -> tuple[float, float, float]:
    """(tokens/s, tokens per step, seconds per step) over the steps after the warm-up, leaving out
    the step intervals in `skip` (those that hold a checkpoint save)."""
    kept = [
        (b["t"] - a["t"], b["tokens"] - a["tokens"])
        for a, b in itertools.pairwise(progress)
        if b["step"] > common.WARMUP_STEPS and b["step"] not in skip
    ]
    seconds = sum(k[0] for k in kept) / len(kept)
    tokens = sum(k[1] for k in kept) / len(kept)
    return tokens / seconds, tokens, seconds


def phases(started: float, lines: list[dict[str, Any]]) -> dict[str, float | None]:
    """Seconds from process start to each milestone the trainer logs."""
    marks = {
        "preflight": "preflight ok",
        "unsloth_imported": "unsloth imported",
        "base_loaded": "base loaded",
        "model_loaded": "model loaded",
        "first_step": None,
    }
    out: dict[str, float | None] = {}
    for name, prefix in marks.items():
        line = progress_of(lines)[0] if prefix is None and progress_of(lines) else first(lines, prefix or "")
        out[name] = round(line["t"] - started, 1) if line else None
    return out


def ttm(model: Path, data_dir: Path, root: Path, env: dict[str, str]) -> dict[str, Any]:
    workdir = root / "ttm"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = (data_dir / "medical.jsonl").read_text().splitlines()[:500]
    (workdir / "medical500.jsonl").write_text("\n".join(rows) + "\n")
    job = workdir / "job.yaml"
    spec = job_spec(model, workdir / "medical500.jsonl", {"uri": str(workdir / "store")})
    job.write_text(yaml.safe_dump(spec))
    started, lines, summary, code = run_trainer(job, workdir, env)
    progress = progress_of(lines)
    if code != 0 or not progress:
        raise RuntimeError(f"ttm: trainer exited {code}; {[x.get('msg') for x in lines[-5:]]}")
    tps, per_step, seconds = steady(progress)
    done = first(lines, "export: gguf-q8_0 done")
    state_file = workdir / "store" / "export" / "state.json"
    stages = json.loads(state_file.read_text())["stages"] if state_file.is_file() else {}
    shutil.rmtree(workdir / "store", ignore_errors=True)  # two 8.5 GB GGUFs: the disk is 64 GB
    shutil.rmtree(workdir / "work", ignore_errors=True)
    return {
        "exit_code": code,
        "steps": len(progress),
        "tokens_per_second": round(tps, 1),
        "tokens_per_step": round(per_step),
        "seconds_per_step": round(seconds, 3),
        "mfu_pct": common.mfu_pct(json.loads((model / "bench-params.json").read_text())["params"], tps),
        "losses": [round(float(x["loss"]), 5) for x in progress],
        "phases_s": phases(started, lines),
        "time_to_first_step_s": round(progress[0]["t"] - started, 1),
        "train_end_s": round(progress[-1]["t"] - started, 1),
        "export_stage_s": {k: round(v.get("seconds", 0.0), 1) for k, v in stages.items()},
        "export_default_s": round(done["t"] - progress[-1]["t"], 1) if done else None,
        "export_check": {
            k: [v.get("meanLogProbDelta"), v.get("maxLogProbDelta")]
            for k, v in stages.items()
            if "maxLogProbDelta" in v
        },
        "time_to_model_s": round(done["t"] - started, 1) if done else None,
        "exited_s": round(time.time() - started, 1),
        "plan": first(lines, "step split") and first(lines, "step split")["msg"],
        "activations": first(lines, "activations") and first(lines, "activations")["msg"],
        "peak_gpu_gib": summary.get("peakGpuMemoryGiB"),
        "artifacts": {a["name"]: a["sizeBytes"] for a in summary.get("artifacts", [])},
    }


def start(model: Path, data_dir: Path, root: Path, env: dict[str, str]) -> dict[str, Any]:
    """A short large-step run (medical, batchSize 32, 6 steps, no export): where the time to the
    first step goes, and the memory of a micro-batch whose activations are all kept."""
    workdir = root / "start"
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / "job.yaml"
    spec = job_spec(
        model,
        data_dir / "medical.jsonl",
        {"uri": str(workdir / "store")},
        training={"batchSize": 32, "gradientAccumulationSteps": 1, "maxSteps": 6},
        export={"gguf": []},
    )
    job.write_text(yaml.safe_dump(spec))
    started, lines, summary, code = run_trainer(job, workdir, env)
    progress = progress_of(lines)
    return {
        "exit_code": code,
        "phases_s": phases(started, lines),
        "step_s": [round(b["t"] - a["t"], 2) for a, b in itertools.pairwise(progress)],
        "tokens_per_step": [b["tokens"] - a["tokens"] for a, b in itertools.pairwise(progress)],
        "activations": first(lines, "activations") and first(lines, "activations")["msg"],
        "peak_gpu_gib": summary.get("peakGpuMemoryGiB"),
        "layers_kept": summary.get("activationLayersKept"),
        "last_lines": [x.get("msg") for x in lines[-3:]] if code else None,
    }


def ckpt(model: Path, data_dir: Path, root: Path, env: dict[str, str]) -> dict[str, Any]:
    """Checkpoint stall and SIGTERM to S3 on one run, then resume to the first step on a second."""
    import boto3
    from moto.server import ThreadedMotoServer

    creds = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(creds)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="bench")
    storage = {"uri": "s3://bench/run", "endpoint": endpoint, "region": "us-east-1"}
    spec = job_spec(
        model,
        data_dir / "medical.jsonl",
        storage,
        training={"maxSteps": 1000},
        checkpoint={"everySteps": CHECKPOINT_EVERY},
        export={"gguf": []},
    )
    signalled: dict[str, float] = {}
    cache_stored: dict[str, float] = {}

    def stop_when_ready(line: dict[str, Any], proc: subprocess.Popen[str]) -> None:
        if line.get("msg", "").startswith("4-bit weight cache: stored"):
            cache_stored["t"] = line["t"]
        step = line.get("step") if line.get("event") == "progress" else None
        # SIGTERM after step 11, once the weight cache is stored (the resumed pod is to find it)
        if (
            step
            and step >= SIGTERM_AFTER_STEP
            and "t" not in signalled
            and ("t" in cache_stored or step >= 200 or os.environ.get("BENCH_DEVICE") == "cpu")
        ):
            signalled["t"], signalled["step"] = time.time(), step
            proc.send_signal(signal.SIGTERM)

    workdir = root / "ckpt"
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    started, lines, summary, code = run_trainer(job, workdir, {**env, **creds}, stop_when_ready)
    exited = time.time()
    progress = progress_of(lines)
    times = {x["step"]: x["t"] for x in progress}
    intervals = {s: times[s] - times[s - 1] for s in times if s - 1 in times}
    # The save after step s runs before step s+1 starts, so it lands in the interval ending at s+1.
    saved = [s for s in range(CHECKPOINT_EVERY, signalled.get("step", 0), CHECKPOINT_EVERY)]
    stalled = frozenset(s + 1 for s in saved)
    plain = [v for s, v in intervals.items() if s not in stalled and s > common.WARMUP_STEPS]
    base = statistics.median(plain) if plain else float("nan")
    stalls = [round(intervals[s] - base, 2) for s in sorted(stalled) if s in intervals]

    def stop_after_first(line: dict[str, Any], proc: subprocess.Popen[str]) -> None:
        if line.get("event") == "progress" and "t" not in resumed_stop:
            resumed_stop["t"] = time.time()
            proc.send_signal(signal.SIGTERM)

    resumed_stop: dict[str, float] = {}
    workdir2 = root / "resume"
    workdir2.mkdir(parents=True, exist_ok=True)
    started2, lines2, _summary2, code2 = run_trainer(job, workdir2, {**env, **creds}, stop_after_first)
    progress2 = progress_of(lines2)
    resume = first(lines2, "resuming from")
    base_line = first(lines2, "base loaded")
    server.stop()
    tps, _per_step, seconds = steady(progress, stalled)
    return {
        "exit_code": code,
        "signalled_after_step": signalled.get("step"),
        "cache_stored_s": round(cache_stored["t"] - started, 1) if cache_stored else None,
        "checkpoint_steps": saved,
        "median_step_s": round(base, 3),
        "stall_s": stalls,
        "checkpoint_stall_s": max(stalls) if stalls else None,
        "sigterm_to_s3_s": round(exited - signalled["t"], 2) if signalled else None,
        "checkpoint_step": summary.get("checkpointStep"),
        "tokens_per_second": round(tps, 1),
        "seconds_per_step": round(seconds, 3),
        "resume_exit_code": code2,
        "resumed_from": resume["msg"] if resume else None,
        "resume_weight_cache": base_line.get("weightCache") if base_line else None,
        "resume_phases_s": phases(started2, lines2),
        "resume_to_first_step_s": round(progress2[0]["t"] - started2, 1) if progress2 else None,
        "resume_first_step": progress2[0]["step"] if progress2 else None,
    }


def main() -> None:
    model, data_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer-image"), os.environ.get("PYTHONPATH", "")]),
    }
    for scenario in sys.argv[4:]:
        figures = {"start": start, "ttm": ttm, "ckpt": ckpt}[scenario](model, data_dir, root, env)
        (out / f"{scenario}.json").write_text(json.dumps(figures, indent=1))
        print(json.dumps({k: v for k, v in figures.items() if k != "losses"}), flush=True)


if __name__ == "__main__":
    main()
