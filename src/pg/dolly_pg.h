/*
 * dolly_pg.h: what the files of the PostgreSQL glue share: configuration variables, the
 * shared-memory state of the model server, and the per-module init functions _PG_init calls.
 */
#ifndef DOLLY_PG_H
#define DOLLY_PG_H

#include "postgres.h"

#include "storage/spin.h"

#include "cuda_plugin.h"
#include "error.h"

/* dolly.device */
typedef enum DollyDevice
{
	DOLLY_DEVICE_CPU,
	DOLLY_DEVICE_CUDA,
	DOLLY_DEVICE_AUTO
} DollyDevice;

/* GUCs (guc.c) */
extern int	dolly_device;
extern int	dolly_threads;
extern char *dolly_cuda_devices;

/* What the model server found out about the machine; written by it, read by SQL functions. */
typedef enum DollyServerState
{
	DOLLY_SERVER_STOPPED = 0,	/* not started yet, or exited */
	DOLLY_SERVER_STARTING,		/* started, probing backends */
	DOLLY_SERVER_READY			/* serving */
} DollyServerState;

typedef struct DollyShared
{
	slock_t		mutex;			/* protects everything below */
	DollyServerState state;
	pid_t		server_pid;
	uint64		server_generation;	/* bumped at every (re)start of the model server */
	int			cpu_threads;
	char		cpu_detail[256];
	bool		cuda_available;
	int			cuda_ngpus;
	char		cuda_detail[1024];	/* GPUs seen, or why CUDA cannot be used */
} DollyShared;

extern DollyShared *dolly_shared;

/* Per-module initialisation, called from _PG_init in this order. */
extern void dolly_guc_init(void);
extern void dolly_shmem_init(void);
extern void dolly_server_register(void);

/* Number of threads the CPU backend uses: dolly.threads, or every CPU when it is 0. */
extern int	dolly_cpu_threads(void);

/* Report an engine failure as an ERROR (or another elevel) with its hint. */
extern void dolly_report(int elevel, const dl_error *err);

/* Path of the CUDA plugin in $libdir. */
extern void dolly_cuda_plugin_path(char *buf, size_t len);

#endif
