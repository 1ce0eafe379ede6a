#!/usr/bin/env bash
# buildah on the project's image store ($FINETUNE_CACHE/containers), the one hack/images.sh builds
# into and the test kubelet runs images from: `hack/buildah.sh images`, `hack/buildah.sh push IMAGE
# docker://registry.example/finetune-operator:0.1.0`.
set -euo pipefail
store="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/containers"
exec buildah --root "$store/storage" --runroot "$store/runroot" \
  --storage-driver "${STORAGE_DRIVER:-overlay}" "$@"
