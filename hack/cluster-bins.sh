#!/usr/bin/env bash
# Build the binaries of a real Kubernetes control plane from Go modules, into a versioned cache
# outside the repository: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd,
# kwok and helm. Idempotent: a binary already in the cache is not rebuilt.
#
#   FINETUNE_CACHE  cache root (default ~/.cache/finetune-operator); binaries land in
#                   $FINETUNE_CACHE/k8s-$KUBE_VERSION/bin
#   KUBE_BIN_DIR    use existing binaries from this directory instead; nothing is built
#
# The Go build cache grows to several GiB for these, so each run uses a throw-away GOCACHE; the
# module cache (GOMODCACHE) is kept so a later build needs no downloads.
# Keep KUBE_VERSION in step with tests/localkube/binaries.py.
set -euo pipefail

KUBE_VERSION=v1.34.4
ETCD_VERSION=v3.6.5   # also in hack/cluster-bins/etcd/go.mod
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.19.0
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm)

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -n "${KUBE_BIN_DIR:-}" ]]; then
  missing=0
  for b in "${BINARIES[@]}"; do
    [[ -x "$KUBE_BIN_DIR/$b" ]] || { echo "KUBE_BIN_DIR=$KUBE_BIN_DIR has no $b" >&2; missing=1; }
  done
  [[ $missing == 0 ]] && echo "using binaries in KUBE_BIN_DIR=$KUBE_BIN_DIR"
  exit "$missing"
fi

bin="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/k8s-$KUBE_VERSION/bin"
mkdir -p "$bin"

todo=()
for b in "${BINARIES[@]}"; do [[ -x "$bin/$b" ]] || todo+=("$b"); done
if [[ ${#todo[@]} == 0 ]]; then
  echo "all binaries present in $bin"
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

echo "built into $bin:"
printf '  %s\n' "${report[@]}"
echo "  GOCACHE used $(du -sh "$GOCACHE" | cut -f1) (deleted); cache now $(du -sh "$bin" | cut -f1)"
