/* bench_util.h: what the CUDA benchmarks (bench_cuda.c, bench_train.c) share. */
#ifndef DOLLY_TESTS_GPU_BENCH_UTIL_H
#define DOLLY_TESTS_GPU_BENCH_UTIL_H

#include <stdio.h>
#include <stdlib.h>

#include "../../src/engine/error.h"
#include "../../src/engine/sysinfo.h"

/* Print "prog: what: err" (and its hint) and exit 1. */
static inline void
bench_die(const char *prog, const char *what, const dl_error *err)
{
	fprintf(stderr, "%s: %s: %s%s%s\n", prog, what, err->msg, err->hint[0] ? "\nhint: " : "",
			err->hint);
	exit(1);
}

#endif
