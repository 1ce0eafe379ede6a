"""The images end to end: `hack/images.sh` builds the operator and CPU trainer images (warm: seconds,
from the layer cache in $FINETUNE_CACHE/containers), the operator runs from its image, and the tiny
job's pods run from the CPU trainer image through the test kubelet (`buildah run`: the chart's
non-root users, read-only root file systems, only the Job's writable mounts), through an eviction,
to Succeeded with the GGUF in S3.

The model and the data come from S3 (model.s3, data.s3): a container sees nothing of the test's
files. Figures (apply to pod running, to first step, to Succeeded) are printed and written to
out/e2e-images-figures.json.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from chart_install import installed_chart
from e2e.harness import (
    REPO,
    ImageOperatorProcess,
    Recorder,
    checkpoints_done,
    first_seen,
    install_crd,
    last_step,
    log_lines,
    log_time,
    operator_config,
    pod_running,
    steps,
    tiny_job,
    wait,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.images]

FIGURES = REPO / "out" / "e2e-images-figures.json"
STEPS = 16
EVERY = 4


def image_tags() -> dict[str, str]:
    done = subprocess.run(
        [str(REPO / "hack" / "images.sh"), "tags"], check=True, capture_output=True, text=True
    )
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """The operator and CPU trainer images, built (or found in the layer cache) by hack/images.sh."""
    started = time.monotonic()
    done = subprocess.run(
        [str(REPO / "hack" / "images.sh"), "operator", "trainer-cpu"],
        check=False, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(f"\nhack/images.sh operator trainer-cpu: {time.monotonic() - started:.0f}s\n{done.stdout}")
    return image_tags()


def upload(s3: Any, folder: Path, prefix: str) -> None:
    client = s3.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), s3.bucket, f"{prefix}{path.relative_to(folder)}")


def proc_facts(pid: int) -> dict[str, Any]:
    """What the kernel says about a container's first process: its user and its root mount."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    table = [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]
    root = next(fields for fields in table if fields[4] == "/")
    mounts = [fields[4] for fields in table]
    return {"uids": [int(u) for u in uid], "root_options": root[5].split(","), "mounts": mounts}


def container_facts(cluster: Any, namespace: str, pod: str) -> dict[str, Any]:
    """The running trainer container's process facts, read while it runs."""
    obj = json.loads(cluster.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout)
    kubelet = cluster.kubelet
    with kubelet.lock:
        run = kubelet.runs[obj["metadata"]["uid"]]
    [container] = run.main
    assert container.image_run is not None, "the pod ran as a host process, not from its image"
    assert container.popen is not None
    init = wait("the container's first process", lambda: container.image_run.init_pid(container.popen.pid))
    return proc_facts(init)


