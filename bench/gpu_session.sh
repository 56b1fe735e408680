#!/usr/bin/env bash
# Everything a lent GPU machine should run, in two calls of under 10 minutes each (device time is
# scarce; the machine stays warm between them only briefly, so each part builds):
#   run(command="MOERT_COMMIT=<sha> bash bench/gpu_session.sh tests", timeout_s=600)   # gpu tests, copy + kernel benches
#   run(command="MOERT_COMMIT=<sha> bash bench/gpu_session.sh decode", timeout_s=540)  # decode + prefill benches
# (<sha>: `git rev-parse --short HEAD` here; the machine gets the tree with stale git metadata)
# Builds moert._C with the machine's own python3 (MOERT_CUDA=ON: a build without the CUDA backend is
# an error there; it needs no CUDA toolkit: the driver is loaded at run time), checks that the CUDA
# backend can run (the driver's version and devices, or the reason), runs the tests marked gpu
# (pytest-xdist workers; they compile 37 Triton kernel variants, counted on the CPU by
# bench/gpu_compile_count.py: bench/results/gpu_compile_count.md), then the GPU benchmarks. Only 8 files come back from $OUT, so the result
# tables are packed into $OUT/results_PART.tar.gz beside the log: unpack it into bench/results/ here
# and commit the tables with the device, versions and commit they record.
#
# The decode call fits 8 minutes with margin: its step budgets sum to 450 s (install 120, info 15,
# can-run 15, bench-decode 180, bench-prefill 120). The benches patch the model once, fill the
# 28.8 GB pinned pool once and switch every configuration by `PatchHandle.reconfigure` (a new device
# cache, engine and policy over the same pool; bench/_one_pool.py), where they used to fill and undo
# the pool per configuration (~8 s or more each at this size, estimated in bench/results/setup_reuse.md,
# where a reconfigure measures ~2% of a patch + undo on the CPU twin and the device model). Expected
# times, from the first session's H200 figures (all-resident decode 5.4 tok/s, moert 10-15 tok/s,
# naive 6 tok/s; prefill 0.4-0.6 s per 512-token prompt through moert) plus ~30 s estimated for the
# one pool fill (not measured yet): bench-decode ~120 s to the end of its first round (imports and
# model 20 s, predictor capture 6 prompts x 33 steps ~40 s, fill ~30 s, a round of 13 configs x 19
# steps x ~0.12 s ~35 s: by these figures the second round does not fit the run budget and is
# skipped); bench-prefill ~75 s with one round (imports and model 20 s, fill ~30 s, a round of 7
# configs x 4 prefills ~20 s), ~100 s with the second. Sum: install (~60-120 s) + ~5 s + ~120 s +
# ~100 s = 5-6 minutes expected, 450 s at most. Each bench gets
# a run budget (--time-budget 135 s / 90 s, counted from its start after the imports) under its step
# budget: a config of the first round starts only inside it, a second round only if it ends inside
# it, and the undo, the last unpatched run and
# the writing (~15 s) still fit the step, so a slow machine ends with one round written instead of a
# killed step with nothing (configs skipped in the first round are written as skipped and fail the
# step: exit 1 after writing). Each bench records its real
# set-up times (`setup` in decode_cuda.json / prefill_cuda.json) for the next sizing.
#
# It cannot pass silently: every step runs under its own time budget; a failed or timed-out step is
# named and makes the script exit 1 (the later steps still run, so one failure does not cost the
# rest of the session's results); a failed install stops it at once (`PY=false bash
# bench/gpu_session.sh tests` exits 1). `--dry-run` runs every step's command on the CPU, each
# GPU-only step replaced by its CPU equivalent (CI runs it through `make gpu-dry-run` in .ci/run;
# `make test` does not), so the script itself is tested:
#   bash bench/gpu_session.sh --dry-run [tests|decode|all]
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PART=all
DRY=0
for arg in "$@"; do
  case "$arg" in
    tests | decode | all) PART=$arg ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: $0 [--dry-run] [tests|decode|all]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/moert-gpu}
if [ "$DRY" = 1 ]; then
  PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  OUT=${OUT%/}/dry-run
else
  PY=${PY:-python3}
fi
RES="$OUT/results"
mkdir -p "$RES"
log="$OUT/gpu_session_$PART.log"
: >"$log"
FAILED=()

