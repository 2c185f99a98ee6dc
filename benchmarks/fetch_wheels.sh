#!/usr/bin/env bash
# The wheels a GPU sitting carries (the H200 machine: Python 3.12, torch 2.11 + CUDA 13, no network), into .whl/
# (ignored by git; 16 MB of the call's 64 MiB): TorchCodec 0.17.0 (cp312, the CUDA 13 build: image decode on CPU and
# CUDA, no FFmpeg needed for images), xformers 0.0.35 (py39 abi3) and nvidia-cuda-runtime-cu12 (libcudart.so.12, which
# xformers' C++ extension links). Run from the repository root where pip reaches PyPI.
set -euo pipefail
DEST=${1:-.whl}
PYVER=${PYVER:-3.12}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$DEST" torchcodec==0.17.0 xformers==0.0.35 nvidia-cuda-runtime-cu12==12.9.79
ls -l "$DEST"
