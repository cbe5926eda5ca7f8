/*
 * backend_cuda.c: the CUDA backend as the engine sees it. The backend itself lives in the
 * plugin (kernels/, dolly_cuda.so), which cuda_loader.c dlopen()s here on first use, so
 * neither the engine library nor anything linking it needs CUDA.
 */
#include "backend.h"
#include "cuda_plugin.h"

dl_status
backend_cuda_create(const char *plugin_path, int device, dl_cuda_mode mode, dl_backend **out,
					dl_error *err)
{
	const dl_cuda_plugin *plugin;
	dl_status	st;

	*out = NULL;
	if ((st = cuda_plugin_load(plugin_path, &plugin, err)) != DL_OK)
		return st;
	return plugin->create(device, (int) mode, out, err);
}
