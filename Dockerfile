# syntax=docker/dockerfile:1
# The finetune-operator controller image: Debian's Python, the `operator` extra of uv.lock and the
# two source packages; no compiler, no pip, no apt or dpkg. Built by `make images`
# (hack/images.sh); with Docker from the repository root:
#   docker build -t finetune-operator:dev .
# Every Python package comes from PyPI through the lock (hash-checked); Debian's packages from the
# base image's archive.
#
# BASE is any Debian 12 image: a registry's (the default) or, where no registry can be reached,
# the one hack/images.sh makes with mmdebstrap.
ARG BASE=docker.io/library/debian:12.12-slim

# ---- build: the dependencies, from the lock, into a virtualenv --------------------------------
FROM ${BASE} AS build

# Debian's packages are not pinned: the archive keeps one version per release, so a pin breaks the
# build at the next security update. The base image pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# uv is pinned to the version the Makefile uses, so the export below matches `make`'s.
ENV UV_VERSION=0.13.9 \
    VIRTUAL_ENV=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never
RUN python3 -m venv /opt/uv \
 && /opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}"
ENV PATH=/opt/uv/bin:$PATH

WORKDIR /src
# Dependencies only: this layer is rebuilt when the lock changes, not when the code does.
COPY pyproject.toml uv.lock README.md ./
# --no-config: the requirements are the lock, exact and hashed; pyproject.toml's override of
# certifi would otherwise replace the locked pin with the newest release, which has no hash here.
# uv's cache is a cache mount: wheels are fetched once per build machine, not kept in the image.
RUN --mount=type=cache,id=finetune-uv,target=/root/.cache/uv \
    uv export --frozen --extra operator --no-dev --no-emit-project -o requirements.txt \
 && uv venv --python /usr/bin/python3 "$VIRTUAL_ENV" \
 && uv pip install --no-config --no-deps --require-hashes -r requirements.txt

# ---- code: the two packages alone, so that they are one layer of the image ----------------------
FROM scratch AS code
COPY operator/finetune_operator /app/finetune_operator
# The operator imports the trainer's spec models; nothing of the trainer imports torch on this path.
COPY trainer-image/finetune_trainer /app/finetune_trainer

# ---- runtime: Python, the virtualenv, the code ------------------------------------------------
FROM ${BASE}

LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Kubernetes operator for 4-bit LoRA fine-tuning jobs" \
      org.opencontainers.image.licenses="Apache-2.0"

# Python, then the package managers go: the operator installs nothing at run time, and a package
# manager in a controller with cluster credentials is only attack surface. apt is purged through
# dpkg, then dpkg's own programs are deleted; its database (/var/lib/dpkg/status) stays, so image
# scanners still see which Debian packages the image holds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt /var/log/apt \
 && dpkg --purge --force-remove-essential apt \
 && rm -rf /etc/apt /usr/bin/dpkg* /usr/sbin/dpkg* /usr/share/doc /usr/share/man \
 && echo "nonroot:x:65532:65532:nonroot:/tmp:/usr/sbin/nologin" >>/etc/passwd \
 && echo "nonroot:x:65532:" >>/etc/group

COPY --from=build /opt/venv /opt/venv
COPY --from=code /app /opt/app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

# A numeric UID so `runAsNonRoot` can be verified by the kubelet without reading /etc/passwd; the
# passwd entry above is for kopf, which looks its user up (getpwuid) and stops without one. The
# process writes nothing but /tmp (an emptyDir in the chart; the root filesystem is read-only).
USER 65532:65532
ENTRYPOINT ["python", "-m", "finetune_operator", "run"]
