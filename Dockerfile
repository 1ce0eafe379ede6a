# syntax=docker/dockerfile:1
# The finetune-operator controller image: CPython slim, the `operator` extra of uv.lock and the
# two source packages, nothing else. Build from the repository root:
#   docker build -t finetune-operator:dev .
# Every package comes from PyPI through the lock (hash-checked); no other network access.

# ---- build: resolve and install into a virtualenv ------------------------------------------
FROM python:3.11.14-slim-bookworm AS build

# uv is pinned to the version the Makefile uses, so the export below matches `make`'s.
ENV UV_VERSION=0.13.9 \
    VIRTUAL_ENV=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never
RUN python -m pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /src
# Dependencies first: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv export --frozen --extra operator --no-dev --no-emit-project -o requirements.txt
# --no-config: the requirements are the lock, exact and hashed; pyproject.toml's override of
# certifi would otherwise replace the locked pin with the newest release, which has no hash here.
RUN uv venv "$VIRTUAL_ENV" \
 && uv pip install --no-config --no-deps --require-hashes -r requirements.txt

# The project itself (no dependencies: they are all above, from the lock). The operator imports
# the trainer's spec models, so both packages are installed; nothing of the trainer imports torch
# at module level on this path.
COPY operator/finetune_operator operator/finetune_operator
COPY trainer-image/finetune_trainer trainer-image/finetune_trainer
RUN uv pip install --no-deps .

# ---- runtime: the same Python, the virtualenv, no pip/uv/compiler ---------------------------
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Kubernetes operator for 4-bit LoRA fine-tuning jobs" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

# A numeric UID so `runAsNonRoot` can be verified by the kubelet without reading /etc/passwd. The
# process writes nothing but /tmp (an emptyDir in the chart; the root filesystem is read-only).
USER 65532:65532
ENTRYPOINT ["python", "-m", "finetune_operator", "run"]
