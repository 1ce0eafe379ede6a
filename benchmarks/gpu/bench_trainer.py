"""(a) Our trainer, end to end: `python -m finetune_trainer run job.yaml` on a generated job.

Figures come from the trainer's own JSON log: each progress line carries the step, the cumulative
real-token count (attention-mask sum, or every token of a padding-free row) and a timestamp; the
summary file carries peak GPU memory (max_memory_reserved). Time to first step is from starting the
process to the first step's progress line (preflight, load, patching and one step).

    python bench_trainer.py MODEL_DIR DATA_DIR OUT.json medical:2x4:10 alpaca:auto:9 medical:auto:ckpt

A configuration is data:BATCH:steps; BATCH is RxA (rows x accumulation) or `auto`; `ckpt` as steps
runs the checkpoint-cost scenario against a local S3 server (moto) with the automatic config.
BENCH_DEVICE=cpu checks the harness itself on a CPU (with prepare.py's `tiny` shape).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
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


def job_spec(model: Path, data: Path, batch: str, steps: int, storage: dict[str, Any]) -> dict[str, Any]:
    rows, accumulation = ("auto", 4) if batch == "auto" else (int(x) for x in batch.split("x"))
    return {
        "model": {"path": str(model), "maxSeqLength": 2048},
        "data": {"path": str(data)},
        "template": {"type": "custom", "format": "{text}"},
        "training": {"batchSize": rows, "gradientAccumulationSteps": accumulation, "maxSteps": steps},
        "checkpoint": {
            "everySteps": CHECKPOINT_EVERY if storage.get("uri", "").startswith("s3") else 10000,
            "everyMinutes": 1440,
        },
        "export": {"gguf": [], "verifyTokens": 0},
        "storage": storage,
    }


def stamp(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["time"]).timestamp()


def run_trainer(
    job: Path, workdir: Path, env: dict[str, str], on_progress: Any = None
) -> tuple[float, list[dict[str, Any]], dict[str, Any], int]:
    """(wall start, JSON log lines, summary, exit code); `on_progress(line, process)` sees progress lines."""
    summary = workdir / "summary.json"
    env = {**env, "FINETUNE_WORKDIR": str(workdir / "work"), "FINETUNE_SUMMARY_PATH": str(summary)}
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
    log = (workdir / "trainer.log").open("w")
    assert proc.stderr is not None
    for raw in proc.stderr:
        log.write(raw)
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        lines.append(line)
        if on_progress is not None and line.get("event") == "progress":
            on_progress(line, proc)
    code = proc.wait()
    log.close()
    return started, lines, json.loads(summary.read_text()) if summary.is_file() else {}, code


def measure(
    shape: dict[str, Any],
    data: str,
    *,
    started: float,
    lines: list[dict[str, Any]],
    summary: dict[str, Any],
    stalled: frozenset[int] = frozenset(),
) -> common.Result:
    """Steady-state figures from the log; steps in `stalled` (their interval holds a checkpoint save)
    are left out of the tokens/s window and reported as the checkpoint stall instead."""
    progress = [x for x in lines if x.get("event") == "progress"]
    if len(progress) <= common.WARMUP_STEPS + 1:
        tail = [x.get("msg") for x in lines[-5:]]
        raise RuntimeError(f"trainer logged {len(progress)} steps; last lines: {tail}")
    times = [stamp(x) for x in progress]
    totals = [int(x["tokens"]) for x in progress]
    kept = [
        (times[i] - times[i - 1], totals[i] - totals[i - 1])
        for i in range(common.WARMUP_STEPS, len(progress))
        if progress[i]["step"] not in stalled
    ]
    seconds = sum(k[0] for k in kept) / len(kept)
    tokens = sum(k[1] for k in kept) / len(kept)
    tps = tokens / seconds
    training = next((x["msg"] for x in lines if x.get("msg", "").startswith("training: ")), "")
    attention = next((x["msg"] for x in lines if x.get("msg", "").startswith("varlen attention")), "")
    words = (
        training.split("batch ", 1)[1].split() if "batch " in training else ["0", "x", "accumulation", "0"]
    )
    rows, accumulation = int(words[0]), int(words[3])
    return common.Result(
        engine="ours",
        shape=shape["shape"],
        data=data,
        batch=rows,
        accumulation=accumulation,
        attention="varlen" if "FlashAttention" in attention else "plain",
        steps=len(progress),
        tokens_per_second=round(tps, 1),
        mfu_pct=common.mfu_pct(shape["params"], tps),
        peak_reserved_gib=float(summary.get("peakGpuMemoryGiB") or progress[-1].get("gpuMemoryGiB") or 0),
        peak_allocated_gib=None,
        tokens_per_step=round(tokens),
        seconds_per_step=round(seconds, 3),
        time_to_first_step_s=round(times[0] - started, 1),
        losses=[round(float(x["loss"]), 4) for x in progress],
        note=training,
    )


def checkpoint_cost(
    shape: dict[str, Any], model: Path, data_dir: Path, data: str, *, root: Path, env: dict[str, str]
) -> tuple[dict[str, Any], common.Result]:
    """Step stall of background checkpoints and SIGTERM-to-last-byte against moto's S3 server, on a
    run with the automatic config: checkpoints every CHECKPOINT_EVERY steps, SIGTERM once step
    SIGTERM_AFTER_STEP is logged. The same run's other steps give its steady-state tokens/s."""
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
    workdir = root / "ckpt"
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / "job.yaml"
    storage = {"uri": "s3://bench/run", "endpoint": endpoint, "region": "us-east-1"}
    job.write_text(yaml.safe_dump(job_spec(model, data_dir / f"{data}.jsonl", "auto", 1000, storage)))
    signal_at: dict[str, float] = {}

    def on_progress(line: dict[str, Any], proc: subprocess.Popen[str]) -> None:
        if line["step"] == SIGTERM_AFTER_STEP and "time" not in signal_at:
            signal_at["time"] = time.time()
            proc.send_signal(signal.SIGTERM)

    started, lines, summary, code = run_trainer(job, workdir, {**env, **creds}, on_progress)
    exited = time.time()
    manifests: dict[int, float] = {}
    for obj in s3.list_objects_v2(Bucket="bench", Prefix="run/checkpoints/").get("Contents", []):
        key = obj["Key"]
        if key.endswith("/manifest.json"):
            manifests[int(key.split("step-")[1].split("/")[0])] = obj["LastModified"].timestamp()
    progress = [x for x in lines if x.get("event") == "progress"]
    times = {x["step"]: stamp(x) for x in progress}
    intervals = {s: times[s] - times[s - 1] for s in times if s - 1 in times}
    # The save after step s runs before step s+1 starts, so it lands in the interval ending at s+1.
    stalled = {s + 1 for s in range(CHECKPOINT_EVERY, SIGTERM_AFTER_STEP, CHECKPOINT_EVERY)}
    plain = [v for s, v in intervals.items() if s not in stalled and s > common.WARMUP_STEPS]
    base = statistics.median(plain) if plain else float("nan")
    stalls = [round(intervals[s] - base, 2) for s in sorted(stalled) if s in intervals]
    last_step = max(manifests) if manifests else None
    sizes = (
        s3.list_objects_v2(Bucket="bench", Prefix=f"run/checkpoints/step-{last_step:08d}/")
        if last_step
        else {}
    )
    server.stop()
    result = measure(shape, data, started=started, lines=lines, summary=summary, stalled=frozenset(stalled))
    left_out = f"checkpoints every {CHECKPOINT_EVERY} steps (their steps left out)"
    result.note += f"; {left_out}, SIGTERM after step {SIGTERM_AFTER_STEP}"
    return {
        "exit_code": code,
        "checkpoint_steps": sorted(manifests),
        "checkpoint_bytes": sum(o["Size"] for o in sizes.get("Contents", [])) if sizes else None,
        "median_step_s": round(base, 3),
        "stall_s": stalls,
        "checkpoint_stall_s": max(stalls) if stalls else None,
        # S3 LastModified has one-second resolution on moto: the process exit (after the upload was
        # confirmed) bounds it from above and is what is reported.
        "sigterm_to_manifest_s": round(manifests[last_step] - signal_at["time"], 2) if last_step else None,
        "sigterm_to_exit_s": round(exited - signal_at["time"], 2) if signal_at else None,
        "summary": {k: summary.get(k) for k in ("exitReason", "checkpointStep", "checkpointUri", "steps")},
    }, result


