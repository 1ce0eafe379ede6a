#!/usr/bin/env bash
# Download, here (a machine with network), the wheels the GPU machine lacks, into the git-ignored
# folder .whl/ at the repository root, trimmed so that all of them fit one `run` call (64 MiB):
# bitsandbytes keeps only its CUDA 13.0 library (the device has torch cu130), unsloth drops its
# Studio web app, botocore keeps the S3/STS service models, moto drops EC2/SSM fixtures.
# Versions: the working set of shared/notes/gpu-recipe.md plus the trainer's own needs (pydantic,
# boto3) and moto's S3 server for the checkpoint measurement, at the versions of uv.lock.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
P=""
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
    P="$P --platform ${tag}_x86_64"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .whl \
    bitsandbytes==0.50.2 unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 torchao==0.18.0 \
    cut_cross_entropy==25.1.1 tyro==1.0.17 msgspec json5 nest_asyncio structlog 'dill<0.4.2' 'multiprocess<0.70.20' \
    docstring-parser shtab typeguard \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    boto3==1.44.5 botocore==1.44.5 s3transfer==0.19.3 jmespath==1.1.0 \
    moto==5.2.5 xmltodict==1.0.4 responses==0.26.3 flask==3.1.3 flask-cors==6.0.5 itsdangerous==2.2.0 \
    blinker==1.9.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 py-partiql-parser==0.6.3
rm -f .whl/hf_transfer-*.whl
python3 benchmarks/gpu/trim_wheels.py .whl
du -sh .whl
