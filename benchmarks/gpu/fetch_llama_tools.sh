#!/usr/bin/env bash
# Build, here (a machine with the registries), what the export benchmark needs of llama.cpp on the
# GPU machine, into the git-ignored folder .whl-llama/ (about 9 MiB; carried beside .whl/):
#   llama_cpp.tgz   the llama-cpp-python package (ctypes bindings and libllama/libggml), compiled
#                   from its sdist with GGML_NATIVE=OFF exactly as trainer-image/Dockerfile does, so
#                   it runs on any x86-64 CPU with AVX2 and measures what the image would (glibc
#                   2.34 and libstdc++ of GCC 11 or newer; OpenMP's runtime travels with it)
#   converter.tgz   llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py (hack/llama-tools.sh)
#   diskcache-*.whl the one dependency of llama_cpp that the GPU machine lacks
# The bindings are pure ctypes, so a build under this machine's Python 3.11 loads under 3.12 there.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file
grep -qx '/.whl-llama/' "$exclude" 2>/dev/null || echo '/.whl-llama/' >> "$exclude"
CACHE=${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}
UV=${UV:-$CACHE/uv-0.13.9/bin/uv}
VERSION=0.3.36  # pyproject.toml's llama-cpp-python pin
out=.whl-llama
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rm -rf "$out" && mkdir -p "$out"

CMAKE_ARGS="-DGGML_NATIVE=OFF" "$UV" pip install -q --no-config --no-deps --no-cache \
    --python "$(command -v python3)" --target "$work/site" "llama-cpp-python==$VERSION"
# libggml links OpenMP's runtime; the libraries' RUNPATH is $ORIGIN, so a copy beside them is found
# on a machine without libgomp1.
cp -L "$(gcc -print-file-name=libgomp.so.1)" "$work/site/llama_cpp/lib/"
tar -czf "$out/llama_cpp.tgz" -C "$work/site" llama_cpp
FINETUNE_CACHE=$CACHE PYTHON=$CACHE/uv-0.13.9/bin/python hack/llama-tools.sh
tar -czf "$out/converter.tgz" -C "$CACHE" "llama.cpp-$VERSION"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$out" "diskcache>=5.6.1"
du -sh "$out"