def test_operator_and_trainer_images_run_the_tiny_job_through_an_eviction(  # noqa: PLR0917 - fixtures
    images: dict[str, str],
    cluster: Any,
    s3: Any,
    recorder: Recorder,
    tiny_model_dir: Path,
    tiny_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    install_crd(cluster)
    release_ns = cluster.new_namespace("images-system")
    workdir = tmp_path_factory.mktemp("image-operator")
    upload(s3, tiny_model_dir, "inputs/tiny-model/")
    s3.client().upload_file(str(tiny_data), s3.bucket, "inputs/rows.jsonl")
    figures: dict[str, Any] = {}
    with installed_chart(cluster, workdir, "--set", "replicas=2", namespace=release_ns) as chart:
        election = {"enabled": True, "namespace": release_ns, "leaseName": chart["fullname"],
                    "leaseDurationSeconds": 6, "renewSeconds": 2}  # fmt: skip
        config = operator_config(s3, leaderElection=election, defaultImage=images["trainer-cpu"])
        operator = ImageOperatorProcess(images["operator"], chart["sa"], config, workdir)
        started = time.monotonic()
        try:
            operator.start()
            figures["operator_start_to_ready_s"] = round(time.monotonic() - started, 2)
            ns = cluster.new_namespace("images")
            cluster.apply(s3.secret(ns))
            name = "tiny-from-images"
            job = tiny_job(
                name,
                tiny_model_dir,
                tiny_data,
                model={"s3": f"s3://{s3.bucket}/inputs/tiny-model/", "maxSeqLength": 256},
                data={"s3": f"s3://{s3.bucket}/inputs/rows.jsonl"},
                lora={"r": 8, "alpha": 16, "gradientCheckpointing": "false"},
                training={"batchSize": 2, "gradientAccumulationSteps": 1, "maxSteps": STEPS,
                          "warmupSteps": 2, "learningRate": 1e-3, "optimizer": "adamw_torch"},
                checkpoint={"everySteps": EVERY, "keepLast": 2, "gracePeriodSeconds": 30},
                export={"gguf": ["q8_0"]},
            )  # fmt: skip
            job["metadata"]["namespace"] = ns
            applied, applied_wall = time.monotonic(), time.time()
            cluster.apply(job)

            def running_pod(exclude: tuple[str, ...] = ()) -> tuple[str, Any] | None:
                for pod, versions in recorder.pod_history(ns, name).items():
                    seen = first_seen(versions, pod_running) if pod not in exclude else None
                    if seen is not None:
                        return pod, seen
                return None

            def trainer_log(pod: str) -> list[dict[str, Any]]:
                return log_lines(cluster.kubelet.log_path(ns, pod, "trainer"))

            first, seen = wait("a running pod", running_pod, timeout=600)
            figures["apply_to_pod_running_s"] = round(seen.at - applied, 2)
            inside = container_facts(cluster, ns, first)
            lines = wait("a training step", lambda: steps(trainer_log(first)), timeout=600, interval=0.2)
            figures["apply_to_first_step_s"] = round(log_time(lines[0]) - applied_wall, 2)

            def disruptable() -> int | None:
                lines = trainer_log(first)
                done = checkpoints_done(lines)
                return done[-1] if done and last_step(lines) > done[-1] else None

            wait("a checkpoint and a step after it", disruptable, timeout=600, interval=0.1)
            evicted = time.monotonic()
            cluster.kubelet.evict(ns, first)  # the pod's grace period: SIGTERM, emergency checkpoint
            second, seen = wait("the replacement running", lambda: running_pod((first,)), timeout=600)
            figures["eviction_to_pod_running_s"] = round(seen.at - evicted, 2)

            def final() -> dict[str, Any] | None:
                status = recorder.status(ns, name)
                if status.get("phase") == "Failed":
                    raise AssertionError(f"{name} failed: {status.get('message')}")
                return status if status.get("phase") == "Succeeded" else None

            status = wait("phase Succeeded", final, timeout=900)
            figures["apply_to_succeeded_s"] = round(time.monotonic() - applied, 2)
            ended = {
                pod: next(
                    cs["state"]["terminated"]
                    for v in reversed(versions)
                    for cs in (v.obj.get("status") or {}).get("containerStatuses") or []
                    if "terminated" in (cs.get("state") or {})
                )
                for pod, versions in recorder.pod_history(ns, name).items()
            }
            image_ids = {
                cs.get("imageID")
                for versions in recorder.pod_history(ns, name).values()
                for v in versions
                for cs in (v.obj.get("status") or {}).get("containerStatuses") or []
            }
            old, new = trainer_log(first), trainer_log(second)
        finally:
            operator.stop()
    operator_log = operator.log_path.read_text(errors="replace")

    print("\n" + json.dumps(figures, indent=1))
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=1) + "\n")

    # Both containers ran from the image as the chart's user, on a read-only root, and could write
    # only the Job's mounts.
    assert inside["uids"] == [1000, 1000, 1000, 1000], inside
    assert "ro" in inside["root_options"], inside
    assert {"/tmp", "/work", "/etc/finetune"} <= set(inside["mounts"]), inside["mounts"]
    assert image_ids - {""}, "the kubelet reported no image ID: the pod did not run from the image"
    # The operator from its image reconciled the whole story.
    assert "created Job" in operator_log
    # The eviction: SIGTERM reached the trainer inside the container, which checkpointed and exited.
    assert ended[first]["exitCode"] == 143, ended
    assert json.loads(ended[first]["message"])["exitReason"] == "interrupted"
    resume = next(line for line in new if line.get("event") == "resume")
    assert resume["step"] == last_step(old) == checkpoints_done(old)[-1]
    assert ended[second]["exitCode"] == 0
    assert status["preemptions"] == 1 and status["progress"]["step"] == STEPS
    # The GGUF in S3, as status says, and a GGUF file.
    [gguf] = [a for a in status["artifacts"] if a["uri"].endswith(".gguf")]
    key = gguf["uri"].removeprefix(f"s3://{s3.bucket}/")
    head = s3.client().get_object(Bucket=s3.bucket, Key=key, Range="bytes=0-3")["Body"].read()
    assert head == b"GGUF" and gguf["sizeBytes"] > 0