def main() -> None:
    model, data_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    shape = json.loads((model / "bench-params.json").read_text())
    root = Path("/tmp/bench-trainer") / shape["shape"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer-image"), os.environ.get("PYTHONPATH", "")]),
    }
    results: list[common.Result] = []
    for index, spec in enumerate(sys.argv[4:]):
        data, batch, steps = spec.split(":")
        if steps == "ckpt":
            cost, result = checkpoint_cost(shape, model, data_dir, data, root=root, env=env)
            print(json.dumps(cost), flush=True)
            (out.parent / f"checkpoint-{shape['shape']}.json").write_text(json.dumps(cost, indent=1))
            print(json.dumps(result.as_dict()), flush=True)
            common.append_results(out, [result])
            continue
        workdir = root / f"{index}-{data}-{batch}"
        workdir.mkdir(parents=True, exist_ok=True)
        job = workdir / "job.yaml"
        storage = {"uri": str(workdir / "store")}
        job.write_text(
            yaml.safe_dump(job_spec(model, data_dir / f"{data}.jsonl", batch, int(steps), storage))
        )
        started, lines, summary, code = run_trainer(job, workdir, env)
        if code != 0:
            print(f"trainer exited {code}; log in {workdir / 'trainer.log'}", flush=True)
            print((workdir / "trainer.log").read_text()[-3000:], flush=True)
            continue
        result = measure(shape, data, started=started, lines=lines, summary=summary)
        results.append(result)
        print(json.dumps(result.as_dict()), flush=True)
        common.append_results(out, [result])


if __name__ == "__main__":
    main()
