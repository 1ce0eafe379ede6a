"""localkube: a real Kubernetes control plane, GPU nodes and S3 on this machine, for tests and the demo.

Built from Go modules by hack/cluster-bins.sh (Kubernetes v1.34.4; binaries in
~/.cache/finetune-operator/k8s-v1.34.4/bin, or $KUBE_BIN_DIR). Everything listens on 127.0.0.1 on
ports picked at random, so several sessions can run side by side.

What runs: etcd; kube-apiserver (client certificates, RBAC + Node authorization, the default
admission plugins plus NodeRestriction and ExtendedResourceToleration, ServiceAccount token
signing so TokenRequest and TokenReview work); kube-controller-manager (all controllers, Job,
garbage collector, namespace, ServiceAccount and token controllers included, with per-controller
credentials); kube-scheduler; kwok with fake nodes kwok-gpu-0..2 (nvidia.com/gpu: 8, tainted
nvidia.com/gpu=present and kwok.x-k8s.io/node=fake); and the test kubelet's node `local-gpu-0`
(nvidia.com/gpu: 8, label finetune.dev/local=true, tainted nvidia.com/gpu=present), whose pods
run as local processes (see localkube.kubelet and localkube.podspec for what is supported).
A pod that requests nvidia.com/gpu gets the GPU toleration from the API server; to land on the
test kubelet it selects `finetune.dev/local: "true"`.

pytest (the plugin is registered by tests/conftest.py):

    pytestmark = pytest.mark.cluster

    def test_x(cluster, s3):
        ns = cluster.namespace                      # fresh namespace for this test
        cluster.apply(s3.secret(ns), job_manifest)  # kubectl apply --server-side of dicts
        done = cluster.kubectl("get", "pods", "-n", ns, check=False)  # CompletedProcess[str]
        api = cluster.api_client()                  # kubernetes.client.ApiClient (admin)
        cluster.kubelet.evict(ns, pod, reason="TerminationByKubelet")  # or "EvictionByEvictionAPI"
        log = cluster.kubelet.log_path(ns, pod, "trainer")

Fixtures (session-scoped; tests using `cluster` must be marked `cluster`; they are skipped when
the binaries are not built, and fail instead when CI is set):
- cluster -> Cluster: .kubeconfig (admin Path), .bin_dir, .workdir, .logs, .timings,
  .kubectl(*args, input=None, check=True, timeout=120), .api_client(), .apply(*objs),
  .get(kind, name, namespace=None), .namespace (per test), .new_namespace(prefix),
  .wait(what, ready, timeout=60), .kubelet (TestKubelet), .kwok_nodes, .control_plane
  (.kubeconfig_for(user, *groups) for other identities).
- s3 -> S3: .endpoint_url, .bucket, .access_key, .secret_key, .region, .client() (boto3),
  .secret(namespace, name="finetune-s3") (the credentials Secret manifest).

For a person: `make cluster` (python -m localkube) starts the same and prints `export KUBECONFIG=...`.
"""

from .binaries import KUBE_VERSION, bin_dir, missing
from .cluster import LOCAL_NODE, Cluster
from .kubelet import LOCAL_LABEL, TestKubelet
from .s3 import S3, SECRET_NAME, start_s3

__all__ = [
    "KUBE_VERSION",
    "LOCAL_LABEL",
    "LOCAL_NODE",
    "S3",
    "SECRET_NAME",
    "Cluster",
    "TestKubelet",
    "bin_dir",
    "missing",
    "start_s3",
]
