#!/usr/bin/env bash
# Build the images (`make images`): the operator (Dockerfile), the GPU trainer and the CPU trainer
# (trainer-image/Dockerfile, EXTRAS picks the variant), with buildah, no daemon and no registry.
#
#   hack/images.sh [operator] [trainer-cpu] [trainer-gpu]    (default: all three)
#   hack/images.sh tags                                       (prints "<image> <tag>" lines)
#
#   BASE       base image of all three; default: a Debian 12 minbase root file system made here by
#              mmdebstrap from Debian's archive and kept as the local image localhost/debian:12-minbase
#              (on a CI that reaches a registry: BASE=docker.io/library/debian:12.12-slim)
#   REGISTRY   image name prefix (default ghcr.io/finetune-dev, the chart's defaults); the tags are the
#              chart's appVersion, the CPU trainer's with a -cpu suffix
#   FINETUNE_CACHE  the build cache: buildah's image store (every layer, so an unchanged layer is
#              reused) lives in $FINETUNE_CACHE/containers; uv's cache (UV_CACHE_DIR, default
#              ~/.cache/uv, shared with `make venv`) is the Dockerfiles' cache mount
#   STORAGE_DRIVER  overlay (default) or vfs where the kernel refuses overlay mounts; vfs copies every
#              layer whole (a trainer image then takes ~3x its size on disk)
#
# apt-get installs buildah and mmdebstrap when they are missing (Debian's packages). Prints one line
# per image: name, build seconds, size on disk. hack/buildah.sh runs buildah on the same store
# (`hack/buildah.sh images`, `hack/buildah.sh push ...`, `hack/buildah.sh rmi --prune` to free the
# layers of earlier builds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cache="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}"
version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/finetune-operator/Chart.yaml)"
registry="${REGISTRY:-ghcr.io/finetune-dev}"
declare -A tags=(
  [operator]="$registry/finetune-operator:$version"
  [trainer-gpu]="$registry/finetune-trainer:$version"
  [trainer-cpu]="$registry/finetune-trainer:$version-cpu"
)
if [[ "${1:-}" == tags ]]; then
  for image in operator trainer-cpu trainer-gpu; do echo "$image ${tags[$image]}"; done
  exit 0
fi
[[ $# -gt 0 ]] || set -- operator trainer-cpu trainer-gpu

if ! command -v buildah >/dev/null || { [[ -z "${BASE:-}" ]] && ! command -v mmdebstrap >/dev/null; }; then
  echo ">> installing buildah and mmdebstrap from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah mmdebstrap \
    >/dev/null
fi

buildah() { hack/buildah.sh "$@"; }

# Cache mounts (RUN --mount=type=cache) live under buildah's TMPDIR; the uv one is uv's own cache, so
# wheels `make venv` fetched (torch and its CUDA libraries: gigabytes) are not fetched again.
# (buildah-cache/ as root, buildah-cache-<uid>/ rootless). A cache already there stays.
export TMPDIR="$cache/containers/tmp"
uv_cache="${UV_CACHE_DIR:-$HOME/.cache/uv}"
mkdir -p "$uv_cache"
for parent in "$TMPDIR/buildah-cache" "$TMPDIR/buildah-cache-$(id -u)"; do
  mkdir -p "$parent"
  [[ -e "$parent/finetune-uv" ]] || ln -s "$uv_cache" "$parent/finetune-uv"
done

if [[ -z "${BASE:-}" ]]; then
  BASE=localhost/debian:12-minbase
  if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    start=$SECONDS
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    echo ">> $BASE: Debian 12 minbase by mmdebstrap"
    # This machine's extra trust anchors (a TLS-inspecting proxy's CA, say) go into the base, as a
    # company base image carries its CA: pip, uv and apt inside the builds then reach the same
    # registries the machine does. A registry's base needs none of it.
    mmdebstrap --quiet --variant=minbase --include=ca-certificates \
      --customize-hook='for f in /usr/local/share/ca-certificates/*.crt; do
          [ -e "$f" ] && cp "$f" "$1/usr/local/share/ca-certificates/"; done; true' \
      --customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
      bookworm "$work/rootfs.tar"
    bundle=/etc/ssl/certs/ca-certificates.crt
    printf 'FROM scratch\nADD rootfs.tar /\nENV SSL_CERT_FILE=%s PIP_CERT=%s\nCMD ["bash"]\n' \
      "$bundle" "$bundle" >"$work/Containerfile"
    buildah bud --quiet --isolation chroot -t "$BASE" -f "$work/Containerfile" "$work" >/dev/null
    echo "$BASE built in $((SECONDS - start))s"
  fi
fi

build() { # name, tag, Dockerfile, build args...
  local name=$1 tag=$2 file=$3 start=$SECONDS
  shift 3
  echo ">> $tag ($file, base $BASE)"
  buildah bud --layers --pull=never --isolation chroot --network host --format docker \
    --build-arg "BASE=$BASE" "$@" -f "$file" -t "$tag" . >"$cache/containers/build-$name.log" 2>&1 || {
    tail -40 "$cache/containers/build-$name.log"
    echo "$name: build failed; log: $cache/containers/build-$name.log" >&2
    return 1
  }
  local size
  size="$(buildah images --format '{{.Size}}' "$tag" | head -1)"
  echo "$tag built in $((SECONDS - start))s, $size on disk"
}

for image in "$@"; do
  case "$image" in
    operator) build operator "${tags[operator]}" Dockerfile ;;
    trainer-gpu)
      build trainer-gpu "${tags[trainer-gpu]}" trainer-image/Dockerfile \
        --build-arg "EXTRAS=train unsloth export tracking" ;;
    trainer-cpu)
      build trainer-cpu "${tags[trainer-cpu]}" trainer-image/Dockerfile \
        --build-arg "EXTRAS=train export tracking" ;;
    *) echo "unknown image $image (operator, trainer-cpu, trainer-gpu)" >&2; exit 2 ;;
  esac
done
