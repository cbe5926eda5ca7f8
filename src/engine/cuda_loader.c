/* cuda_loader.c: finds and dlopen()s the CUDA plugin; see cuda_plugin.h. */
#include "cuda_plugin.h"

#include <dlfcn.h>
#include <string.h>
#include <unistd.h>

static const dl_cuda_plugin *loaded;

dl_status
cuda_plugin_load(const char *path, const dl_cuda_plugin **out, dl_error *err)
{
	void	   *handle;
	dl_cuda_plugin_fn entry;
	const dl_cuda_plugin *plugin;

	if (loaded)
	{
		*out = loaded;
		return DL_OK;
	}
	if (access(path, R_OK) != 0)
	{
		dl_fail(err, DL_EUNSUPPORTED, "CUDA plugin \"%s\" is not installed", path);
		return dl_hint(err, "Build dolly on a machine with the CUDA toolkit (nvcc) and run \"make install\".");
	}
	handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (handle == NULL)
	{
		dl_fail(err, DL_EBACKEND, "CUDA plugin cannot be loaded: %s", dlerror());
		return dl_hint(err, "The NVIDIA driver and the CUDA runtime libraries (libcudart, libcublas) must be installed.");
	}
	entry = (dl_cuda_plugin_fn) dlsym(handle, DL_CUDA_PLUGIN_SYMBOL);
	if (entry == NULL)
	{
		dlclose(handle);
		return dl_fail(err, DL_EBACKEND, "\"%s\" does not export %s", path, DL_CUDA_PLUGIN_SYMBOL);
	}
	plugin = entry();
	if (plugin == NULL || plugin->abi != DL_CUDA_PLUGIN_ABI)
	{
		/* read the table before dlclose() unmaps it */
		dl_fail(err, DL_EBACKEND, "CUDA plugin \"%s\" has ABI %d, this engine needs %d",
				path, plugin ? plugin->abi : -1, DL_CUDA_PLUGIN_ABI);
		dlclose(handle);
		return dl_hint(err, "Reinstall dolly so that dolly.so and dolly_cuda.so come from the same build.");
	}
	loaded = plugin;
	*out = plugin;
	return DL_OK;
}
