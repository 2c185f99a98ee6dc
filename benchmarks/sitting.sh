#!/usr/bin/env bash
# One GPU sitting as one device call, from the repository root (CONTRIBUTING.md, "GPU sittings", has the exact call):
#
#   bash benchmarks/sitting.sh [LIMIT_S [STAGES]]    # LIMIT_S: the call's timeout_s (default 540); STAGES: the plan
#
# $OUT (the folder whose files come back, 8 at most) gets two files: sitting.log (everything printed, as it is
# printed) and sitting.tgz (the run folder: every results JSON, rewritten after every row; every stage log with every
# command's exit line; smoke.jsonl, sitting.jsonl, facts.json, probes.jsonl), re-packed every 5 s, after every command
# and at the end. So a call cut short brings back every row finished before the cut.
#
# In order, each step under its own timeout and all of it under LIMIT_S - 30 s (the 30 s stop, reap and pack):
# 1. facts: nvidia-smi, Python, torch (import and CUDA init times), triton, torchvision, the GPU and its memory, and
#    ../shared/GPU.md's claims about the image said to hold or not (first call on a machine only);
# 2. the carried wheels (.whl, benchmarks/fetch_wheels.sh) installed one by one (one that fails loses only itself):
#    TorchCodec and xformers into $SITE, nvidia-cuda-runtime-cu12 (the libcudart.so.12 xformers' C++ extension links)
#    into $CU12, both on PYTHONPATH (torch's import preloads the first nvidia/cuda_runtime/lib/libcudart.so.* on
#    sys.path, which lets the extension load; the smoke stage's -noext checks run without $CU12); then fastmae itself;
# 3. probes: TorchCodec (import, a CPU and a CUDA decode; when 0.17 fails, the fallback wheel in .whl/fallback, whose
#    README states torch >= 2.11, is installed instead), xformers (import, extension, operators), fastmae (first call
#    on a machine only, as the installs);
# 4. the sitting (benchmarks/gpu_sitting.py --resume: a second call on the same warm machine skips what the first
#    finished), its own deadline 10 s before the timeout that would stop it.
# SIGTERM, SIGINT or SIGHUP (the device tool ending the call) stops the step running, ends every process of the sitting
# (they carry FASTMAE_SITTING in their environment), packs, and exits 128 + the signal.
#
# Rehearsed on a CPU with PY, WHEELS, OUT, RUN, SITE, CU12 set (every GPU command fails fast there);
# SITTING_SKIP=install,facts,probes and SITTING_MARGIN are for the tests, never for a GPU call.
set -uo pipefail
LIMIT=${1:-540}
STAGES=${2:-smoke,step,codec,feed}
: "${OUT:?set OUT to the folder whose files come back}"
MARGIN=${SITTING_MARGIN:-30}
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
CU12=${CU12:-/tmp/cu12}
RUN=${RUN:-/tmp/sitting}
SKIP=",${SITTING_SKIP:-},"
START=$SECONDS
install=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
mkdir -p "$OUT" "$RUN" "$SITE" "$CU12" || exit 2
# Everything printed also goes to $OUT/sitting.log as it is printed; tee ignores the signals that stop the sitting and
# carries no marker (the reaper leaves it), so it writes the last lines too.
exec > >(trap '' INT TERM HUP; exec env -u FASTMAE_SITTING tee -a "$OUT/sitting.log") 2>&1
TEE=$!
export FASTMAE_SITTING=${FASTMAE_SITTING:-$(date +%s)-$$} PYTHONUNBUFFERED=1  # every process of the sitting has it

