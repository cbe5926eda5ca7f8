#!/bin/bash
# run.sh: the CUDA backend on a machine with one NVIDIA GPU, from a fresh checkout and
# without PostgreSQL. Prints the compiler, the driver and the GPU; builds dolly_cuda.so and
# the engine files the tests need; runs the backend op test, the fixture models and their
# training on CUDA (test_gpu) and the ranks' sums through CUDA IPC (test_ranks), each
# with a fixed timeout; then the GPT-J-6B decode
# benchmark (bench_gptj6b.py) and the 1B training benchmark (bench_train_1b.py), ours before
# transformers' and torch's, streamed; then compute-sanitizer's memcheck and racecheck over
# the op test. Ends with a summary. Logs go to $OUT when it is set, else build/gpu/log, six
# files at most (build.log test.log bench.log train.log sanitizer.log figures.jsonl);
# figures.jsonl holds every figure as a JSON line {source, key, value}, written as it is
# measured, so that a step cut short keeps what came before.
#
#   tests/gpu/run.sh          everything (about 8 minutes on an H200)
#   tests/gpu/run.sh test     build and tests only
#   tests/gpu/run.sh train    build and the training benchmark only
#
# Needs gcc, nvcc and cuBLAS ($CUDA_HOME, default /usr/local/cuda), json-c and OpenBLAS
# (pkg-config; where missing, build/gpu-deps/deps.tar.xz from tests/gpu/pack_deps.sh), and
# python3 with torch and transformers for the benchmarks. CUDA_ARCH (default 90) picks the
# GPU code; DEADLINE (default 540) the seconds after which steps are skipped or cut short.
# A rehearsal without a GPU: RUN_PLUGIN names another plugin for the tests (the emulated
# one: make build/gpu-emu/dolly_cuda_emu.so), TIMEOUT_SCALE multiplies every fixed
# timeout (the emulation is slow), and our benchmarks run on a fixture model instead.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
start=$SECONDS
B=build/gpu
LOG=${OUT:-$B/log}
FIG=$LOG/figures.jsonl
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ARCH=${CUDA_ARCH:-90}
DEADLINE=${DEADLINE:-540}
SCALE=${TIMEOUT_SCALE:-1}
MODE=${1:-all}
mkdir -p "$B/obj" "$LOG"
: > "$FIG"
summary=()

note() { echo "== [$((SECONDS - start)) s] $*"; }
left() { echo $((DEADLINE - (SECONDS - start))); }
# a step's fixed timeout in seconds, times TIMEOUT_SCALE, cut to the time left (10 s at least)
limit() {
	local t=$(($1 * SCALE)) l
	l=$(left)
	[ "$l" -lt "$t" ] && t=$l
	echo $((t > 10 ? t : 10))
}
# one figure to figures.jsonl: source, key, value (a number, or text)
figure() { python3 tests/gpu/bench_util.py record "$FIG" "$@"; }

# --- the machine: compiler, driver, GPU ---
note "nvcc --version"
"$CUDA_HOME/bin/nvcc" --version || echo "no nvcc at $CUDA_HOME/bin/nvcc"
nvcc_version=$("$CUDA_HOME/bin/nvcc" --version 2>/dev/null | grep -i release)
smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
gpu=${smi%%,*}
note "GPU, driver, memory: ${smi:-none (nvidia-smi sees no GPU)}"
nvidia-smi 2>/dev/null
figure machine nvcc "${nvcc_version:-none}"
figure machine gpu "${smi:-none}"

# --- build ---
if pkg-config --exists json-c openblas 2>/dev/null; then
	DEP_CFLAGS=$(pkg-config --cflags json-c openblas)
	DEP_LIBS=$(pkg-config --libs json-c openblas)
elif [ -f build/gpu-deps/deps.tar.xz ]; then
	note "json-c/OpenBLAS not installed: using build/gpu-deps/deps.tar.xz"
	mkdir -p "$B/deps" && tar -C "$B/deps" -xJf build/gpu-deps/deps.tar.xz
	D=$PWD/$B/deps
	DEP_CFLAGS="-I$D/include -I$D/include/json-c"
	# an RPATH, unlike a RUNPATH, also finds OpenBLAS's own libgfortran there
	DEP_LIBS="-L$D/lib -Wl,--disable-new-dtags,-rpath,$D/lib -ljson-c -lopenblas"
else
	echo "json-c and OpenBLAS are missing: run tests/gpu/pack_deps.sh where they are installed" \
		"and bring build/gpu-deps along" >&2
	exit 1
fi
for d in "$CUDA_HOME/lib64" "$CUDA_HOME/targets/x86_64-linux/lib" \
	$(python3 -c 'import nvidia.cublas, os; print(os.path.dirname(nvidia.cublas.__file__) + "/lib")' 2>/dev/null); do
	CUBLAS=$(ls "$d"/libcublas.so "$d"/libcublas.so.[0-9]* 2>/dev/null | head -1)
	[ -n "$CUBLAS" ] && break
