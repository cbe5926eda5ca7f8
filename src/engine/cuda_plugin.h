/*
 * cuda_plugin.h: the boundary between the engine and the optional CUDA plugin.
 *
 * dolly.so and dolly-cli never link libcudart or cuBLAS: everything CUDA lives in
 * dolly_cuda.so (built from kernels/ by nvcc), which exports one C symbol,
 * DL_CUDA_PLUGIN_SYMBOL, returning a table of functions. The engine dlopen()s it only when
 * a GPU is asked for, so a server without CUDA loads and runs the extension unchanged.
 */
#ifndef DOLLY_CUDA_PLUGIN_H
#define DOLLY_CUDA_PLUGIN_H

#include <stddef.h>

#include "backend.h"
#include "error.h"

#define DL_CUDA_PLUGIN_ABI 8
#define DL_CUDA_PLUGIN_SYMBOL "dolly_cuda_plugin"
#define DL_CUDA_PLUGIN_FILE "dolly_cuda.so"
#define DL_MAX_GPUS 16

typedef struct dl_gpu_info
{
	char		name[256];		/* as long as cudaDeviceProp.name */
	int			cc_major;		/* compute capability */
	int			cc_minor;
	size_t		total_bytes;
	size_t		free_bytes;
} dl_gpu_info;

typedef struct dl_cuda_plugin
{
	int			abi;			/* DL_CUDA_PLUGIN_ABI */
	const char *cuda_version;	/* the runtime the plugin was built with, e.g. "13.0" */

	/* Count the visible GPUs and describe up to max of them; no GPU is *ngpus = 0 and
	 * DL_OK, a driver problem is DL_EBACKEND with the CUDA error string. */
	dl_status	(*probe) (dl_gpu_info *gpus, int max, int *ngpus, dl_error *err);

	/* Run one of our kernels and one cuBLAS product on device dev and check both against
	 * the host: proof that the build, the driver and the libraries agree. */
	dl_status	(*selftest) (int dev, dl_error *err);

	/* Create a backend on device dev in a dl_cuda_mode: see backend_cuda_create. */
	dl_status	(*create) (int dev, int mode, dl_backend **out, dl_error *err);
} dl_cuda_plugin;

typedef const dl_cuda_plugin *(*dl_cuda_plugin_fn) (void);

/*
 * Load the plugin at path (dlopen, RTLD_NOW | RTLD_LOCAL) and check its ABI. A missing file
 * is DL_EUNSUPPORTED (CUDA support not installed); a file that will not load (no driver,
 * missing libcublas) is DL_EBACKEND with dlerror()'s text. The handle stays open for the
 * life of the process; loading twice returns the same table.
 */
dl_status	cuda_plugin_load(const char *path, const dl_cuda_plugin **out, dl_error *err);

#endif
