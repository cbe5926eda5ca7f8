/* sysinfo.h: facts about the host the CPU backend runs on, for logs and dolly_backends(). */
#ifndef DOLLY_SYSINFO_H
#define DOLLY_SYSINFO_H

#include <stddef.h>

/* Number of CPUs this process may run on (its affinity mask), at least 1. */
int			sys_cpu_count(void);

/*
 * Give OpenBLAS the best kernels this CPU runs, where it chose worse: a DYNAMIC_ARCH build
 * falls back to its Prescott (SSE3) kernels on CPUs newer than itself (Debian 12's 0.3.21
 * on Sapphire and Emerald Rapids), four times slower than its AVX-512 ones. Redoes its core
 * selection as OPENBLAS_CORETYPE would at startup; nothing when that variable is set, the
 * core is not a fallback, or the build has no run-time selection. Once per process, before
 * any BLAS call of another thread.
 */
void		sys_blas_tune(void);

/* Describe the BLAS library in use (OpenBLAS version, core, threading) into buf. */
void		sys_blas_info(char *buf, size_t len);

/*
 * Bytes of memory this process can still take without the kernel reclaiming in earnest or
 * killing it: MemAvailable, or less where its cgroup (v2 memory.max, v1 limit_in_bytes)
 * leaves less. -1 when neither can be read.
 */
long long	sys_mem_available(void);

/* Seconds on the monotonic clock (for timing; the origin is arbitrary). */
double		sys_now_s(void);

/* The engine's version string. */
const char *sys_engine_version(void);

#endif