# step NAME BUDGET_S CMD...: runs CMD under `timeout`, output to the log; a failure is remembered.
step() {
  local name=$1 budget=$2
  shift 2
  echo "== $name: $* (budget $budget s)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$budget" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    local why="exit $rc"
    [ "$rc" -eq 124 ] && why="timed out after $budget s"
    echo "!! step '$name' FAILED ($why)" | tee -a "$log"
    FAILED+=("$name ($why)")
  else
    echo "== $name: ok in $((SECONDS - t0)) s" | tee -a "$log"
  fi
  return "$rc"
}

finish() {
  ls -la "$RES" | tee -a "$log"
  if ! tar -czf "$OUT/results_$PART.tar.gz" -C "$RES" .; then
    FAILED+=("pack results")
  fi
  rm -rf "$RES"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_session $PART: ${#FAILED[@]} step(s) FAILED: ${FAILED[*]}" | tee -a "$log"
    exit 1
  fi
  echo "gpu_session $PART: every step passed$([ "$DRY" = 1 ] && echo ' (dry run on the CPU)')" | tee -a "$log"
  exit 0
}

# the CUDA backend must be able to run: it prints the driver and devices, or fails naming the reason
CUDA_CAN_RUN='from moert.engine.runtime import backends; b = backends()["cuda"]; print(b); assert b["can_run"], b["reason"]'

if [ "$DRY" = 1 ]; then
  # the same install, with the CUDA backend compiled (no toolkit needed); nothing runs on a GPU
  MOERT_CUDA=ON step install 300 $PY -m pip install -q --no-build-isolation --no-deps -e . || finish
  step info 30 $PY -m moert info
  # the CUDA backend on the fake CUDA driver (tests/fake_cuda) stands in for the GPU's driver
  FAKE=$($PY -P -c "import sys; sys.path.insert(0, 'tests/csrc'); import fake_cuda; print(fake_cuda.build())")
  MOERT_LIBCUDA=$FAKE step cuda-can-run 60 $PY -P -c "$CUDA_CAN_RUN"
  if [ "$PART" != decode ]; then
    # the GPU tests cannot run here: collect them (imports, markers, parametrisation) instead
    step gpu-tests-collect 120 $PY -m pytest -q -m gpu --collect-only -p no:cacheprovider
    step bench-copy 120 $PY bench/bench_copy.py --device cpu --total-mb 8 --repeats 1 --warmup 0 \
      --chunks 1 --lanes 1 2 --out "$RES"
    # the kernel benchmark's GPU code path with a stand-in timer (tests/kernels)
    step bench-predictive-norm 180 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_bench_predictive_norm.py
  fi
  if [ "$PART" != tests ]; then
    # the GPU commands' options (rounds, predictor training, time budgets) at tiny sizes: the CPU twin
    # for decode, the asynchronous device model for prefill
    step bench-decode 300 $PY bench/bench_decode.py --device cpu --tokens 3 --warmup 1 --rounds 2 \
      --fractions 0.25 --policies lru --predictor-prompts 5 --time-budget 240 --out "$RES/decode_cpu_dry"
    step bench-prefill 300 $PY bench/bench_decode.py --device sim --prefill-len 16 --prefill-caches 0.1 \
      --prefill-prompts 1 --rounds 2 --time-budget 240 --out "$RES/prefill_sim_dry"
  fi
  finish
fi

MOERT_CUDA=ON step install 120 $PY -m pip install -q --no-build-isolation --no-deps -e . || finish
step info 15 $PY -m moert info
step cuda-can-run 15 $PY -P -c "$CUDA_CAN_RUN" || finish
if [ "$PART" != decode ]; then
  step gpu-tests 240 $PY -m pytest -q -m gpu -p no:cacheprovider -n 8
  step bench-copy 60 $PY bench/bench_copy.py --device cuda --out "$RES"
  step bench-predictive-norm 120 $PY bench/bench_predictive_norm.py --out "$RES"
fi
if [ "$PART" != tests ]; then
  # every config of the decode grid (cache 0.1/0.25/0.5 x lru/lfu, the other wait protocol, CPU experts,
  # 4 predictor variants, naive) over one filled pool; a 2nd round only if it fits the time budget
  step bench-decode 180 $PY bench/bench_decode.py --device cuda --tokens 16 --warmup 2 --rounds 2 \
    --predictor-prompts 6 --time-budget 135 --out "$RES/decode_cuda"
  # real DeepSeek-V2-Lite dims: a layer's union (<= 64 experts) exceeds the cache only below 64 slots
  step bench-prefill 120 $PY bench/bench_decode.py --device cuda --prefill-len 512 --prefill-caches 32 48 0.1 \
    --prefill-prompts 3 --rounds 2 --time-budget 90 --out "$RES/prefill_cuda"
fi
finish
