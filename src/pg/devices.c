/*
 * devices.c: the compute devices. Model server 0 probes what the machine offers (CPU
 * threads and BLAS; the CUDA plugin, its GPUs and their self-test) and publishes it in
 * shared memory for dolly_backends(); the model servers and the fine-tuning ranks read it,
 * with dolly.device, dolly.threads and dolly.cuda_devices, to choose what they compute on.
 * CUDA is touched only by the processes that call these, never by the postmaster.
 */
#include "postgres.h"

#include "dolly_pg.h"
#include "devices.h"
#include "settings.h"

#include <stdlib.h>

#include "miscadmin.h"

#include "sysinfo.h"

void
dolly_probe_cpu(void)
{
	char		blas[192];
	int			threads = dolly_cpu_threads();

	sys_blas_tune();			/* what the CPU backend will run, before it is described */
	sys_blas_info(blas, sizeof(blas));
	SpinLockAcquire(&dolly_shared->mutex);
	dolly_shared->cpu_threads = threads;
	snprintf(dolly_shared->cpu_detail, sizeof(dolly_shared->cpu_detail),
			 "%d threads of %d CPUs; %s", threads, sys_cpu_count(), blas);
	SpinLockRelease(&dolly_shared->mutex);
}

const dl_cuda_plugin *
dolly_cuda_gpus(dl_gpu_info *gpus, int *ngpus, dl_error *err)
{
	char		path[MAXPGPATH];
	const dl_cuda_plugin *plugin;

	*ngpus = 0;
	dolly_cuda_plugin_path(path, sizeof(path));
	if (cuda_plugin_load(path, &plugin, err) != DL_OK ||
		plugin->probe(gpus, DL_MAX_GPUS, ngpus, err) != DL_OK)
		return NULL;
	return plugin;
}

void
dolly_probe_cuda(void)
{
	char		detail[1024];
	const dl_cuda_plugin *plugin;
	dl_gpu_info gpus[DL_MAX_GPUS];
	int			ngpus = 0;
	bool		available = false;
	dl_error	err;

	if ((plugin = dolly_cuda_gpus(gpus, &ngpus, &err)) == NULL)
		snprintf(detail, sizeof(detail), "%s", err.msg);
	else if (ngpus == 0)
		snprintf(detail, sizeof(detail), "CUDA plugin %s loaded, but no GPU is visible",
				 plugin->cuda_version);
	else if (dolly_device != DOLLY_DEVICE_CPU && plugin->selftest(0, &err) != DL_OK)
		snprintf(detail, sizeof(detail), "%s", err.msg);
	else
	{
		int			len;

		available = true;
		len = snprintf(detail, sizeof(detail), "CUDA %s:", plugin->cuda_version);
		for (int i = 0; i < ngpus && i < DL_MAX_GPUS && len < (int) sizeof(detail); i++)
			len += snprintf(detail + len, sizeof(detail) - len, "%s GPU %d %s (sm_%d%d, %.1f GiB)",
							i ? ";" : "", i, gpus[i].name, gpus[i].cc_major, gpus[i].cc_minor,
							gpus[i].total_bytes / 1073741824.0);
	}
	if (!available)
		elog(LOG, "dolly: CUDA backend unavailable: %s", detail);

	SpinLockAcquire(&dolly_shared->mutex);
	dolly_shared->cuda_available = available;
	dolly_shared->cuda_ngpus = ngpus;
	snprintf(dolly_shared->cuda_detail, sizeof(dolly_shared->cuda_detail), "%s", detail);
	SpinLockRelease(&dolly_shared->mutex);
}

int
dolly_cpu_threads(void)
{
	return dolly_threads > 0 ? dolly_threads : sys_cpu_count();
}

bool
dolly_want_cuda(void)
{
	bool		available;

	SpinLockAcquire(&dolly_shared->mutex);
	available = dolly_shared->cuda_available;
	SpinLockRelease(&dolly_shared->mutex);
	return dolly_device == DOLLY_DEVICE_CUDA || (dolly_device == DOLLY_DEVICE_AUTO && available);
}

void
dolly_cuda_plugin_path(char *buf, size_t len)
{
	const char *env = getenv("DOLLY_CUDA_PLUGIN");

	if (env && env[0])
		snprintf(buf, len, "%s", env);
	else
		snprintf(buf, len, "%s/%s", pkglib_path, DL_CUDA_PLUGIN_FILE);
}

void
dolly_cuda_restrict(void)
{
	if (dolly_cuda_devices[0] != '\0')
		setenv("CUDA_VISIBLE_DEVICES", dolly_cuda_devices, 1);
}
