#!/usr/bin/env bash
# Build the binaries of a real Kubernetes control plane from Go modules, into a versioned cache
# outside the repository: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd,
# kwok and helm; and the Kueue manager with its CRDs and webhook manifests. Idempotent: a binary
# already in the cache is not rebuilt.
#
#   FINETUNE_CACHE  cache root (default ~/.cache/finetune-operator); binaries land in
#                   $FINETUNE_CACHE/k8s-$KUBE_VERSION/bin, Kueue in $FINETUNE_CACHE/kueue-$KUEUE_VERSION
#   KUBE_BIN_DIR    use existing Kubernetes binaries from this directory instead (Kueue is still
#                   built into the cache when missing)
#
# The Go build cache grows to several GiB for these, so each run uses a throw-away GOCACHE; the
# module cache (GOMODCACHE) is kept so a later build needs no downloads.
# Keep KUBE_VERSION in step with tests/localkube/binaries.py.
#
# Then the programs that consume this repository's files, so that tests run the real parser or
# engine (tests/consumers.py): into $FINETUNE_CACHE/consumers/bin, each rebuilt when its stamp (the
# pinned version, or a hash of its source under hack/consumers/) changes, all sharing one GOCACHE
# kept in $FINETUNE_CACHE/consumers/gocache (0.85 GiB after all three). Cold build times on 2 cores
# (2026-12-02, measured with other builds running, so upper bounds):
#   promtool          Prometheus v3.16.0's cmd/promtool, SD plugins left out    172s (with module
#                     downloads; its discovery/kubernetes import keeps client-go in)
#   argocd-health     hack/consumers/argocd-health: gopher-lua opened as Argo     12s (3s once the
#                     CD's util/lua opens it                                       stdlib is cached)
#   ollama-modelfile  hack/consumers/ollama-modelfile: Ollama's parser and        11s
#                     template packages
# `hack/cluster-bins.sh consumers` builds only these (the tests call it; instant when up to date).
#
# And MinIO, a real S3 server with STS (AssumeRole with session policies), for the scoped-credential
# tests (tests/localkube/minio.py): into $FINETUNE_CACHE/minio-$MINIO_VERSION/bin/minio, with a
# throw-away GOCACHE. `hack/cluster-bins.sh minio` builds only it. Cold build on 2 cores
# (2026-12-03, with module downloads and two other builds running, so an upper bound): 650 s;
# GOCACHE 0.95 GiB (thrown away); 107 MiB in the cache.
set -euo pipefail

KUBE_VERSION=v1.34.4
ETCD_VERSION=v3.6.5   # also in hack/cluster-bins/etcd/go.mod
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.19.0
# The newest Kueue release built against the Kubernetes 1.34 libraries (k8s.io/api v0.34.2) that the
# Go module proxy serves (v0.15.3 and later v0.15 patch releases answer 403 there). Keep in step with
# tests/localkube/kueue.py. Cold build on 2 cores (2026-12-02): module downloads under 2 min
# (1,717 packages), compile 253 s, GOCACHE 1.9 GiB (thrown away); 85 MiB in the cache (binary, CRDs, webhooks).
KUEUE_VERSION=v0.15.2
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm)
PROMETHEUS_VERSION=v0.316.0   # Go module version of Prometheus 3.16.0
CONSUMERS=(argocd-health ollama-modelfile)
# MinIO publishes no semver module versions; this pseudo-version (a 2026-02-12 commit of master) is
# one the Go module proxy serves. Keep in step with tests/localkube/minio.py.
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}"
mkdir -p "$cache"
# One build at a time per cache: the tests call this script for the binaries they use (helm, the
# consumers), and two checkouts on one machine share the cache. Two concurrent builds of the same
# binaries double the 15 minutes on 2 cores; the second now waits, then finds them built.
exec 9>"$cache/.cluster-bins.lock"
flock 9

