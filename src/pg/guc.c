/* guc.c: the dolly.* configuration parameters, all declared here, then the prefix reserved. */
#include "dolly_pg.h"

#include "utils/guc.h"

#include "sysinfo.h"

int			dolly_device = DOLLY_DEVICE_AUTO;
int			dolly_threads = 0;
char	   *dolly_cuda_devices = NULL;

static const struct config_enum_entry device_options[] = {
	{"cpu", DOLLY_DEVICE_CPU, false},
	{"cuda", DOLLY_DEVICE_CUDA, false},
	{"auto", DOLLY_DEVICE_AUTO, false},
	{NULL, 0, false}
};

void
dolly_guc_init(void)
{
	DefineCustomEnumVariable("dolly.device",
							 "Where the model server runs models: cpu, cuda or auto.",
							 "auto uses a GPU when the CUDA plugin is installed and sees one, else the CPU.",
							 &dolly_device, DOLLY_DEVICE_AUTO, device_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("dolly.threads",
							"Threads the CPU backend uses for one model.",
							"0 means one per CPU available to the server.",
							&dolly_threads, 0, 0, 1024,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("dolly.cuda_devices",
							   "GPUs the model server may use (CUDA_VISIBLE_DEVICES), empty for all.",
							   NULL,
							   &dolly_cuda_devices, "",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	MarkGUCPrefixReserved("dolly");
}

int
dolly_cpu_threads(void)
{
	return dolly_threads > 0 ? dolly_threads : sys_cpu_count();
}
