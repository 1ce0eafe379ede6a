"""Scoped storage credentials end to end: the chart installed with storage.sts (its RBAC and
admission policies on the real API server), the operator as a process holding the platform's
MinIO keys, the real trainer on the test kubelet checkpointing and exporting to MinIO with only
the per-job credentials the operator issued, renewed while it runs, gone when it ends."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from chart_install import installed_chart
from e2e.harness import HOST_PROCESS_IMAGE, OperatorProcess, install_crd, operator_config, tiny_job
from finetune_operator.credentials import ANNOTATION_EXPIRES, CREDENTIALS_KEY, secret_name
from finetune_operator.kube import ApiError, Kube
from kubernetes import config
from localkube.cluster import wait
from localkube.minio import REGION, MinIO, require_minio, start_minio
from trainer_fixtures import alpaca_rows, write_jsonl

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BUCKET = "finetune"
DURATION = 900
"""MinIO's (and AWS's) shortest lifetime."""
RENEW_BEFORE = 880
"""So the reconcile renews about 20 s after each issue: several renewals within one short job."""
POD_CREATE_GRACE = 20
"""How long a job waits for credentials it cannot get before it fails (podCreateGraceSeconds)."""


@pytest.fixture(scope="module")
def sts(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MinIO, OperatorProcess]]:
    require_minio()
    minio = start_minio(tmp_path_factory.mktemp("minio"), buckets=(BUCKET, "other"))
    install_crd(cluster)
    release_ns = cluster.new_namespace("finetune-sts")
    workdir = tmp_path_factory.mktemp("operator-sts")
    values = (
        "--set", "rbac.clusterWide=true",
        "--set", f"config.defaultImage={HOST_PROCESS_IMAGE}",
        "--set", f"config.storage.uri=s3://{BUCKET}/jobs",
        "--set", "config.storage.sts.enabled=true",
    )  # fmt: skip
    s3 = SimpleNamespace(bucket=BUCKET, endpoint_url=minio.endpoint_url, region=REGION)
    cfg = operator_config(s3)
    cfg["storage"]["sts"] = {"enabled": True, "durationSeconds": DURATION, "renewBeforeSeconds": RENEW_BEFORE}
    cfg["storage"]["credentialsSecret"] = "no-such-secret"  # must not be what the pod uses
    cfg["podCreateGraceSeconds"] = POD_CREATE_GRACE
    keys = {"AWS_ACCESS_KEY_ID": minio.root_user, "AWS_SECRET_ACCESS_KEY": minio.root_password}
    try:
        with installed_chart(cluster, workdir, *values, namespace=release_ns) as chart:
            proc = OperatorProcess(chart["sa"], cfg, workdir, env=keys)
            proc.start()
            try:
                yield minio, proc
            finally:
                proc.stop()
    finally:
        minio.stop()


def test_job_trains_on_scoped_credentials_renewed_while_it_runs(
    sts: tuple[MinIO, OperatorProcess], cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    minio, operator = sts
    ns = cluster.namespace  # no finetune-s3 Secret here: the pod has only what the operator issues
    data = tmp_path / "rows.jsonl"
    write_jsonl(data, alpaca_rows(64))
    cluster.apply({**tiny_job("a1", tiny_model_dir, data, training={
        "batchSize": 2, "gradientAccumulationSteps": 1, "maxSteps": 60, "warmupSteps": 2,
        "learningRate": 1e-3, "optimizer": "adamw_torch",
    }), "metadata": {"name": "a1", "namespace": ns}})  # fmt: skip
    ftj = cluster.get("finetunejob", "a1", ns)

    expiries: list[str] = []
    keys: set[str] = set()

    def finished() -> str | None:
        done = cluster.kubectl("get", "secret", secret_name("a1"), "-n", ns, "-o", "json", check=False)
        if done.returncode == 0:
            secret = json.loads(done.stdout)
            assert secret["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]
            expires = secret["metadata"]["annotations"][ANNOTATION_EXPIRES]
            if expires not in expiries:
                expiries.append(expires)
            keys.add(json.loads(base64.b64decode(secret["data"][CREDENTIALS_KEY]))["AccessKeyId"])
        phase = (cluster.get("finetunejob", "a1", ns).get("status") or {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    start = time.monotonic()
    phase = wait("a1 finished", finished, timeout=600, interval=2)
    status = cluster.get("finetunejob", "a1", ns)["status"]
    assert phase == "Succeeded", (status, operator.log_path)

    job = cluster.get("job", "a1", ns)
    pod = job["spec"]["template"]["spec"]
    assert "AWS_ACCESS_KEY_ID" not in json.dumps(job) and minio.root_user not in json.dumps(job)
    assert {"name": "storage", "secret": {"secretName": "a1-storage", "defaultMode": 0o440, "items": [
        {"key": CREDENTIALS_KEY, "path": CREDENTIALS_KEY}]}} in pod["volumes"]  # fmt: skip

    # Checkpoints and the export landed under the job's own prefix, written with scoped keys.
    root = minio.client()
    listed = root.list_objects_v2(Bucket=BUCKET, Prefix=f"jobs/{ns}/a1/")
    written = [o["Key"] for o in listed.get("Contents", [])]
    assert any("/checkpoints/" in k and k.endswith("manifest.json") for k in written), written
    assert any("/export/" in k for k in written), written
    assert root.list_objects_v2(Bucket="other").get("KeyCount", 0) == 0

    # Renewed while it ran (a new key each time), and the Secret is gone once the job finished.
    seconds = time.monotonic() - start
    print(f"\nsts e2e: {seconds:.0f}s, {len(expiries)} expiries seen, {len(keys)} keys")
    assert len(keys) >= 2, (expiries, seconds)
    wait(
        "a1's Secret deleted after the job finished",
        lambda: cluster.kubectl("get", "secret", "a1-storage", "-n", ns, check=False).returncode != 0,
        timeout=60,
    )


def test_the_operators_secret_rights_reach_only_per_job_credentials_secrets(
    sts: tuple[MinIO, OperatorProcess], cluster: Any
) -> None:
    """As the operator's ServiceAccount (what a stolen token could do): create, patch and delete
    on Secrets are granted, yet the chart's policy refuses any Secret that is not a per-job
    credentials Secret, so a tenant's Secret can be neither overwritten nor deleted; reading is
    not granted at all."""
    _, operator = sts
    ns = cluster.namespace
    cluster.kubectl("create", "secret", "generic", "victim-storage", "-n", ns, "--from-literal=token=t")

    def as_operator(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={operator.kubeconfig}", *args],
            input=stdin, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    data = {CREDENTIALS_KEY: base64.b64encode(b"{}").decode()}
    forged = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "new-storage", "namespace": ns},
              "data": data}  # fmt: skip
    done = as_operator("create", "-f", "-", stdin=json.dumps(forged))
    assert done.returncode != 0 and "may write and delete only the per-job credentials" in done.stderr, done
    done = as_operator(
        "replace",
        "-f",
        "-",
        stdin=json.dumps({**forged, "metadata": {"name": "victim-storage", "namespace": ns}}),
    )
    assert done.returncode != 0 and "forbidden" in done.stderr.lower(), done  # no update right at all
    # A patch as the operator sends it (kubectl patch would GET first, which is not granted).
    with pytest.raises(ApiError) as patched:
        asyncio.run(Kube(config.new_client_from_config(str(operator.kubeconfig))).patch_secret(
            ns, "victim-storage", [{"op": "add", "path": "/data", "value": data}]))  # fmt: skip
    assert patched.value.status == 403 and "may write and delete only the per-job credentials" in str(
        patched.value
    )
    done = as_operator("delete", "secret", "victim-storage", "-n", ns)
    assert done.returncode != 0 and "may write and delete only the per-job credentials" in done.stderr, done
    done = as_operator("get", "secret", "victim-storage", "-n", ns)
    assert done.returncode != 0 and "forbidden" in done.stderr.lower(), done
    kept = cluster.get("secret", "victim-storage", ns)
    assert base64.b64decode(kept["data"]["token"]) == b"t"


def test_a_planted_storage_secret_is_neither_overwritten_nor_mounted_and_the_job_fails(
    sts: tuple[MinIO, OperatorProcess], cluster: Any, tmp_path: Path
) -> None:
    """A tenant creates `<job>-storage` with keys of their choosing before the job: the operator
    leaves it as it is, makes no Job (so nothing mounts it), says why in status while it retries
    (Pending, StorageSecretNotOwned, naming the Secret) and fails the job after
    podCreateGraceSeconds."""
    ns = cluster.namespace
    planted = json.dumps({"Version": 1, "AccessKeyId": "tenant-key", "SecretAccessKey": "tenant-secret"})
    cluster.kubectl(
        "create", "secret", "generic", "p1-storage", "-n", ns, f"--from-literal={CREDENTIALS_KEY}={planted}"
    )
    cluster.apply(
        {**tiny_job("p1", tmp_path, tmp_path / "rows.jsonl"), "metadata": {"name": "p1", "namespace": ns}}
    )

    def seen(phase: str) -> dict[str, Any] | None:
        status = cluster.get("finetunejob", "p1", ns).get("status") or {}
        reasons = {c.get("reason") for c in status.get("conditions") or []}
        return status if status.get("phase") == phase and reasons == {"StorageSecretNotOwned"} else None

    pending = wait("p1 Pending for its planted Secret", lambda: seen("Pending"), timeout=60, interval=1)
    assert pending["message"].startswith(
        f"Secret p1-storage exists in namespace {ns} and is not owned by this"
    )
    assert "retrying (the job fails if this lasts 20s" in pending["message"]
    failed = wait("p1 Failed", lambda: seen("Failed"), timeout=POD_CREATE_GRACE + 60, interval=1)
    assert "could not be provided for" in failed["message"] and "p1-storage" in failed["message"]

    assert cluster.kubectl("get", "job", "p1", "-n", ns, check=False).returncode != 0
    kept = cluster.get("secret", "p1-storage", ns)
    assert base64.b64decode(kept["data"][CREDENTIALS_KEY]).decode() == planted
    assert not kept["metadata"].get("ownerReferences") and not kept["metadata"].get("annotations")