build_consumers() {
  local out="$cache/consumers/bin" name stamp start
  mkdir -p "$out"
  export GOCACHE="$cache/consumers/gocache" GOFLAGS="-buildvcs=false" CGO_ENABLED=0
  # A binary is current when its stamp matches; stamp first, so a half-built binary is never taken.
  current() { [[ -x "$out/$1" && "$(cat "$out/$1.stamp" 2>/dev/null)" == "$2" ]]; }
  built() { echo "$2" >"$out/$1.stamp"; printf 'built %s into %s in %ds\n' "$1" "$out" $((SECONDS - start)); }

  stamp="$PROMETHEUS_VERSION remove_all_sd"
  if ! current promtool "$stamp"; then
    command -v go >/dev/null || { echo "go is needed to build promtool" >&2; return 1; }
    echo ">> building promtool" && start=$SECONDS
    rm -f "$out/promtool.stamp"
    GOBIN="$out" go install -trimpath -tags remove_all_sd \
      -ldflags "-s -w -X github.com/prometheus/common/version.Version=3.${PROMETHEUS_VERSION#v0.3}" \
      "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
    built promtool "$stamp"
  fi
  for name in "${CONSUMERS[@]}"; do
    local src="$here/consumers/$name"
    stamp="$(cd "$src" && cat go.mod go.sum ./*.go | sha256sum | cut -c1-16)"
    current "$name" "$stamp" && continue
    command -v go >/dev/null || { echo "go is needed to build $name" >&2; return 1; }
    echo ">> building $name" && start=$SECONDS
    rm -f "$out/$name.stamp"
    (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$out/$name" .)
    built "$name" "$stamp"
  done
}

build_minio() {
  local out="$cache/minio-$MINIO_VERSION/bin" start=$SECONDS work
  [[ -x "$out/minio" ]] && return 0
  command -v go >/dev/null || { echo "go is needed to build minio" >&2; return 1; }
  echo ">> building minio $MINIO_VERSION"
  work="$(mktemp -d)"
  # Staged, then moved: a half-built binary is never taken for a built one.
  GOCACHE="$work/gocache" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 GOBIN="$work/bin" \
    go install -trimpath -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION" ||
    { chmod -R u+w "$work"; rm -rf "$work"; return 1; }
  mkdir -p "$out" && mv "$work/bin/minio" "$out/minio"
  printf 'built minio into %s in %ds (GOCACHE %s, deleted)\n' "$out" $((SECONDS - start)) \
    "$(du -sh "$work/gocache" | cut -f1)"
  chmod -R u+w "$work" && rm -rf "$work"
}

case "${1:-}" in
  consumers) build_consumers; exit 0 ;;
  minio) build_minio; exit 0 ;;
esac
(build_consumers)
(build_minio)

kueue_dir="$cache/kueue-$KUEUE_VERSION"
todo=()
if [[ -n "${KUBE_BIN_DIR:-}" ]]; then
  missing=0
  for b in "${BINARIES[@]}"; do
    [[ -x "$KUBE_BIN_DIR/$b" ]] || { echo "KUBE_BIN_DIR=$KUBE_BIN_DIR has no $b" >&2; missing=1; }
  done
  [[ $missing == 0 ]] || exit 1
  echo "using binaries in KUBE_BIN_DIR=$KUBE_BIN_DIR"
  bin="$KUBE_BIN_DIR"
else
  bin="$cache/k8s-$KUBE_VERSION/bin"
  mkdir -p "$bin"
  for b in "${BINARIES[@]}"; do [[ -x "$bin/$b" ]] || todo+=("$b"); done
