# moert: every install step lives here, so a fresh machine needs only `make demo` / `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# An explicit torch spec: a bare `torch` requirement pulls a multi-GB CUDA build. Override on a
# GPU machine, e.g. `make test-gpu TORCH_SPEC=torch` (or an already-installed torch).
TORCH_SPEC ?= torch==2.13.0
TRANSFORMERS_SPEC ?= transformers==5.23.0
DEPS := numpy safetensors tqdm pybind11 ninja setuptools wheel "$(TRANSFORMERS_SPEC)" triton matplotlib
DEV_DEPS := pytest hypothesis ruff clang-format
NATIVE := $(wildcard csrc/*.cc csrc/include/moert/*.h csrc/src/*.cc csrc/src/*.cu) CMakeLists.txt setup.py

.PHONY: setup build demo test test-compat test-gpu test-gpu-here test-slow gpu-dry-run stress bench-tiers sanitize fuzz fuzz-smoke lint format bench bench-sim-puffin bench-sim-pays bench-sim-studies bench-evict bench-sim-tiers memory-table bench-moe-beyond bench-budget clean

setup: $(VENV)/.deps build

$(VENV)/.deps: Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(DEPS) $(DEV_DEPS)
	touch $@

# The editable install builds moert._C with CMake (incremental: only changed sources recompile).
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(NATIVE)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(PY) -m moert demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not gpu and not slow"

# the slow tests (minutes): the simulator's fast path against stepping on whole real prompts
test-slow: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

# The oldest supported transformers (5.17) in a venv of its own: the model, patch, load and capture
# tests, which are the ones that touch transformers' internals.
COMPAT_VENV ?= .venv-tf517
COMPAT_SPEC ?= transformers==5.17.0
test-compat: $(VENV)/.deps
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(COMPAT_VENV)/bin/python -m pip install -q $(filter-out "$(TRANSFORMERS_SPEC)",$(DEPS)) "$(COMPAT_SPEC)" pytest hypothesis
	$(COMPAT_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	HF_HUB_OFFLINE=1 $(COMPAT_VENV)/bin/python -m pytest -q -m "not gpu" tests/models tests/api tests/trace/test_capture.py \
		tests/engine

test-gpu: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu

# bench/gpu_session.sh with every GPU-only step replaced by its CPU equivalent: the script is tested
# before a GPU is ever lent (CI runs it; about 3 minutes)
gpu-dry-run: setup
	bash bench/gpu_session.sh --dry-run

# a million randomized pool/cache/engine operations over 4 threads, every slot checksummed at every use;
# on the CPU twin and on the device model; records bench/results/stress_{cpu,sim}.{json,md} (about 5 minutes;
# make test runs a 10^5 slice on the twin and 2x10^4 on the model)
stress: setup
	$(PY) bench/stress.py --ops 1000000
	$(PY) bench/stress.py --ops 1000000 --device sim

# the host tier (moert.load(host_budget=...)): file -> pinned pool reads against a plain sequential read,
# decode at host budgets 100/50/25% on the CPU twin, peak host RSS; records bench/results/tiers_cpu.{json,md}
# (about 5 minutes). The stress run with both tiers records bench/results/stress_cpu_tiers.{json,md}.
bench-tiers: setup
	$(PY) bench/bench_tiers.py
	$(PY) bench/stress.py --ops 200000 --host-slabs 12

# moert._C with AddressSanitizer + UBSan, then with ThreadSanitizer, each running the native-facing
# tests (build/sanitize-*; the regular build is untouched)
sanitize: setup
	bash tools/sanitize.sh address
	bash tools/sanitize.sh thread

# A lent GPU machine has no package index but a python3 with torch, transformers, triton, pybind11,
# ninja and pytest: build against that interpreter and run the GPU suite there.
SYSTEM_PY ?= python3
test-gpu-here:
	$(SYSTEM_PY) -m pip install -q --no-build-isolation --no-deps -e .
	HF_HUB_OFFLINE=1 $(SYSTEM_PY) -m pytest -q -m gpu

lint: setup
	$(VENV)/bin/ruff check moert kernels tests bench fuzz setup.py
	$(VENV)/bin/ruff format --check moert kernels tests bench fuzz setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $(filter %.cc %.h %.cu,$(NATIVE))

format: setup
	$(VENV)/bin/ruff check --fix moert kernels tests bench fuzz setup.py
	$(VENV)/bin/ruff format moert kernels tests bench fuzz setup.py
	$(VENV)/bin/clang-format -i $(filter %.cc %.h %.cu,$(NATIVE))

bench: setup
	$(PY) bench/bench_copy.py
	$(PY) bench/bench_copy.py --torch-threads 1 --tag _torch1thread
	$(PY) bench/bench_sim.py
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_decode.py --prefill-len 128 --prefill-caches 0.05 0.1 0.25
	$(PY) bench/bench_setup.py
	$(PY) bench/gpu_compile_count.py
	$(PY) bench/bench_cpu_expert.py
	$(PY) bench/bench_predictive_norm.py

# the README's cache-policy table: every puffin prompt through the real cache, per-layer and global
PUFFIN ?= ../shared/data/traces/deepseek-v2-lite-chat-puffin
PUFFIN_POLICIES ?= lru,lfu,moe-infinity,belady,lru+moe-infinity,lru+oracle
# (both runs write to out/puffin first and are copied at the end, so neither records the other's output as a
# modified tracked file)
bench-sim-puffin: setup
	mkdir -p out/puffin
	$(PY) -m moert simulate $(PUFFIN) --capacity 0.1,0.25,0.5 --policy $(PUFFIN_POLICIES) --per-layer --no-progress \
		--json out/puffin/sim_deepseek_v2_lite_puffin.json --markdown out/puffin/sim_deepseek_v2_lite_puffin.md \
		--plot out/puffin/sim_deepseek_v2_lite_puffin.png
	$(PY) -m moert simulate $(PUFFIN) --capacity 0.1,0.25,0.5 --policy $(PUFFIN_POLICIES) --global --no-progress \
		--json out/puffin/sim_deepseek_v2_lite_puffin_global.json --markdown out/puffin/sim_deepseek_v2_lite_puffin_global.md \
		--plot out/puffin/sim_deepseek_v2_lite_puffin_global.png
	cp out/puffin/sim_deepseek_v2_lite_puffin* bench/results/

# what pays in predicted tok/s: every policy over the cost grid (windowed cost model), per-layer and global,
# on the held-out puffin prompts (trains the xlayer predictor first, ~3 min; the grid ~15 min on 2 cores)
# policy learned reads the reuse model `make bench-evict` trains (out/evict/reuse.safetensors)
EVICTOR ?= out/evict/reuse.safetensors
PAYS_POLICIES ?= lru,lfu,belady,learned,lru+oracle,lru+xlayer,score+xlayer:2
bench-sim-pays: setup
	$(PY) bench/bench_sim.py --what pays --threads 1 --no-progress --evictor $(EVICTOR) --policies $(PAYS_POLICIES)

# the simulator studies on the shared traces (minutes each): score policy, CPU experts, speculative
bench-sim-studies: setup
	$(PY) bench/bench_sim.py --what score
	$(PY) bench/bench_sim.py --what hetero
	$(PY) bench/bench_sim.py --what speculative

# learned eviction (policy learned) on the held-out puffin prompts: trains the reuse forecast (an ensemble
# of two seeds), replays lru/lfu/belady/learned/learned:next per-layer and global; then at 0.25 the model
# without the induction group, the look-ahead ablation, one model instead of the ensemble, and another
# ensemble (seeds 2 and 3: the training's noise) (about two hours on 2 busy cores)
bench-evict: setup
	$(PY) bench/bench_evict.py
	$(PY) bench/bench_evict.py --work out/evict-noind --features recency,gaps,frequency,bias,coact --capacities 0.25 --policies lru,belady,learned --out bench/results/sim_evict_puffin_noinduction
	$(PY) bench/bench_evict.py --evictor out/evict/reuse.safetensors --capacities 0.25 --policies lru,belady,learned --ablations --horizons 1,3 --drop "" --out bench/results/sim_evict_puffin_horizons
	$(PY) bench/bench_evict.py --ensemble 1 --work out/evict-one --out bench/results/sim_evict_puffin_one
	$(PY) bench/bench_evict.py --train-seed 2 --work out/evict-seed2 --capacities 0.25 --policies lru,belady,learned,learned:next --out bench/results/sim_evict_puffin_seed2

# the SSD tier in the simulator: tok/s against the host pool's size (minutes); the README's memory table (instant)
bench-sim-tiers: setup
	$(PY) bench/sim_tiers.py
memory-table: setup
	$(PY) bench/memory_table.py

# MoE-Beyond toward convergence (CPU, about an hour per run on a shared host; BENCH_UNTIL=HH:MM UTC caps it):
# the paper's layout and moert's one-pass variant, then the report -> bench/results/moe_beyond_puffin.{json,md,png}
BENCH_UNTIL ?= 23:59
bench-moe-beyond: setup
	nice $(PY) bench/bench_moe_beyond.py train --name small --epochs 40 --patience 4 --until $(BENCH_UNTIL)
	nice $(PY) bench/bench_moe_beyond.py train --name heads --layer-input heads --batch 8 --epochs 80 --patience 4 --until $(BENCH_UNTIL)
	$(PY) bench/bench_moe_beyond.py report

# the recommended policy (learned eviction + budgeted prefetch, one layer ahead) vs lru / lfu / learned / belady /
# greedy xlayer prefetch over the (layer ms, GB/s) grid on the held-out puffin prompts; fails if the recommended
# policy is below the best demand-only one anywhere. Trains the xlayer predictor first unless
# BUDGET_ARGS="--predictor FILE" names one recording the split; the evictor: --evictor (out/evict/reuse.safetensors,
# `make bench-evict`). About 45 minutes on 2 cores (the recommended runs are stepped in Python).
bench-budget: setup
	$(PY) bench/bench_budget.py $(BUDGET_ARGS)

# Fuzzing with atheris (fuzz/README.md): one target per parser and one for the native bindings' checks,
# FUZZ_RUNS inputs each from the committed seeds (fuzz/corpus/); findings and logs go to out/fuzz/.
FUZZ_RUNS ?= 100000
$(VENV)/.fuzz: $(VENV)/.deps
	$(PIP) install -q atheris
	touch $@

fuzz: build $(VENV)/.fuzz
	$(PY) fuzz/run.py --runs $(FUZZ_RUNS)

# a short slice of the same (2,000 inputs per target)
fuzz-smoke: build $(VENV)/.fuzz
	$(PY) fuzz/run.py --runs 2000

clean:
	rm -rf build moert/_C*.so $(VENV)/.built $(COMPAT_VENV)
