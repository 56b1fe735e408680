#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (device time is scarce):
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
# Builds moert._C with the machine's own python3 (no package index there), runs the tests marked
# gpu, then the GPU benchmarks. Only 8 files come back from $OUT, so the result tables are packed
# into $OUT/results.tar.gz beside the log: unpack it into bench/results/ here and commit the
# tables with the device, versions and commit they record.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/moert-gpu}
PY=${PY:-python3}
RES="$OUT/results"
mkdir -p "$RES"
log="$OUT/gpu_session.log"
step() { echo "== $* (budget ${STEP_S:-150} s)" | tee -a "$log"; timeout "${STEP_S:-150}" "$@" 2>&1 | tee -a "$log"; }

STEP_S=90 step $PY -m pip install -q --no-build-isolation --no-deps -e .
STEP_S=20 step $PY -m moert info
STEP_S=180 step $PY -m pytest -q -m gpu -p no:cacheprovider
STEP_S=60 step $PY bench/bench_copy.py --device cuda --out "$RES"
STEP_S=90 step $PY bench/bench_predictive_norm.py --out "$RES"
STEP_S=150 step $PY bench/bench_decode.py --device cuda --out "$RES/decode_cuda"
ls -la "$RES" | tee -a "$log"
tar -czf "$OUT/results.tar.gz" -C "$RES" . && rm -rf "$RES"
