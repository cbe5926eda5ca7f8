#!/bin/bash
# run.sh: the CUDA plugin's kernels emulated on the CPU (see README.md): builds
# build/gpu-emu/dolly_cuda_emu.so from kernels/ and runs tests/gpu's tests against it.
#
#   tests/gpu/emu/run.sh [filter]    about 6 minutes for everything on 2 cores; the operations
#   (or the filter) run a second time with the threads of each block in reverse order
set -euo pipefail
cd "$(dirname "$0")/../../.."
E=tests/gpu/emu
B=build/gpu-emu
rm -rf "$B" && mkdir -p "$B/src"
cp kernels/*.cuh "$B/src/"
python3 $E/transform.py "$B/src" kernels/*.cu
g++ -std=c++17 -O1 -g -fPIC -shared -w -I$E/include -Isrc/engine -o $B/dolly_cuda_emu.so \
	$B/src/*.cpp $E/cuda_emu.cpp -x c src/engine/error.c
# shellcheck disable=SC2046
gcc -std=gnu11 -O2 -pthread -Wall -Wextra -Isrc/engine -Itests/engine \
	$(pkg-config --cflags json-c openblas libpcre2-8 icu-uc) -o $B/test_gpu tests/engine/harness.c \
	tests/engine/train_fixture.c tests/gpu/backends.c tests/gpu/test_backend_ops.c \
	tests/gpu/test_cuda_model.c src/engine/*.c $(pkg-config --libs json-c openblas libpcre2-8 icu-uc) \
	-lm -ldl
export DOLLY_CUDA_PLUGIN=$PWD/$B/dolly_cuda_emu.so
$B/test_gpu "$@"
# the operations again with the threads of a block run in the other order: races show
echo "== the operations with threads run last to first (EMU_ORDER=reverse)"
EMU_ORDER=reverse $B/test_gpu "${1:-ops_}"
