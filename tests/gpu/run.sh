#!/bin/bash
# run.sh: the CUDA backend on a machine with one NVIDIA GPU, from a fresh checkout and
# without PostgreSQL: builds dolly_cuda.so and the engine files the tests need, runs the
# backend op test, the fixture models and their training on CUDA (test_gpu), the ranks'
# sums through CUDA IPC (test_ranks), then the GPT-J-6B decode benchmark (bench_gptj6b.py)
# and the 1B training benchmark (bench_train_1b.py), then compute-sanitizer over the op
# test while time remains. Ends with a summary. Logs and figures go to $OUT when it is set,
# else build/gpu/log: nine files at most (ptxas.log build.log test.log bench.log bench.json
# train.log train.json memcheck.log racecheck.log).
#
#   tests/gpu/run.sh          everything (about 7 minutes on an H100)
#   tests/gpu/run.sh test     build and tests only
#   tests/gpu/run.sh train    build and the training benchmark only
#
# Needs gcc, nvcc and cuBLAS ($CUDA_HOME, default /usr/local/cuda), json-c and OpenBLAS
# (pkg-config; where missing, build/gpu-deps/deps.tar.xz from tests/gpu/pack_deps.sh), and
# python3 with torch and transformers for the benchmark. CUDA_ARCH (default 90) picks the
# GPU code; DEADLINE (default 540) the seconds after which optional steps are skipped.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
B=build/gpu
LOG=${OUT:-$B/log}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ARCH=${CUDA_ARCH:-90}
DEADLINE=${DEADLINE:-540}
mkdir -p "$B/obj" "$LOG"
summary=()

note() { echo "== [$((SECONDS - start)) s] $*"; }
left() { echo $((DEADLINE - (SECONDS - start))); }

