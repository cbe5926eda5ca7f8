/*
 * dolly_pg.h: what the glue's processes share in the main shared memory segment: the model
 * servers' state, which they publish and sessions read (dolly_server, dolly_backends, a
 * waiting session checking that a server is up). shmem.c creates it; the request queue
 * (queue.h) and the fine-tuning jobs (jobs.h) have shares of their own.
 */
#ifndef DOLLY_PG_H
#define DOLLY_PG_H

#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "storage/spin.h"

#include "cuda_plugin.h"

/* What the model server found out about the machine; written by it, read by SQL functions. */
typedef enum DollyServerState
{
	DOLLY_SERVER_STOPPED = 0,	/* not started yet, or exited */
	DOLLY_SERVER_STARTING,		/* started, probing backends */
	DOLLY_SERVER_READY			/* serving */
} DollyServerState;

/* Adapters a loaded model may hold at once (the bound of dolly.max_loaded_adapters). */
#define DOLLY_MAX_ADAPTERS 64

/* Models the server may hold at once (the bound of dolly.max_loaded_models). */
#define DOLLY_MAX_MODELS 64

/* One loaded model's row of the dolly_server view. */
typedef struct DollyModelStatus
{
	bool		in_use;
	char		path[MAXPGPATH];
	char		arch[16];
	char		device[32];
	TimestampTz loaded_at;
	double		load_seconds;
	int64		params;
	int64		param_bytes;
	int64		cache_bytes;
	int			max_batch;
	int			max_context;
	int			active;			/* sequences in flight */
	int64		requests;		/* answered */
	int64		prompt_tokens;
	int64		generated_tokens;
	double		tokens_per_second;	/* moving average over recent passes */
} DollyModelStatus;

/*
 * One model server per device: server 0 probes the machine and serves on the CPU or on
 * GPU 0; when dolly.device asks for GPUs it starts server g for each further GPU g.
 */
#define DOLLY_MAX_SERVERS DL_MAX_GPUS

typedef struct DollyServer
{
	DollyServerState state;
	pid_t		pid;			/* 0: none runs for this device */
	Latch	   *latch;			/* set it to wake the server: a request is queued */
	DollyModelStatus models[DOLLY_MAX_MODELS];
} DollyServer;

typedef struct DollyShared
{
	slock_t		mutex;			/* protects everything below */
	int			cpu_threads;
	char		cpu_detail[256];
	bool		cuda_available;
	int			cuda_ngpus;
	char		cuda_detail[1024];	/* GPUs seen, or why CUDA cannot be used */
	DollyServer servers[DOLLY_MAX_SERVERS];
} DollyShared;

extern DollyShared *dolly_shared;

/* Its size, and creating it (or attaching to it), for the shared-memory hooks. */
extern Size dolly_shared_shmem_size(void);
extern void dolly_shared_shmem_init(void);

#endif
