#!/usr/bin/env bash
# `make sanitize`: builds moert._C with AddressSanitizer + UBSan (address) or ThreadSanitizer (thread)
# into build/sanitize-MODE, next to a copy of the Python package, and runs the native-facing tests
# against it (the sanitizer runtime preloaded into Python). The regular build is left untouched.
#   bash tools/sanitize.sh address|thread [pytest args...]
set -euo pipefail
MODE=${1:?usage: $0 address|thread [pytest args]}
shift
case "$MODE" in address | thread) ;; *) echo "usage: $0 address|thread" >&2; exit 2 ;; esac
PY=${PY:-.venv/bin/python}
ROOT=$(pwd)
B="$ROOT/build/sanitize-$MODE"
mkdir -p "$B/pkg"
rm -rf "$B/pkg/moert"
cp -r moert "$B/pkg/moert"
rm -f "$B/pkg/moert"/_C*.so
cmake -S . -B "$B/cmake" -GNinja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOERT_CUDA=OFF -DMOERT_SANITIZE="$MODE" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$B/pkg/moert" -DPython_EXECUTABLE="$(realpath "$PY")" \
  -Dpybind11_DIR="$($PY -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$B/cmake" -j "$(nproc)"
TESTS=(tests/csrc tests/engine/test_runtime.py tests/test_faults.py)
[ $# -gt 0 ] && TESTS=("$@")
if [ "$MODE" = address ]; then
  export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
  # Python's own allocations are not freed at exit: leaks are not what this run looks for
  export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
else
  export LD_PRELOAD="$(gcc -print-file-name=libtsan.so)"
  export TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0 exitcode=66 suppressions=$ROOT/tools/tsan.supp"
fi
PYTHONPATH="$B/pkg" HF_HUB_OFFLINE=1 "$PY" -P -c "import moert._C as c; assert '$B' in c.__file__, c.__file__"
PYTHONPATH="$B/pkg" HF_HUB_OFFLINE=1 "$PY" -P -m pytest -q -p no:cacheprovider -m "not gpu" "${TESTS[@]}" \
  --deselect tests/csrc/test_build.py::test_cuda_backend_compiled_by_default \
  2>&1 | tee "$B/pytest.log"  # built with MOERT_CUDA=OFF, hence the deselected build test
unset LD_PRELOAD
summary=$(grep -E "^[0-9]+ passed" "$B/pytest.log" | tail -1)
label=$([ "$MODE" = address ] && echo "AddressSanitizer + UBSan" || echo "ThreadSanitizer")
mkdir -p bench/results
cat >"bench/results/sanitize_$MODE.md" <<MD
# $label

$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- csrc moert tests || echo ' +dirty'), $(gcc --version | head -1), \`make sanitize\` (\`bash tools/sanitize.sh $MODE\`).

moert._C built with \`MOERT_SANITIZE=$MODE\` (CUDA off), the sanitizer runtime preloaded into Python, running
${TESTS[*]}: **$summary**, no sanitizer report (halt on the first one). Python, torch and numpy
are not instrumented: only moert._C's own code is checked (suppressions: tools/tsan.supp).
MD
echo "sanitize $MODE: clean ($summary)"
