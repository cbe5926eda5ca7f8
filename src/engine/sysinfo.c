/* sysinfo.c: host facts for logs and dolly_backends(); see sysinfo.h. */
#define _GNU_SOURCE
#include "sysinfo.h"

#include <cblas.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DOLLY_ENGINE_VERSION "0.5"

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

/* OpenBLAS's run-time core selection: exported by DYNAMIC_ARCH builds only, hence weak. */
extern void gotoblas_dynamic_init(void) __attribute__((weak));
extern void gotoblas_dynamic_quit(void) __attribute__((weak));

/* The core OpenBLAS had chosen, when sys_blas_tune chose another. */
static char blas_fallback[32];

void
sys_blas_tune(void)
{
	static const char *const fallbacks[] = {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Unknown"};
	static int	done;
	const char *core = openblas_get_corename();
	const char *best = NULL;
	int			fallback = 0;

	if (done || getenv("OPENBLAS_CORETYPE") || !gotoblas_dynamic_init || !gotoblas_dynamic_quit)
		return;
	done = 1;
	for (size_t i = 0; i < sizeof(fallbacks) / sizeof(fallbacks[0]); i++)
		fallback |= strcmp(core, fallbacks[i]) == 0;
	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx512bf16"))
		best = "Cooperlake";
	else if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
			 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
		best = "SkylakeX";
	else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
		best = "Haswell";
	else if (__builtin_cpu_supports("avx"))
		best = "Sandybridge";
	if (!fallback || best == NULL)
		return;
	snprintf(blas_fallback, sizeof(blas_fallback), "%s", core);
	setenv("OPENBLAS_CORETYPE", best, 1);
	gotoblas_dynamic_quit();
	gotoblas_dynamic_init();
	unsetenv("OPENBLAS_CORETYPE");
}

void
sys_blas_info(char *buf, size_t len)
{
	/* openblas_get_config() reads like "OpenBLAS 0.3.21 NO_AFFINITY Haswell MAX_THREADS=64" */
	snprintf(buf, len, "%s, core %s%s%s%s", openblas_get_config(), openblas_get_corename(),
			 blas_fallback[0] ? " (chosen by dolly: OpenBLAS fell back to " : "", blas_fallback,
			 blas_fallback[0] ? " on this CPU)" : "");
}

/* The first number in file path (a "max" reads as no limit: -1), or -1. */
static long long
read_number(const char *path)
{
	FILE	   *f = fopen(path, "r");
	long long	v = -1;

	if (f == NULL)
		return -1;
	if (fscanf(f, "%lld", &v) != 1)
		v = -1;
	fclose(f);
	return v;
}

/* The value of "key:" in /proc/meminfo, in bytes, or -1. */
static long long
meminfo(const char *key)
{
	FILE	   *f = fopen("/proc/meminfo", "r");
	char		line[256];
	long long	kb = -1;
	size_t		n = strlen(key);

	if (f == NULL)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, key, n) == 0 && line[n] == ':')
		{
			kb = atoll(line + n + 1);
			break;
		}
	fclose(f);
	return kb < 0 ? -1 : kb * 1024;
}

/* This process's cgroup directory for a controller ("" for v2) from /proc/self/cgroup. */
static int
cgroup_dir(const char *controller, char *dir, size_t len)
{
	FILE	   *f = fopen("/proc/self/cgroup", "r");
	char		line[1024];
	int			found = 0;

	if (f == NULL)
		return 0;
	while (!found && fgets(line, sizeof(line), f))
	{
		char	   *c = strchr(line, ':');
		char	   *p = c ? strchr(c + 1, ':') : NULL;

		if (p == NULL)
			continue;
		*p++ = '\0';
		p[strcspn(p, "\n")] = '\0';
		if (controller[0] ? strstr(c + 1, controller) != NULL : c[1] == '\0')
		{
			snprintf(dir, len, "/sys/fs/cgroup%s%s", controller[0] ? "/memory" : "",
					 strcmp(p, "/") == 0 ? "" : p);
			found = 1;
		}
	}
	fclose(f);
	return found;
}

/* What the cgroup's limit leaves (limit - usage) in directory dir, or -1 without a limit. */
static long long
cgroup_room_in(const char *dir, int v1)
{
	char		path[1100];
	long long	limit,
				usage;

	snprintf(path, sizeof(path), "%s/%s", dir, v1 ? "memory.limit_in_bytes" : "memory.max");
	limit = read_number(path);
	snprintf(path, sizeof(path), "%s/%s", dir, v1 ? "memory.usage_in_bytes" : "memory.current");
	usage = read_number(path);
	/* v2 says "max", v1 a number near 2^63, for no limit */
	if (limit <= 0 || limit >= (1LL << 62) || usage < 0)
		return -1;
	return limit > usage ? limit - usage : 0;
}

/*
 * What the memory cgroup leaves, or -1: v2, then v1, each in this process's own cgroup
 * directory, then at the root of the hierarchy (what a container sees of its own).
 */
static long long
cgroup_room(void)
{
	char		dir[1024];

	for (int v1 = 0; v1 < 2; v1++)
	{
		long long	room = -1;

		if (cgroup_dir(v1 ? "memory" : "", dir, sizeof(dir)))
			room = cgroup_room_in(dir, v1);
		if (room < 0)
			room = cgroup_room_in(v1 ? "/sys/fs/cgroup/memory" : "/sys/fs/cgroup", v1);
		if (room >= 0)
			return room;
	}
	return -1;
}

long long
sys_mem_available(void)
{
	long long	avail = meminfo("MemAvailable");
	long long	room = cgroup_room();

	if (room >= 0 && (avail < 0 || room < avail))
		return room;
	return avail;
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
