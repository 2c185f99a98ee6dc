#!/usr/bin/env bash
# The wheels a GPU sitting carries (the H100/H200 machine: Python 3.12, torch 2.11 + CUDA 13, no network), into .whl/
# (ignored by git; about 27 MB of the call's 64 MiB), each downloaded on its own (one that fails loses only itself):
# - TorchCodec 0.17.0 (cp312, the CUDA 13 build: image decode on CPU and CUDA, no FFmpeg needed for images) and 0.16.0,
#   whose README states torch >= 2.11: the machine has torch 2.11 and 0.17's fit with it is not known, so
#   benchmarks/sitting.sh installs 0.17.0, and 0.16.0 only when 0.17.0 does not import and decode there;
# - xformers 0.0.35 (py39 abi3, torch >= 2.10);
# - nvidia-cuda-runtime-cu12 (libcudart.so.12, which xformers' C++ extension links).
# Run from the repository root where pip reaches PyPI.
set -uo pipefail
DEST=${1:-.whl}
PYVER=${PYVER:-3.12}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p "$DEST/fallback"
status=0
fetch() {  # DEST SPEC
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$1" "$2" || { echo "fetch_wheels: $2 not downloaded" >&2; status=1; }
}
fetch "$DEST" torchcodec==0.17.0
fetch "$DEST/fallback" torchcodec==0.16.0
fetch "$DEST" xformers==0.0.35
fetch "$DEST" nvidia-cuda-runtime-cu12==12.9.79
ls -lR "$DEST"
exit $status
