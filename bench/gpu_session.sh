#!/usr/bin/env bash
# Everything a lent GPU machine should run, in two calls of under 10 minutes each (device time is
# scarce; the machine stays warm between them only briefly, so each part builds):
#   run(command="bash bench/gpu_session.sh tests", timeout_s=600)   # gpu tests, copy + kernel benches
#   run(command="bash bench/gpu_session.sh decode", timeout_s=600)  # decode + prefill benches
# Builds moert._C with the machine's own python3 (no package index there), runs the tests marked
# gpu, then the GPU benchmarks. Only 8 files come back from $OUT, so the result tables are packed
# into $OUT/results_PART.tar.gz beside the log: unpack it into bench/results/ here and commit the
# tables with the device, versions and commit they record.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PART=${1:-all}
case "$PART" in tests|decode|all) ;; *) echo "usage: $0 [tests|decode|all]" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/moert-gpu}
PY=${PY:-python3}
RES="$OUT/results"
mkdir -p "$RES"
log="$OUT/gpu_session_$PART.log"
step() { echo "== $* (budget ${STEP_S:-150} s)" | tee -a "$log"; timeout "${STEP_S:-150}" "$@" 2>&1 | tee -a "$log"; }

STEP_S=90 step $PY -m pip install -q --no-build-isolation --no-deps -e .
STEP_S=20 step $PY -m moert info
if [ "$PART" != decode ]; then
  STEP_S=180 step $PY -m pytest -q -m gpu -p no:cacheprovider
  STEP_S=60 step $PY bench/bench_copy.py --device cuda --out "$RES"
  STEP_S=120 step $PY bench/bench_predictive_norm.py --out "$RES"
fi
if [ "$PART" != tests ]; then
  STEP_S=150 step $PY bench/bench_decode.py --device cuda --out "$RES/decode_cuda"
  # real DeepSeek-V2-Lite dims: a layer's union (<= 64 experts) exceeds the cache only below 64 slots
  STEP_S=240 step $PY bench/bench_decode.py --device cuda --prefill-len 512 --prefill-caches 32 48 0.1 \
    --prefill-prompts 3 --out "$RES/prefill_cuda"
fi
ls -la "$RES" | tee -a "$log"
tar -czf "$OUT/results_$PART.tar.gz" -C "$RES" . && rm -rf "$RES"
