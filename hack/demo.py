"""`make demo`: the operator end to end on this machine, on embedded defaults.

A real control plane (etcd, kube-apiserver, controller-manager, scheduler; tests/localkube), the test
kubelet's node that runs pods as local processes, an S3 server (moto), the FineTuneJob CRD and the
operator (`python -m finetune_operator run`). Then the tiny job of examples/tiny: its pod is evicted
once after a checkpoint, a new pod resumes from the checkpoint, and the job ends Succeeded with the
adapter, a q8_0 GGUF checked in llama.cpp, and the checkpoints in S3. `kubectl get ftj` is printed
whenever a column changes. Everything is stopped at the end; logs stay in out/demo/.

Usage: .venv/bin/python hack/demo.py   (the Makefile's `demo` target; needs `make cluster-bins
llama-tools`)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import yaml  # noqa: E402
from e2e.harness import (  # noqa: E402
    OperatorProcess,
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
)
from localkube import Cluster, bin_dir, missing, start_s3  # noqa: E402
from localkube.binaries import BUILD_SCRIPT  # noqa: E402
from localkube.cluster import wait  # noqa: E402
from trainer_fixtures import build_tiny_model, demo_text  # noqa: E402

JOB_FILE = REPO / "examples" / "tiny" / "job.yaml"
MODEL_DIR = REPO / "out" / "tiny-model"
WORKDIR = REPO / "out" / "demo"
NAMESPACE = "demo"
TIMEOUT = 900.0
LOGS = f"{WORKDIR.relative_to(REPO)}/ (operator/operator.log, localkube/logs/, localkube/kubelet/pods/)"


class Demo:
    def __init__(self, evict: bool) -> None:
        self.evict = evict
        self.t0 = time.monotonic()
        self.cluster: Cluster | None = None
        self.s3: Any = None
        self.operator: OperatorProcess | None = None
        self.recorder: Recorder | None = None
        self.last_row = ""
        self.job: dict[str, Any] = {}
        self.figures: dict[str, float | int] = {}

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    # -- setting up ---------------------------------------------------------------------------

    def model(self) -> None:
        if (MODEL_DIR / "config.json").is_file():
            return
        self.say(f"building the tiny model in {MODEL_DIR.relative_to(REPO)} (random weights, no hub)")
        data = REPO / yaml.safe_load(JOB_FILE.read_text())["spec"]["data"]["path"]
        build_tiny_model(MODEL_DIR, extra_text=demo_text(data))

    def up(self) -> None:
        shutil.rmtree(WORKDIR, ignore_errors=True)
        WORKDIR.mkdir(parents=True)
        self.say("starting the control plane, the test kubelet's GPU node and S3")
        self.cluster = Cluster.start(WORKDIR / "localkube", bin_dir())
        self.s3 = start_s3()
        self.say(", ".join(f"{k} {v:.1f}s" for k, v in self.cluster.timings.items()))
        install_crd(self.cluster)
        self.say("CRD finetunejobs.finetune.dev installed; starting the operator")
        self.recorder = Recorder(self.cluster.kubeconfig).start()
        self.operator = OperatorProcess(
            self.cluster.kubeconfig, operator_config(self.s3), WORKDIR / "operator"
        )
        self.operator.start()
        self.kubectl("create", "namespace", NAMESPACE)
        self.cluster.apply(self.s3.secret(NAMESPACE))

    def down(self) -> None:
        for stop in (
            self.operator and self.operator.stop,
            self.recorder and self.recorder.stop,
            self.s3 and self.s3.stop,
            self.cluster and self.cluster.stop,
        ):
            if stop:
                try:
                    stop()
                except Exception as e:  # keep tearing down the rest
                    print(f"teardown: {e!r}", file=sys.stderr)

    def kubectl(self, *args: str, check: bool = True) -> str:
        assert self.cluster is not None
        return self.cluster.kubectl(*args, check=check).stdout

    # -- the job ------------------------------------------------------------------------------

    def apply(self) -> None:
        job = yaml.safe_load(JOB_FILE.read_text())
        # Paths in the example are relative to the repository; the pod's working directory is its
        # own emptyDir, so they become absolute here.
        for section in ("model", "data"):
            job["spec"][section]["path"] = str(REPO / job["spec"][section]["path"])
        job["metadata"]["namespace"] = NAMESPACE
        self.job = job
        self.say(f"kubectl apply -f {JOB_FILE.relative_to(REPO)} (model and data paths made absolute)")
        self.applied_at, self.applied_wall = time.monotonic(), time.time()
        assert self.cluster is not None
        self.cluster.apply(job)

    @property
    def name(self) -> str:
        return self.job["metadata"]["name"]

    def show(self) -> None:
        """`kubectl get ftj`, printed when a column other than AGE changed."""
        out = self.kubectl("get", "ftj", "-n", NAMESPACE, check=False).rstrip().splitlines()
        if len(out) < 2:
            return
        row = out[1].rsplit(None, 1)[0]
        if row != self.last_row:
            if not self.last_row:
                self.say(out[0])
            self.say(out[1])
            self.last_row = row

    def watch(self, what: str, ready: Any, timeout: float = TIMEOUT) -> Any:
        """Wait for `ready` (checked every 0.1 s), printing `kubectl get ftj` along the way (every
        second, when it changed)."""
        shown = 0.0

        def poll() -> Any:
            nonlocal shown
            if time.monotonic() - shown >= 1.0:
                self.show()
                shown = time.monotonic()
            value = ready()
            status = self.status()
            if status.get("phase") == "Failed":
                raise RuntimeError(f"the job failed: {status.get('message')}")
            return value

        return wait(what, poll, timeout=timeout, interval=0.1)

    def status(self) -> dict[str, Any]:
        assert self.recorder is not None
        return self.recorder.status(NAMESPACE, self.name)

    def pods(self) -> dict[str, Any]:
        assert self.recorder is not None
        return self.recorder.pod_history(NAMESPACE, self.name)

    def log(self, pod: str) -> list[dict[str, Any]]:
        assert self.cluster is not None and self.cluster.kubelet is not None
        return log_lines(self.cluster.kubelet.log_path(NAMESPACE, pod, "trainer"))

    def running_pod(self, exclude: tuple[str, ...] = ()) -> tuple[str, Any] | None:
        for name, versions in self.pods().items():
            seen = first_seen(versions, pod_running) if name not in exclude else None
            if seen is not None:
                return name, seen
        return None

    def run(self) -> None:
        self.apply()
        pod, seen = self.watch("the training pod running", self.running_pod, timeout=120)
        self.figures["apply_to_pod_running_s"] = round(seen.at - self.applied_at, 2)
        self.say(f"pod {pod} running ({self.figures['apply_to_pod_running_s']}s after apply)")
        lines = self.watch("the first training step", lambda: steps(self.log(pod)) and self.log(pod))
        self.figures["apply_to_first_step_s"] = round(log_time(steps(lines)[0]) - self.applied_wall, 1)
        self.say(f"training ({self.figures['apply_to_first_step_s']}s after apply: imports, data, model)")
        if self.evict:
            pod = self.preempt(pod)
        self.watch("the job Succeeded", lambda: self.status().get("phase") == "Succeeded")
        self.show()
        self.figures["apply_to_succeeded_s"] = round(time.monotonic() - self.applied_at, 1)

    def preempt(self, pod: str) -> str:
        """Evict `pod` a step after its first checkpoint, as a spot reclaim with a grace period
        does; follow the new pod until it trains again."""

        def past_checkpoint() -> int | None:
            lines = self.log(pod)
            done = checkpoints_done(lines)
            return done[-1] if done and last_step(lines) > done[-1] else None

        checkpoint = self.watch("a checkpoint and a step past it", past_checkpoint)
        step = last_step(self.log(pod))
        self.say(
            f"evicting pod {pod} at step {step} (last checkpoint: step {checkpoint}): DisruptionTarget, "
            "SIGTERM, grace period"
        )
        assert self.cluster is not None and self.cluster.kubelet is not None
        evicted_at, evicted_wall = time.monotonic(), time.time()
        self.cluster.kubelet.evict(NAMESPACE, pod)
        new, seen = self.watch("a new pod running", lambda: self.running_pod(exclude=(pod,)))
        self.say(f"pod {new} running ({seen.at - evicted_at:.1f}s after the eviction)")
        lines = self.watch("a resumed step", lambda: steps(self.log(new)) and self.log(new))
        resumed = next((line["step"] for line in lines if line.get("event") == "resume"), None) or 0
        stopped = last_step(self.log(pod))
        self.figures |= {
            "eviction_to_pod_running_s": round(seen.at - evicted_at, 1),
            "eviction_to_resumed_step_s": round(log_time(steps(lines)[0]) - evicted_wall, 1),
            "steps_lost": stopped - resumed,
        }
        self.say(
            f"resumed from the checkpoint of step {resumed} (the old pod stopped at step {stopped}: "
            f"{stopped - resumed} steps lost), training again "
            f"{self.figures['eviction_to_resumed_step_s']}s after the eviction"
        )
        return new

    # -- the end ------------------------------------------------------------------------------

    def fetch_plot(self) -> None:
        """loss.png (drawn by the trainer in its pod, on the CPU) from S3 to out/demo/loss.png."""
        key = f"jobs/{NAMESPACE}/{self.name}/artifacts/loss.png"
        target = WORKDIR / "loss.png"
        target.write_bytes(self.s3.client().get_object(Bucket=self.s3.bucket, Key=key)["Body"].read())
        print(
            f"loss plot: {target.relative_to(REPO)} (from s3://{self.s3.bucket}/{key}; "
            "train and eval loss, the resume marked)"
        )

    def report(self) -> None:
        status = self.status()
        print()
        print(self.kubectl("get", "ftj", "-n", NAMESPACE, "-o", "wide"))
        print(
            f"preemptions: {status.get('preemptions')}   checkpoint: {json.dumps(status.get('checkpoint'))}"
        )
        for artifact in status.get("artifacts") or []:
            size, sha = artifact["sizeBytes"], artifact["sha256"]
            print(f"artifact {artifact['name']}: {artifact['uri']} ({size} bytes, sha256 {sha})")
        summary = status.get("summary") or {}
        print(
            "summary: "
            + ", ".join(
                f"{k} {summary.get(k)}"
                for k in (
                    "steps",
                    "finalLoss",
                    "evalLossBefore",
                    "finalEvalLoss",
                    "bestEvalStep",
                    "tokensPerSecond",
                    "resumedFromStep",
                )
            )
        )
        print("\ncheckpoints (newest first; train and eval loss):")
        for c in status.get("checkpoints") or []:
            print(f"  step {c['step']:>3}  train {c.get('trainLoss')}  eval {c.get('evalLoss')}  {c['uri']}")
        print(f"best checkpoint: {json.dumps(status.get('bestCheckpoint'))}")
        for sample in status.get("samples") or []:
            print(
                f"sample {sample.get('prompt')!r}: before {sample.get('before')!r}, "
                f"after {sample.get('after')!r}"
            )
        self.fetch_plot()
        print("\nevents:")
        events = json.loads(self.kubectl("get", "events", "-n", NAMESPACE, "-o", "json"))["items"]
        for event in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"])):  # 1 s timestamps
            if event["involvedObject"].get("kind") == "FineTuneJob":
                print(f"  {event['type']:7} {event['reason']:13} {event['message'][:110]}")
        prefix = f"jobs/{NAMESPACE}/{self.name}/"
        print(f"\nS3 s3://{self.s3.bucket}/{prefix}:")
        listing = self.s3.client().list_objects_v2(Bucket=self.s3.bucket, Prefix=prefix)
        for obj in listing.get("Contents", []):
            print(f"  {obj['Size']:>10}  {obj['Key'].removeprefix(prefix)}")
        print(f"\nfigures: {json.dumps(self.figures)}")
        print(f"logs: {LOGS}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-evict", action="store_true", help="train without the eviction")
    args = parser.parse_args()
    if absent := missing():
        print(
            f"missing in {bin_dir()}: {', '.join(absent)}; run make cluster-bins ({BUILD_SCRIPT})",
            file=sys.stderr,
        )
        return 1
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log
    # Pods run as local processes with this process's environment: no model hub, no telemetry.
    os.environ |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    demo = Demo(evict=not args.no_evict)
    started = datetime.now()
    try:
        demo.model()
        demo.up()
        demo.run()
        demo.report()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        print(f"logs: {LOGS}", file=sys.stderr)
        return 1
    finally:
        demo.say("stopping the operator, S3 and the control plane")
        demo.down()
    print(f"demo done in {(datetime.now() - started).total_seconds():.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
