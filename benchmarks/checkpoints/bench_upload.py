"""Upload time of one 8B-shape checkpoint (about 260 MB) through CheckpointUploader to a local S3.

    python benchmarks/checkpoints/bench_upload.py [--runs 3] [--json out.json]

The checkpoint folder has the files of a Hugging Face Trainer checkpoint of a rank-16 LoRA on all
seven linear layers of a Llama-3.1-8B-shaped model (41,943,040 adapter parameters): the adapter in
bf16 (84 MB), the optimizer state (AdamW's two moments at the adapter's width, 168 MB), the
tokenizer (9 MB) and the small files (scheduler, RNG state, trainer state, configs). Bytes are
random: nothing in the path compresses.

The S3 server is moto's (tests/s3server.py) in a process of its own, as a real server would be;
the uploader, its hashing and boto3 run in this one. Each run submits the folder as a new step
and times submit -> complete manifest (staging, sha256 of every file, the uploads, the manifest,
pruning), the figure the trainer reports as `checkpoint_upload_seconds`; the sha256 pass is timed
apart so the transfer's own share shows. Printed: seconds and MB/s per run and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "trainer-image"), str(ROOT / "tests")]

import boto3  # noqa: E402
from finetune_trainer.checkpoints import CheckpointUploader, describe_files  # noqa: E402
from finetune_trainer.storage import S3Store  # noqa: E402
from s3server import TEST_CREDENTIALS  # noqa: E402

ADAPTER_PARAMS = 41_943_040
"""Rank 16 on q, k, v, o, gate, up, down of 32 layers (hidden 4096, KV 1024, MLP 14336)."""

FILES = {
    "adapter_model.safetensors": ADAPTER_PARAMS * 2,
    "optimizer.pt": ADAPTER_PARAMS * 2 * 2,
    "tokenizer.json": 9_085_657,
    "tokenizer_config.json": 50_977,
    "rng_state.pth": 14_244,
    "training_args.bin": 5_688,
    "trainer_state.json": 5_012,
    "README.md": 5_103,
    "scheduler.pt": 1_064,
    "adapter_config.json": 812,
    "special_tokens_map.json": 325,
}

SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from s3server import start_moto_server
endpoint, stop = start_moto_server()
print(endpoint, flush=True)
sys.stdin.read()
stop()
"""


def make_checkpoint(folder: Path) -> int:
    folder.mkdir(parents=True)
    for name, size in FILES.items():
        with open(folder / name, "wb") as f:
            left = size
            while left:
                chunk = min(left, 8 << 20)
                f.write(os.urandom(chunk))
                left -= chunk
    return sum(FILES.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.update(TEST_CREDENTIALS)
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"

    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(ROOT / "tests")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        endpoint = server.stdout.readline().strip()  # type: ignore[union-attr]
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        store = S3Store(f"s3://{bucket}/jobs/bench/ckpt", endpoint=endpoint, region="us-east-1")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "checkpoint"
            total = make_checkpoint(folder)
            hashing = time.monotonic()
            describe_files(folder)
            hash_seconds = time.monotonic() - hashing
            done = threading.Event()
            seconds: list[float] = []

            def on_complete(_ref: object, elapsed: float) -> None:
                seconds.append(elapsed)
                done.set()

            with CheckpointUploader(
                store, "bench", keep_last=1, staging_dir=Path(tmp) / "staging", on_complete=on_complete
            ) as uploader:
                for run in range(args.runs):
                    done.clear()
                    uploader.submit(10 * (run + 1), folder)
                    if not done.wait(600) or uploader.failures:
                        raise SystemExit(f"run {run + 1}: upload failed: {uploader.last_error}")
    finally:
        server.communicate("", timeout=30)

    mb = total / 1e6
    print(f"checkpoint: {len(FILES)} files, {mb:.1f} MB; sha256 of all files alone: {hash_seconds:.2f}s")
    for n, s in enumerate(seconds, 1):
        print(f"run {n}: {s:.2f}s  {mb / s:.1f} MB/s  (without hashing: {s - hash_seconds:.2f}s)")
    median = statistics.median(seconds)
    print(f"median: {median:.2f}s  {mb / median:.1f} MB/s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"bytes": total, "hash_seconds": hash_seconds, "seconds": seconds, "median_seconds": median},
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
