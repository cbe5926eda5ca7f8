# Makefile: the dolly extension (PGXS), its engine library, dolly-cli, the engine tests
# and, where nvcc exists, the CUDA plugin.
#
#   make                 extension, engine library, dolly-cli, run_tests, CUDA plugin if nvcc
#   make CUDA=0          the same without the CUDA plugin
#   make install         installs dolly.so, the SQL script and dolly_cuda.so
#   make unittest        engine unit tests ("N passed, N failed")
#   make installcheck    pg_regress (temporary cluster with dolly preloaded) and TAP tests
#   make gputest         every backend operation on every backend (SKIP without a GPU)
#   make emutest         the same against the CUDA kernels emulated on the CPU (tests/gpu/emu;
#                        FILTER=name runs some); about 6 minutes on 2 cores
#   make fuzz            libFuzzer targets build/fuzz/fuzz_* (clang; see tests/fuzz)
#   MARCH=x86-64-v2      portable build instead of -march=native
#   STRICT=1             warnings are errors (CI and developers; a release build does not
#                        fail on a newer compiler's new warning)

EXTENSION = dolly
MODULE_big = dolly
OBJS = $(patsubst %.c,%.o,$(wildcard src/pg/*.c))
DATA = $(wildcard sql/dolly--*.sql)
PGFILEDESC = "dolly - instruction-following language models inside PostgreSQL"

REGRESS = dolly_setup dolly_generate dolly_batch dolly_batch_scan
REGRESS_OPTS = --temp-instance=tmp_check --temp-config=build/regress.conf --inputdir=. \
	--encoding=UTF8 --no-locale
REGRESS_PREP = build/regress.conf
TAP_TESTS = 1
PROVE_TESTS = tests/server/*.pl

PG_CONFIG ?= pg_config
MARCH ?= native
STRICT ?= 0
comma = ,
WARN_FLAGS = -Wall -Wextra $(if $(filter 1,$(STRICT)),-Werror)

# The engine: plain C, no PostgreSQL header, a static library that dolly.so and the tools link.
ENGINE_SRCS = $(wildcard src/engine/*.c)
ENGINE_OBJS = $(ENGINE_SRCS:.c=.o)
ENGINE_LIB = src/engine/libdolly_engine.a
# -fno-math-errno: the engine never reads errno after libm, and sqrtf that may set it keeps
# loops such as AdamW's from vectorising
ENGINE_CFLAGS = -std=gnu11 -O3 -march=$(MARCH) -fno-math-errno -fPIC -pthread -g $(WARN_FLAGS) \
	$(shell pkg-config --cflags json-c libpcre2-8 icu-uc openblas)
ENGINE_LIBS = $(shell pkg-config --libs json-c libpcre2-8 icu-uc openblas) -lpthread -lm -ldl

PG_CPPFLAGS = -Isrc/engine
PG_CFLAGS = $(WARN_FLAGS) -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
# the engine's symbols stay inside dolly.so: the server process (and a CUDA plugin it loads,
# which has its own copy of error.c) sees only the SQL functions and _PG_init
SHLIB_LINK = $(ENGINE_LIB) $(ENGINE_LIBS) -Wl,--exclude-libs,ALL

TOOLS = build/dolly-cli build/bench-allreduce
TOOL_SRCS = $(wildcard src/tools/*.c)
TEST_SRCS = $(wildcard tests/engine/*.c)
TEST_BIN = build/run_tests

# CUDA plugin: built when nvcc is found (CUDA=auto) or forced with CUDA=1; dolly.so never
# links it, the model server dlopen()s it when a GPU is asked for.
CUDA ?= auto
CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(CUDA_HOME)/bin/nvcc
ifeq ($(CUDA),auto)
CUDA := $(if $(wildcard $(NVCC)),1,0)
endif
CUDA_PLUGIN = $(if $(filter 1,$(CUDA)),dolly_cuda.so)
CUDA_ARCHS ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	-gencode arch=compute_90,code=compute_90
NVCC_FLAGS = -O3 -std=c++17 -shared -Xcompiler -fPIC,-Wall,-Wextra$(if $(filter 1,$(STRICT)),$(comma)-Werror) $(CUDA_ARCHS) \
	-Isrc/engine -Xlinker -rpath=$(CUDA_HOME)/lib64

EXTRA_CLEAN = $(ENGINE_OBJS) $(ENGINE_LIB) build dolly_cuda.so tmp_check results \
	regression.diffs regression.out log

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

all: $(ENGINE_LIB) $(TOOLS) $(TEST_BIN) $(CUDA_PLUGIN)

$(OBJS): $(wildcard src/engine/*.h src/pg/*.h)
$(shlib): $(ENGINE_LIB)

src/engine/%.o: src/engine/%.c $(wildcard src/engine/*.h)
	$(CC) $(ENGINE_CFLAGS) -c -o $@ $<

$(ENGINE_LIB): $(ENGINE_OBJS)
	rm -f $@
	$(AR) rcs $@ $^

build/dolly-cli: $(TOOL_SRCS) $(wildcard src/tools/*.h) $(ENGINE_LIB)
	@mkdir -p build
	$(CC) $(ENGINE_CFLAGS) -Isrc/engine -o $@ $(TOOL_SRCS) $(ENGINE_LIB) $(ENGINE_LIBS)

build/bench-allreduce: tests/bench/bench_allreduce.c $(ENGINE_LIB)
	@mkdir -p build
	$(CC) $(ENGINE_CFLAGS) -Isrc/engine -o $@ $< $(ENGINE_LIB) $(ENGINE_LIBS)

$(TEST_BIN): $(TEST_SRCS) $(wildcard tests/engine/*.h) $(ENGINE_LIB)
	@mkdir -p build
	$(CC) $(ENGINE_CFLAGS) -Wno-unused-parameter -Isrc/engine -o $@ $(TEST_SRCS) \
		$(ENGINE_LIB) $(ENGINE_LIBS)

# error.c is compiled in so that the plugin is self-contained whoever loads it
dolly_cuda.so: $(wildcard kernels/*.cu kernels/*.cuh) $(wildcard src/engine/*.h) src/engine/error.c
	$(NVCC) $(NVCC_FLAGS) -o $@ $(wildcard kernels/*.cu) src/engine/error.c -lcublas

# the temporary cluster serves the committed fixture models
build/regress.conf: tests/regress.conf.in
	@mkdir -p build
	sed 's|@FIXTURES@|$(CURDIR)/tests/fixtures|' $< > $@

unittest: $(TEST_BIN)
	$(TEST_BIN)

# the backend test of every operation on every backend, and the CUDA benchmark (tests/gpu)
GPU_TEST_SRCS = tests/engine/harness.c tests/engine/train_fixture.c tests/gpu/backends.c \
	tests/gpu/test_backend_ops.c tests/gpu/test_cuda_model.c
build/test_gpu: $(GPU_TEST_SRCS) $(wildcard tests/gpu/*.h tests/engine/*.h) $(ENGINE_LIB)
	@mkdir -p build
	$(CC) $(ENGINE_CFLAGS) -Wno-unused-parameter -Isrc/engine -Itests/engine -o $@ \
		$(GPU_TEST_SRCS) $(ENGINE_LIB) $(ENGINE_LIBS)

# the ranks' sums through CUDA IPC: a binary of its own, whose ranks fork before any CUDA
build/test_ranks: tests/engine/harness.c tests/gpu/test_ranks.c $(ENGINE_LIB)
	@mkdir -p build
	$(CC) $(ENGINE_CFLAGS) -Wno-unused-parameter -Isrc/engine -Itests/engine -o $@ $(filter %.c,$^) \
		$(ENGINE_LIB) $(ENGINE_LIBS)

build/bench_cuda build/bench_train: build/bench_%: tests/gpu/bench_%.c $(ENGINE_LIB)
	@mkdir -p build
	$(CC) $(ENGINE_CFLAGS) -Isrc/engine -o $@ $< $(ENGINE_LIB) $(ENGINE_LIBS)

gputest: build/test_gpu build/test_ranks $(CUDA_PLUGIN)
	DOLLY_CUDA_PLUGIN=$(CURDIR)/dolly_cuda.so build/test_gpu
	DOLLY_CUDA_PLUGIN=$(CURDIR)/dolly_cuda.so build/test_ranks

# the CUDA plugin's kernels rewritten for the CPU emulator (tests/gpu/emu/README.md)
EMU = tests/gpu/emu
build/gpu-emu/dolly_cuda_emu.so: $(wildcard kernels/*.cu kernels/*.cuh $(EMU)/*.cpp $(EMU)/*.py $(EMU)/include/*) src/engine/error.c
	rm -rf build/gpu-emu && mkdir -p build/gpu-emu/src
	cp kernels/*.cuh build/gpu-emu/src/
	python3 $(EMU)/transform.py build/gpu-emu/src kernels/*.cu
	$(CXX) -std=c++17 -O1 -g -fPIC -shared -w $(EMU_SANITIZE) -I$(EMU)/include -Isrc/engine -o $@ \
		build/gpu-emu/src/*.cpp $(EMU)/cuda_emu.cpp $(EMU)/cuda_emu_ipc.cpp -x c src/engine/error.c

# every 16-byte load of a kernel checked for its alignment, as a GPU faults on a misaligned one
EMU_SANITIZE = -fsanitize=alignment -fno-sanitize-recover=alignment

# the emulation's own checks, each against a kernel broken on purpose (tests/gpu/emu/selftest.cu)
build/gpu-emu/selftest: $(EMU)/selftest.cu $(EMU)/cuda_emu.cpp $(EMU)/cuda_emu_ipc.cpp $(EMU)/transform.py $(wildcard $(EMU)/include/*)
	@mkdir -p build/gpu-emu/self
	python3 $(EMU)/transform.py build/gpu-emu/self $(EMU)/selftest.cu
	$(CXX) -std=c++17 -O1 -g -w $(EMU_SANITIZE) -I$(EMU)/include -o $@ build/gpu-emu/self/selftest.cpp \
		$(EMU)/cuda_emu.cpp $(EMU)/cuda_emu_ipc.cpp

# then the operations again with the threads of a block run last to first: races show
emutest: build/test_gpu build/test_ranks build/gpu-emu/dolly_cuda_emu.so build/gpu-emu/selftest
	build/gpu-emu/selftest
	EMU_GPUS=2 DOLLY_CUDA_PLUGIN=$(CURDIR)/build/gpu-emu/dolly_cuda_emu.so build/test_ranks $(FILTER)
	DOLLY_CUDA_PLUGIN=$(CURDIR)/build/gpu-emu/dolly_cuda_emu.so build/test_gpu $(FILTER)
	EMU_ORDER=reverse DOLLY_CUDA_PLUGIN=$(CURDIR)/build/gpu-emu/dolly_cuda_emu.so build/test_gpu $(or $(FILTER),ops_)

# libFuzzer targets: each tests/fuzz/fuzz_*.c over the engine's sources, with ASan and UBSan
FUZZ_TARGETS = $(patsubst tests/fuzz/%.c,build/fuzz/%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_CFLAGS = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	-DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION -Isrc/engine \
	$(shell pkg-config --cflags json-c libpcre2-8 icu-uc openblas)
fuzz: $(FUZZ_TARGETS)
build/fuzz/%: tests/fuzz/%.c $(ENGINE_SRCS) $(wildcard src/engine/*.h)
	@mkdir -p build/fuzz
	clang $(FUZZ_CFLAGS) -o $@ $< $(ENGINE_SRCS) $(ENGINE_LIBS)

install: install-cuda-plugin
install-cuda-plugin: $(CUDA_PLUGIN)
ifneq ($(CUDA_PLUGIN),)
	$(INSTALL_SHLIB) $(CUDA_PLUGIN) '$(DESTDIR)$(pkglibdir)/'
endif

.PHONY: unittest gputest emutest fuzz install-cuda-plugin
