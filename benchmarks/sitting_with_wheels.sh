#!/usr/bin/env bash
# One GPU sitting with the carried wheels (TorchCodec, xformers, the CUDA 12 runtime xformers' extension links), as
# one device call runs it from the repository root:
#
#   bash benchmarks/sitting_with_wheels.sh smoke,codec        # $OUT: sitting.log, sitting.tgz (every JSON and log)
#
# The wheels are in .whl/ (benchmarks/fetch_wheels.sh writes them here; the call carries .whl). TorchCodec and xformers
# go to /tmp/site, nvidia-cuda-runtime-cu12 to /tmp/cu12, both on PYTHONPATH: torch's import preloads the first
# nvidia/cuda_runtime/lib/libcudart.so.* it finds on sys.path, which lets xformers' C++ extension load; the smoke
# stage's -noext checks run without /tmp/cu12. Rehearsed on a CPU with PY, WHEELS and OUT set (CONTRIBUTING.md, the GPU sitting).
set -uo pipefail
STAGES=${1:-smoke,codec}
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:?set OUT to the folder whose files come back}
SITE=${SITE:-/tmp/site}
CU12=${CU12:-/tmp/cu12}
RUN=${RUN:-/tmp/sitting}
mkdir -p "$OUT"
install=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
{
  echo "# $(date -u +%FT%TZ) stages $STAGES, wheels: $(ls "$WHEELS" 2>/dev/null | tr '\n' ' ')"
  "${install[@]}" --target "$SITE" "$WHEELS"/torchcodec-*.whl "$WHEELS"/xformers-*.whl || echo "# wheels: exit $?"
  "${install[@]}" --target "$CU12" "$WHEELS"/nvidia_cuda_runtime_cu12-*.whl || echo "# cuda 12 runtime: exit $?"
  export PYTHONPATH="$SITE:$CU12${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "# fastmae: exit $?"
  "$PY" -c "import torch, torchcodec, xformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  'torchcodec', torchcodec.__version__, 'xformers', xformers.__version__, 'extension', xformers._has_cpp_library)"
  PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_sitting.py --stage "$STAGES" --out "$RUN"
  echo "# sitting: exit $?"
} 2>&1 | tee "$OUT/sitting.log"
tar czf "$OUT/sitting.tgz" -C "$(dirname "$RUN")" "$(basename "$RUN")"