done
[ -n "$CUBLAS" ] || { echo "cuBLAS not found under $CUDA_HOME or the nvidia-cublas package" >&2; exit 1; }
CUBLAS_DIR=$(dirname "$CUBLAS")
note "building dolly_cuda.so (sm_$ARCH, $CUBLAS)"
pids=()
for f in kernels/*.cu; do
	"$CUDA_HOME/bin/nvcc" -O3 -std=c++17 -Xcompiler -fPIC,-Wall,-Wextra -Xptxas -v \
		-gencode "arch=compute_$ARCH,code=sm_$ARCH" -Isrc/engine -c -o "$B/obj/$(basename "$f" .cu).o" "$f" \
		> "$B/obj/$(basename "$f" .cu).log" 2>&1 &
	pids+=($!)
done
ok=1
for p in "${pids[@]}"; do wait "$p" || ok=0; done
cat "$B"/obj/*.log > "$LOG/build.log"
grep -iE "error|warning" "$LOG/build.log" | grep -v "^ptxas info" | head -20
[ $ok = 1 ] && "$CUDA_HOME/bin/nvcc" -shared -Xcompiler -fPIC -o "$B/dolly_cuda.so" "$B"/obj/*.o \
	src/engine/error.c -Isrc/engine "$CUBLAS" -Xlinker -rpath="$CUBLAS_DIR" 2>&1 | tee -a "$LOG/build.log" &&
	[ -f "$B/dolly_cuda.so" ] || { echo "building dolly_cuda.so failed (see $LOG/build.log)" >&2; exit 1; }

ENGINE="src/engine/error.c src/engine/safetensors.c src/engine/config.c src/engine/model.c
	src/engine/model_forward.c src/engine/backend_cpu.c src/engine/cpu_*.c src/engine/threadpool.c
	src/engine/sampler.c src/engine/generate.c src/engine/cuda_loader.c src/engine/backend_cuda.c
	src/engine/train.c src/engine/model_backward.c src/engine/sysinfo.c src/engine/weights.c
	src/engine/torch_ckpt.c src/engine/torch_pickle.c src/engine/zip.c src/engine/utf8.c src/engine/files.c
	src/engine/collective.c src/engine/lora.c"
CFLAGS="-std=gnu11 -O3 -march=native -pthread -Wall -Wextra -Isrc/engine -Itests/engine $DEP_CFLAGS"
note "building test_gpu, bench_cuda and bench_train"
# shellcheck disable=SC2086
gcc $CFLAGS -o $B/test_gpu tests/engine/harness.c tests/engine/train_fixture.c tests/gpu/backends.c \
	tests/gpu/test_backend_ops.c tests/gpu/test_cuda_model.c $ENGINE $DEP_LIBS -lm -ldl 2>&1 | tee -a "$LOG/build.log" &&
	gcc $CFLAGS -o $B/bench_cuda tests/gpu/bench_cuda.c $ENGINE $DEP_LIBS -lm -ldl 2>&1 | tee -a "$LOG/build.log" &&
	gcc $CFLAGS -o $B/bench_train tests/gpu/bench_train.c $ENGINE $DEP_LIBS -lm -ldl 2>&1 | tee -a "$LOG/build.log" &&
	gcc $CFLAGS -o $B/test_ranks tests/engine/harness.c tests/gpu/test_ranks.c $ENGINE $DEP_LIBS -lm -ldl 2>&1 | tee -a "$LOG/build.log"
[ -x $B/test_gpu ] && [ -x $B/bench_cuda ] && [ -x $B/bench_train ] && [ -x $B/test_ranks ] ||
	{ echo "building the tests failed" >&2; exit 1; }
export DOLLY_CUDA_PLUGIN=${RUN_PLUGIN:-$PWD/$B/dolly_cuda.so}
figure machine build_s $((SECONDS - start))

# --- tests, each filter with its own fixed timeout ---
# the ops first and apart: a kernel that breaks the CUDA context must not hide the others
: > "$LOG/test.log"
test_rc=0
# program:filter:seconds; test_ranks, the ranks' sums through CUDA IPC, runs processes of its own
tests="test_gpu:ops_:150 test_gpu:cuda_model_:90 test_gpu:cuda_train_:120 test_ranks::120"
[ "$MODE" = train ] && tests=""
for t in $tests; do
	IFS=: read -r prog filter secs <<< "$t"
	name="$prog${filter:+ $filter}"
	note "$name (at most $(limit "$secs") s)"
	# lines as they come (stdbuf), so that a test cut short leaves what ran before it
	timeout "$(limit "$secs")" stdbuf -oL $B/$prog $filter 2>&1 | tee "$B/test.part"
	rc=${PIPESTATUS[0]}
	cat "$B/test.part" >> "$LOG/test.log"
	[ "$rc" = 0 ] || test_rc=$rc
	passed=$(grep -c '^ok ' "$B/test.part")
	failed=$(grep -c '^FAIL ' "$B/test.part")
	summary+=("$name: $passed passed, $failed failed (exit $rc; 124 = out of time)")
	figure "$name" passed "$passed"
	figure "$name" failed "$failed"
	figure "$name" exit "$rc"
done
while read -r line; do summary+=("  $line"); done < <(grep -E '^FAIL' "$LOG/test.log")

# --- benchmarks: ours first in each, streamed; on the emulated plugin, ours on a fixture ---
bench() {	# name, fixed timeout, command...
	local name=$1 t
	t=$(limit "$2")
	shift 2
	note "$name (at most $t s)"
	PYTHONUNBUFFERED=1 timeout "$t" "$@" 2>&1 | tee "$LOG/$name.log"
	summary+=("$name: exit ${PIPESTATUS[0]} (124 = out of time), output in $LOG/$name.log")
}
if [ -n "$gpu" ]; then
	[ "$MODE" = all ] && bench bench 220 python3 tests/gpu/bench_gptj6b.py \
		--bench $B/bench_cuda --plugin "$DOLLY_CUDA_PLUGIN" \
		--workdir "${SCRATCH:-/tmp}/dolly-gptj6b" --jsonl "$FIG"
	rm -rf "${SCRATCH:-/tmp}/dolly-gptj6b"
	[ "$MODE" != test ] && bench train 150 python3 tests/gpu/bench_train_1b.py \
		--bench $B/bench_train --plugin "$DOLLY_CUDA_PLUGIN" \
		--workdir "${SCRATCH:-/tmp}/dolly-neox1b" --jsonl "$FIG"
	rm -rf "${SCRATCH:-/tmp}/dolly-neox1b"
elif [ -n "${RUN_PLUGIN:-}" ] && [ "$MODE" = all ]; then
	summary+=("no GPU: a rehearsal of our benchmarks on fixture models (transformers and torch not run)")
	printf '1 2 3 4 5 6 7 8\n9 10 11 12 13 14 15 16\n' > "$B/prompts.txt"
	bench bench 60 python3 tests/gpu/bench_util.py run "$FIG" $B/bench_cuda \
		--model tests/fixtures/gptj-bf16 --prompts "$B/prompts.txt" --gen 4 --batch 2 --repeat 1 \
		--plugin "$RUN_PLUGIN"
	bench train 60 python3 tests/gpu/bench_util.py run "$FIG" $B/bench_train \
		--model tests/fixtures/neox-par-f32 --batch 2 --seq 16 --steps 2 --plugin "$RUN_PLUGIN"
else
	summary+=("no GPU: benchmarks skipped")
fi

# --- out-of-bounds accesses and shared-memory races in the op test ---
SANITIZER=
for s in "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer" \
	/usr/local/cuda/bin/compute-sanitizer "$(command -v compute-sanitizer)"; do
	[ -x "$s" ] && { SANITIZER=$s; break; }
done
: > "$LOG/sanitizer.log"
if [ "$MODE" != all ]; then
	:
elif [ -z "$gpu" ]; then
	summary+=("compute-sanitizer: skipped, no GPU")
elif [ -z "$SANITIZER" ]; then
	summary+=("compute-sanitizer: NOT FOUND under $CUDA_HOME or /usr/local/cuda or on PATH: memcheck and racecheck skipped")
	figure compute-sanitizer found none
else
	# memcheck over every op; racecheck over the kernels that share memory between threads
	for run in "memcheck ops_ 100" "racecheck ops_attention 40" "racecheck ops_layernorm 20" \
		"racecheck ops_sample 40" "racecheck ops_crossentropy 20" "racecheck ops_sum_squares 15"; do
		# shellcheck disable=SC2086 # the tool, the filter, the timeout
		set -- $run
		[ "$(left)" -gt 20 ] || { summary+=("$1 $2: skipped, out of time"); continue; }
		note "compute-sanitizer --tool $1 test_gpu $2 (at most $(limit "$3") s)"
		echo "=== $1 $2" >> "$LOG/sanitizer.log"
		timeout "$(limit "$3")" stdbuf -oL "$SANITIZER" --tool "$1" --error-exitcode 9 $B/test_gpu "$2" \
			>> "$LOG/sanitizer.log" 2>&1
		rc=$?
		# API errors count too (the OOM test's refused allocations): the access errors apart
		part=$(sed -n "/^=== $1 $2\$/,\$p" "$LOG/sanitizer.log")
		errors=$(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' <<< "$part" || echo "no summary")
		invalid=$(grep -cE 'Invalid __(global|shared|local)__|Race reported' <<< "$part")
		summary+=("$1 $2: exit $rc (9 = errors, 124 = out of time), $invalid invalid accesses or races; $errors")
		figure "compute-sanitizer $1 $2" exit "$rc"
		figure "compute-sanitizer $1 $2" invalid_accesses_or_races "$invalid"
		figure "compute-sanitizer $1 $2" summary "$errors"
	done
fi

note "summary"
printf '%s\n' "${summary[@]}"
[ -f "$LOG/bench.log" ] && sed -n '/^GPT-J-6B shapes/,$p' "$LOG/bench.log"
[ -f "$LOG/train.log" ] && sed -n '/^training, GPT-NeoX/,$p' "$LOG/train.log"
echo "figures: $FIG ($(wc -l < "$FIG") lines)"
exit "$test_rc"