fi
[[ -x "$kueue_dir/bin/kueue" ]] || todo+=(kueue)
if [[ ${#todo[@]} == 0 ]]; then
  echo "all binaries present in $bin and $kueue_dir"
  exit 0
fi
command -v go >/dev/null || { echo "go is needed to build ${todo[*]}" >&2; exit 1; }

work="$(mktemp -d)"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
export GOCACHE="$work/gocache" GOFLAGS="-buildvcs=false" CGO_ENABLED=0
stage="$work/out"
mkdir -p "$stage"

report=()
timed() {  # timed NAME CMD...: run CMD, move $stage/NAME into the cache, remember the time
  local name=$1 start=$SECONDS
  shift
  echo ">> building $name"
  "$@"
  mv "$stage/$name" "$bin/$name"
  report+=("$(printf '%-24s %4ds' "$name" $((SECONDS - start)))")
}
wants() { [[ " ${todo[*]} " == *" $1 "* ]]; }

# Without these the servers report v0.0.0-master, which breaks version checks (Helm's
# kubeVersion, kubectl's skew warning).
kv=k8s.io/component-base/version
kube_ldflags="-s -w -X $kv.gitVersion=$KUBE_VERSION -X $kv.gitTreeState=clean"
kube_ldflags+=" -X $kv.gitMajor=$(cut -d. -f1 <<<"${KUBE_VERSION#v}")"
kube_ldflags+=" -X $kv.gitMinor=$(cut -d. -f2 <<<"$KUBE_VERSION")"

kube_cmds=()
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  wants "$b" && kube_cmds+=("$b")
done
if [[ ${#kube_cmds[@]} -gt 0 ]]; then
  start=$SECONDS
  cp -r "$here/cluster-bins/k8s" "$work/k8s"
  pkgs=()
  for b in "${kube_cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b@$KUBE_VERSION"); done
  (cd "$work/k8s" && go get "${pkgs[@]}")
  report+=("$(printf '%-24s %4ds' "k8s module setup" $((SECONDS - start)))")
  for b in "${kube_cmds[@]}"; do
    timed "$b" bash -c 'cd "$1" && go build -trimpath -ldflags "$2" -o "$3" "k8s.io/kubernetes/cmd/$4"' \
      _ "$work/k8s" "$kube_ldflags" "$stage/$b" "$b"
  done
fi

if wants etcd; then
  cp -r "$here/cluster-bins/etcd" "$work/etcd"
  timed etcd bash -c 'cd "$1" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$2" .' \
    _ "$work/etcd" "$stage/etcd"
fi

if wants kwok; then
  timed kwok env GOBIN="$stage" go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi

if wants helm; then
  timed helm env GOBIN="$stage" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi

if wants kueue; then
  # The Kueue manager, from the module's own source (its CRDs and webhook manifests are copied from
  # the same module directory, so binary and schemas always match). One line of cmd/kueue/main.go is
  # changed in a copy of the module (the Go module cache is read-only, and -overlay may not replace
  # files in it): with internalCertManagement disabled, upstream reads the metrics serving
  # certificate from the fixed path /etc/kueue/metrics/certs (a volume mount in its Deployment);
  # here KUEUE_METRICS_CERT_DIR names the directory instead, so a test cluster needs no write access
  # to /etc. Nothing else differs from the release.
  start=$SECONDS
  echo ">> building kueue"
  src="$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  [[ -d "$src" ]] || { echo "go mod download sigs.k8s.io/kueue@$KUEUE_VERSION gave no directory" >&2; exit 1; }
  fixed='metricsCertPath := "/etc/kueue/metrics/certs"'
  [[ $(grep -cF "$fixed" "$src/cmd/kueue/main.go") == 1 ]] ||
    { echo "cmd/kueue/main.go of $KUEUE_VERSION no longer has: $fixed (update the change)" >&2; exit 1; }
  cp -r "$src" "$work/kueue" && chmod -R u+w "$work/kueue"
  sed -i 's|'"$fixed"'|metricsCertPath := cmp.Or(os.Getenv("KUEUE_METRICS_CERT_DIR"), "/etc/kueue/metrics/certs")|; s|^import (|import (\n\t"cmp"|' \
    "$work/kueue/cmd/kueue/main.go"
  kver=sigs.k8s.io/kueue/pkg/version
  (cd "$work/kueue" && go build -trimpath -o "$stage/kueue" \
    -ldflags "-s -w -X $kver.GitVersion=$KUEUE_VERSION -X $kver.GitCommit=release -X $kver.BuildDate=release" \
    ./cmd/kueue)
  rm -rf "$kueue_dir.tmp" && mkdir -p "$kueue_dir.tmp/bin" "$kueue_dir.tmp/crds"
  cp "$src"/config/components/crd/bases/*.yaml "$kueue_dir.tmp/crds/"
  cp "$src/config/components/webhook/manifests.yaml" "$kueue_dir.tmp/webhooks.yaml"
  mv "$stage/kueue" "$kueue_dir.tmp/bin/kueue"
  chmod -R u+w "$kueue_dir.tmp"
  rm -rf "$kueue_dir" && mv "$kueue_dir.tmp" "$kueue_dir"
  report+=("$(printf '%-24s %4ds' kueue $((SECONDS - start)))")
fi

echo "built into $bin:"
printf '  %s\n' "${report[@]}"
echo "  GOCACHE used $(du -sh "$GOCACHE" | cut -f1) (deleted); cache now $(du -sh "$bin" | cut -f1)"
