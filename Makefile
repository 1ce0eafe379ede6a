# Two entry points for people: `make demo` and `make test`. Everything they need is installed
# on first use and cached outside the repository (CACHE), so a brand-new machine needs only
# python3, go and a C compiler.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CACHE ?= $(HOME)/.cache/finetune-operator
UV_VERSION := 0.13.9
UV := $(CACHE)/uv-$(UV_VERSION)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/tests

.PHONY: demo demo-trainer test lint crds venv llama-tools images check-images

venv: $(VENV)/.synced

$(UV):
	python3 -m venv $(CACHE)/uv-$(UV_VERSION)
	$(CACHE)/uv-$(UV_VERSION)/bin/pip install -q uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra operator --extra train --extra export --extra tracking --group dev
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

crds: venv
	$(PY) -m finetune_operator crds

# llama.cpp's HF -> GGUF converter, from the llama-cpp-python sdist, into $(CACHE).
llama-tools: | $(UV)
	FINETUNE_CACHE=$(CACHE) PYTHON=$(CACHE)/uv-$(UV_VERSION)/bin/python hack/llama-tools.sh

# On a brand-new machine this builds the Kubernetes binaries (~15 min on 2 cores), the Python
# environment (torch, ~5 min) and llama.cpp (~7 min) once; later runs reuse $(CACHE) and uv's cache.
test: venv lint cluster-bins llama-tools
	FINETUNE_CACHE=$(CACHE) $(PY) -m pytest

# The images (hack/images.sh, docs/install.md): the operator, the CPU trainer and the GPU trainer,
# tagged ghcr.io/finetune-dev/...:<the chart's appVersion> (REGISTRY= to change the prefix), built
# with buildah on a Debian base made by mmdebstrap (BASE= for a registry's). Layers are cached in
# $(CACHE)/containers. check-images runs the tests marked `images` (inside the images, and the e2e
# from them), which `make test` skips: about 14 more minutes cold on 2 cores.
images:
	FINETUNE_CACHE=$(CACHE) hack/images.sh

check-images: venv images cluster-bins llama-tools
	FINETUNE_IMAGE_TESTS=1 FINETUNE_CACHE=$(CACHE) $(PY) -m pytest -m images

# The main job end to end on embedded defaults (hack/demo.py, about 2 minutes): the local control
# plane and S3, the CRD, the operator, the FineTuneJob of examples/tiny (a tiny model trained on the
# CPU), its pod evicted once and resumed from the checkpoint, `kubectl get ftj` along the way, the
# adapter, the q8_0 GGUF and the checkpoints listed from S3; then everything is stopped (logs stay
# in out/demo/).
demo: venv cluster-bins llama-tools
	FINETUNE_CACHE=$(CACHE) $(PY) hack/demo.py

# The trainer alone, without Kubernetes: the same tiny job run directly on this machine.
demo-trainer: venv llama-tools
	FINETUNE_CACHE=$(CACHE) hack/demo-trainer.sh $(PY)

# A real control plane (kube-apiserver, etcd, ...; hack/cluster-bins.sh builds them once into
# $(CACHE)), the test kubelet's GPU node and S3, for a person: prints `export KUBECONFIG=...`.
# `make cluster KUEUE=1` also runs the Kueue manager (Jobs labelled kueue.x-k8s.io/queue-name are
# queued; apply deploy/kueue for a quota).
.PHONY: cluster cluster-bins
cluster-bins:
	FINETUNE_CACHE=$(CACHE) hack/cluster-bins.sh

cluster: venv cluster-bins
	FINETUNE_CACHE=$(CACHE) $(PY) -m localkube $(if $(filter-out 0,$(KUEUE)),--kueue)

# The operator at scale (benchmarks/operator/README.md): for each N in JOBS, a fresh local control
# plane with kwok GPU nodes, N FineTuneJobs at once driven through running, preemption and
# completion; then results/latest.json, scaling.json and plot.png. FAULT=kill-operator,
# restart-apiserver or refuse-status runs the long form of that fault test instead. About 2, 3 and
# 10 minutes for 100, 300 and 1000 jobs on 2 CPUs.
.PHONY: bench-operator
JOBS ?= 100 300 1000
bench-operator: venv cluster-bins
	FINETUNE_CACHE=$(CACHE) $(PY) benchmarks/operator/bench.py --jobs $(JOBS) $(if $(FAULT),--fault $(FAULT))
	$(if $(FAULT),,$(PY) benchmarks/operator/report.py)
