"""`make cluster`: the test cluster and S3 for a person, until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .binaries import BUILD_SCRIPT, bin_dir, missing
from .cluster import LOCAL_NODE, Cluster
from .kueue import KUEUE_VERSION, kueue_dir, kueue_missing
from .s3 import start_s3


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m localkube", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="certificates, data and logs (default: a new temp dir)")
    parser.add_argument(
        "--kueue",
        action="store_true",
        default=os.environ.get("KUEUE", "") not in ("", "0"),
        help="also run the Kueue manager (default: $KUEUE set and not 0)",
    )
    args = parser.parse_args()
    if absent := missing():
        print(f"missing in {bin_dir()}: {', '.join(absent)}; run {BUILD_SCRIPT}", file=sys.stderr)
        return 1
    if args.kueue and kueue_missing():
        print(
            f"the Kueue manager is not built (nothing in {kueue_dir()}); run {BUILD_SCRIPT}", file=sys.stderr
        )
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="localkube-"))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log: one line a request
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster.start(workdir, bin_dir(), kueue=args.kueue)
    s3 = start_s3()
    try:
        ns = "default"
        cluster.apply(s3.secret(ns))
        kueue_line = (
            f"{KUEUE_VERSION}, manages Jobs labelled kueue.x-k8s.io/queue-name" if cluster.kueue else "off"
        )
        print(
            f"""
localkube is up ({", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items())})
  kubeconfig:  {cluster.kubeconfig}
  nodes:       {LOCAL_NODE} (runs pods as local processes), {", ".join(cluster.kwok_nodes)} (kwok)
  Kueue:       {kueue_line}
  S3:          {s3.endpoint_url} bucket {s3.bucket} (key {s3.access_key} / {s3.secret_key});
               Secret {ns}/finetune-s3 holds the credentials
  logs:        {workdir / "logs"}, pods in {workdir / "kubelet" / "pods"}

  export KUBECONFIG={cluster.kubeconfig} PATH={bin_dir()}:$PATH

Ctrl-C stops everything.""",
            flush=True,
        )
        stop.wait()
    finally:
        print("stopping...", flush=True)
        s3.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