# --- build ---
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
note "GPU: ${gpu:-none}"
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
cat "$B"/obj/*.log > "$LOG/ptxas.log"
grep -iE "error|warning" "$LOG/ptxas.log" | grep -v "^ptxas info" | head -20
[ $ok = 1 ] && "$CUDA_HOME/bin/nvcc" -shared -Xcompiler -fPIC -o "$B/dolly_cuda.so" "$B"/obj/*.o \
	src/engine/error.c -Isrc/engine "$CUBLAS" -Xlinker -rpath="$CUBLAS_DIR" 2>&1 | tee "$LOG/build.log" &&
	[ -f "$B/dolly_cuda.so" ] || { echo "building dolly_cuda.so failed (see $LOG/ptxas.log)" >&2; exit 1; }

ENGINE="src/engine/error.c src/engine/safetensors.c src/engine/config.c src/engine/model.c
	src/engine/model_forward.c src/engine/backend_cpu.c src/engine/cpu_*.c src/engine/threadpool.c
	src/engine/sampler.c src/engine/generate.c src/engine/cuda_loader.c src/engine/backend_cuda.c
	src/engine/train.c src/engine/model_backward.c src/engine/sysinfo.c src/engine/weights.c
	src/engine/torch_ckpt.c src/engine/torch_pickle.c src/engine/zip.c src/engine/utf8.c src/engine/files.c
	src/engine/collective.c"
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
# RUN_PLUGIN: another plugin for the tests, e.g. the emulated one for a rehearsal without a
# GPU (make build/gpu-emu/dolly_cuda_emu.so; RUN_PLUGIN=$PWD/build/gpu-emu/dolly_cuda_emu.so)
export DOLLY_CUDA_PLUGIN=${RUN_PLUGIN:-$PWD/$B/dolly_cuda.so}

# --- tests ---
# the ops first and apart: a kernel that breaks the CUDA context must not hide the others
: > "$LOG/test.log"
test_rc=0
filters="ops_ cuda_model_ cuda_train_"
[ "${1:-all}" = train ] && filters=""
for filter in $filters; do
	note "test_gpu $filter"
	# half the time left at most, so that a hung test leaves time for the others
	timeout $(( $(left) > 20 ? $(left) / 2 : 10 )) $B/test_gpu "$filter" 2>&1 | tee -a "$LOG/test.log"
	rc=${PIPESTATUS[0]}
	[ "$rc" = 0 ] || test_rc=$rc
	summary+=("test_gpu $filter: $(grep -E '^[0-9]+ passed' "$LOG/test.log" | tail -1) (exit $rc)")
done
if [ -n "$filters" ]; then
	# the ranks' sums through CUDA IPC: processes of their own, on one GPU all ranks on it
	note "test_ranks"
	timeout 120 $B/test_ranks 2>&1 | tee -a "$LOG/test.log"
	rc=${PIPESTATUS[0]}
	[ "$rc" = 0 ] || test_rc=$rc
	summary+=("test_ranks: $(grep -E '^[0-9]+ passed' "$LOG/test.log" | tail -1) (exit $rc)")
fi
while read -r line; do summary+=("  $line"); done < <(grep -E '^FAIL' "$LOG/test.log")

# --- benchmark ---
if [ -z "$gpu" ]; then
	summary+=("no GPU: benchmark and compute-sanitizer skipped")
elif [ "${1:-all}" = all ] && [ "$(left)" -gt 150 ]; then
	note "benchmark: GPT-J-6B shapes, ours against transformers"
	PYTHONUNBUFFERED=1 timeout $(($(left) - 30)) python3 tests/gpu/bench_gptj6b.py \
		--bench $B/bench_cuda --plugin "$DOLLY_CUDA_PLUGIN" \
		--workdir "${SCRATCH:-/tmp}/dolly-gptj6b" --json "$LOG/bench.json" 2>&1 | tee "$LOG/bench.log"
	summary+=("benchmark: exit ${PIPESTATUS[0]}, table in $LOG/bench.log")
	rm -rf "${SCRATCH:-/tmp}/dolly-gptj6b"
fi
if [ -n "$gpu" ] && [ "${1:-all}" != test ] && [ "$(left)" -gt 90 ]; then
	note "training benchmark: a 1B GPT-NeoX, ours against a torch loop"
	PYTHONUNBUFFERED=1 timeout $(($(left) - 20)) python3 tests/gpu/bench_train_1b.py \
		--bench $B/bench_train --plugin "$DOLLY_CUDA_PLUGIN" \
		--workdir "${SCRATCH:-/tmp}/dolly-neox1b" --json "$LOG/train.json" 2>&1 | tee "$LOG/train.log"
	summary+=("training benchmark: exit ${PIPESTATUS[0]}, table in $LOG/train.log")
	rm -rf "${SCRATCH:-/tmp}/dolly-neox1b"
fi

# --- out-of-bounds and shared-memory races, while time remains ---
if [ -n "$gpu" ] && [ "${1:-all}" = all ] && command -v compute-sanitizer >/dev/null && [ "$(left)" -gt 60 ]; then
	note "compute-sanitizer memcheck and racecheck over the op tests"
	timeout $(($(left) / 2)) compute-sanitizer --tool memcheck --error-exitcode 9 \
		$B/test_gpu ops_ > "$LOG/memcheck.log" 2>&1
	rc=$?
	summary+=("memcheck: exit $rc ($(grep -c 'Invalid' "$LOG/memcheck.log") invalid accesses; 124 = out of time)")
	# racecheck over the kernels that share memory between threads, as time allows
	: > "$LOG/racecheck.log"
	for f in ops_attention ops_layernorm ops_sample ops_crossentropy ops_sum_squares ops_matmul_backward; do
		[ "$(left)" -gt 20 ] || break
		timeout $(($(left) - 10)) compute-sanitizer --tool racecheck --error-exitcode 9 \
			$B/test_gpu "$f" >> "$LOG/racecheck.log" 2>&1
		rc=$?
		summary+=("racecheck ($f): exit $rc ($(grep -c 'Race' "$LOG/racecheck.log") races so far; 124 = out of time)")
	done
fi

note "summary"
printf '%s\n' "${summary[@]}"
[ -f "$LOG/bench.log" ] && sed -n '/^GPT-J-6B shapes/,$p' "$LOG/bench.log"
[ -f "$LOG/train.log" ] && sed -n '/^training, GPT-NeoX/,$p' "$LOG/train.log"
exit "$test_rc"
