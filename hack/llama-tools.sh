#!/usr/bin/env bash
# Put llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py)
# into a versioned cache outside the repository, from the llama-cpp-python sdist that vendors the
# whole llama.cpp tree. The quantizer and loader come from the llama-cpp-python package itself
# (ctypes bindings, built by `uv sync`); only the Python converter is missing from its wheel.
# Idempotent: an extracted tree is not fetched again.
#
#   FINETUNE_CACHE  cache root (default ~/.cache/finetune-operator); the tree lands in
#                   $FINETUNE_CACHE/llama.cpp-$LLAMA_CPP_PYTHON_VERSION/ (the trainer reads it through
#                   LLAMA_CPP_DIR, whose default is that folder)
#   PYTHON          interpreter with pip, for `pip download` (default python3)
# Keep the version in step with pyproject.toml's llama-cpp-python pin.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
dest="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
marker="$dest/.complete"

if [[ -f "$marker" ]]; then
  echo "llama.cpp converter present in $dest"
  exit 0
fi

start=$SECONDS
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo ">> fetching the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
# --no-binary for this package only: with :all:, pip also builds every build dependency it needs
# to read the sdist's metadata from source, recursively (tens of minutes in a clean image).
"${PYTHON:-python3}" -m pip download -q --no-binary llama-cpp-python --no-deps -d "$work" \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
sdist="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
fetched=$((SECONDS - start))

# Only the converter's files: the C++ sources (about 75 MB) are built by the package, not here.
top="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
tar -xzf "$sdist" -C "$work" "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$work/$top" "$dest"
touch "$marker"
echo "llama.cpp converter extracted to $dest (download ${fetched}s, total $((SECONDS - start))s)"
