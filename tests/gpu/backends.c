/* backends.c: the backends under test and the reference, made on first use; see backends.h. */
#include "backends.h"

#include <stdio.h>
#include <stdlib.h>

#define NMODES 3

static test_backend backends[NMODES];
static char labels[NMODES][32];
static int	nbackends = -1;
static char why_none[600];
static dl_backend *cpu;

/* Destroy what was created, at exit. */
static void
release(void)
{
	for (int i = 0; i < nbackends; i++)
		backends[i].be->destroy(backends[i].be);
	if (cpu)
		cpu->destroy(cpu);
}

int
test_backends(const test_backend **out, const char **why)
{
	if (nbackends < 0)
	{
		const char *plugin = getenv("DOLLY_CUDA_PLUGIN");
		const char *dev = getenv("DOLLY_CUDA_DEVICE");
		dl_error	err;

		static const char *const mode_names[NMODES] = {"bf16", "fp32", "mixed"};

		nbackends = 0;
		for (int mode = DL_CUDA_BF16; mode < NMODES; mode++)
		{
			dl_backend *be;

			if (backend_cuda_create(plugin ? plugin : "./dolly_cuda.so", dev ? atoi(dev) : 0,
									(dl_cuda_mode) mode, &be, &err) != DL_OK)
			{
				snprintf(why_none, sizeof(why_none), "no CUDA backend: %s", err.msg);
				break;
			}
			snprintf(labels[mode], sizeof(labels[mode]), "%s/%s", be->name, mode_names[mode]);
			backends[nbackends].label = labels[mode];
			backends[nbackends].bf16_products = mode != DL_CUDA_FP32;
			backends[nbackends++].be = be;
		}
		if (cpu == NULL)
			atexit(release);
	}
	*out = backends;
	*why = why_none;
	return nbackends;
}

dl_backend *
reference_backend(void)
{
	dl_error	err;

	if (cpu != NULL)
		return cpu;
	if (backend_cpu_create(2, 0, &cpu, &err) != DL_OK)
	{
		fprintf(stderr, "cannot create the CPU backend: %s\n", err.msg);
		exit(2);
	}
	if (nbackends < 0)
		atexit(release);
	return cpu;
}