say() { echo "# $(date -u +%H:%M:%S) +$((SECONDS - START))s sitting.sh: $*"; }
left() { echo $((LIMIT - MARGIN - (SECONDS - START))); }
pack() {
  tar czf "$OUT/sitting.tgz.part" --exclude='.*' -C "$(dirname "$RUN")" "$(basename "$RUN")" &&
    mv -f "$OUT/sitting.tgz.part" "$OUT/sitting.tgz"
}
CHILD=
step() {  # SECONDS NAME COMMAND...: one step under its own timeout, in the background (a signal stops it at once)
  local limit=$1 name=$2 rc
  shift 2
  if ((limit > $(left))); then limit=$(left); fi
  if ((limit < 1)); then
    say "$name: not run (the call's time is spent)"
    return 124
  fi
  timeout -k 10 "$limit" "$@" &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=
  say "$name: exit $rc"
  return $rc
}
finish() {
  trap '' INT TERM HUP
  timeout -k 5 20 "$PY" benchmarks/gpu_sitting.py --reap || say "reap: exit $?"
  pack || say "pack: exit $?"
  say "exit $1 after $((SECONDS - START)) s of $LIMIT; \$OUT holds: $(cd "$OUT" && ls | tr '\n' ' ')"
  exec >&- 2>&-
  wait "$TEE" 2>/dev/null
  exit "$1"
}
stopped() {  # NAME NUMBER
  say "got SIG$1: stopping"
  if [ -n "$CHILD" ]; then
    kill -TERM "$CHILD" 2>/dev/null
    wait "$CHILD"
  fi
  finish $((128 + $2))
}
trap 'stopped TERM 15' TERM
trap 'stopped INT 2' INT
trap 'stopped HUP 1' HUP

say "limit $LIMIT s (everything done by $((LIMIT - MARGIN)) s), stages $STAGES, run folder $RUN, \$OUT $OUT," \
  "marker FASTMAE_SITTING=$FASTMAE_SITTING, wheels: $(ls "$WHEELS" 2>/dev/null | tr '\n' ' ')"
if [[ $SKIP != *,facts,* && ! -s $RUN/facts.json ]]; then
  step 150 facts "$PY" benchmarks/gpu_sitting.py --facts "$RUN/facts.json"
  pack
fi
if [[ $SKIP != *,install,* ]]; then
  if [ -e "$SITE/.installed" ]; then
    say "wheels and fastmae: installed by an earlier call on this machine"
  else
    for whl in "$WHEELS"/*.whl; do
      [ -e "$whl" ] || { say "no wheels in $WHEELS"; break; }
      case $(basename "$whl") in
        nvidia_cuda_runtime_cu12-*) target=$CU12 ;;
        *) target=$SITE ;;
      esac
      step 90 "install $(basename "$whl")" "${install[@]}" --target "$target" "$whl"
    done
    step 120 "install fastmae" "$PY" -m pip install -q --no-deps --no-build-isolation -e . && touch "$SITE/.installed"
  fi
fi
export PYTHONPATH="$SITE:$CU12${PYTHONPATH:+:$PYTHONPATH}"
if [[ $SKIP == *,probes,* ]]; then
  :
elif [[ -e $SITE/.installed && -s $RUN/probes.jsonl ]]; then
  say "probes: run by an earlier call on this machine ($RUN/probes.jsonl)"
else
  probe=("$PY" benchmarks/gpu_sitting.py --probe-out "$RUN/probes.jsonl" --probe)
  if ! step 90 "probe torchcodec" "${probe[@]}" torchcodec && [[ $SKIP != *,install,* ]]; then
    for whl in "$WHEELS"/fallback/torchcodec-*.whl; do
      [ -e "$whl" ] || break
      rm -rf "$SITE"/torchcodec "$SITE"/torchcodec-*.dist-info "$SITE"/torchcodec.libs
      step 90 "install $(basename "$whl") (fallback)" "${install[@]}" --target "$SITE" "$whl" &&
        step 90 "probe torchcodec (fallback)" "${probe[@]}" torchcodec
    done
  fi
  step 90 "probe xformers" "${probe[@]}" xformers
  step 90 "probe fastmae" "${probe[@]}" fastmae
  pack
fi
L=$(left)
step "$L" sitting "$PY" benchmarks/gpu_sitting.py --stage "$STAGES" --out "$RUN" --deadline $((L - 10)) \
  --pack "$OUT/sitting.tgz" --resume
finish $?
