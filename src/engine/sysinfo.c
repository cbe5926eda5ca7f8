/* sysinfo.c: host facts for logs and dolly_backends(); see sysinfo.h. */
#define _GNU_SOURCE
#include "sysinfo.h"

#include <cblas.h>
#include <sched.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define DOLLY_ENGINE_VERSION "0.1"

int
sys_cpu_count(void)
{
	cpu_set_t	set;
	long		n;

	if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
		return CPU_COUNT(&set);
	n = sysconf(_SC_NPROCESSORS_ONLN);
	return n > 0 ? (int) n : 1;
}

void
sys_blas_info(char *buf, size_t len)
{
	/* openblas_get_config() reads like "OpenBLAS 0.3.21 NO_AFFINITY Haswell MAX_THREADS=64" */
	snprintf(buf, len, "%s, core %s", openblas_get_config(), openblas_get_corename());
}

double
sys_now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

const char *
sys_engine_version(void)
{
	return DOLLY_ENGINE_VERSION;
}
