/*
 * dolly.c: the extension's entry point. _PG_init only insists on being preloaded and
 * calls one init function per module, and installs the shared-memory hooks, which size
 * and create each module's share (as PostgreSQL's ipci.c does for its own). CUDA is never
 * touched here (nor in the postmaster): only the model server worker initialises it, after
 * fork.
 *
 * See docs/ARCHITECTURE.md, the parts.
 */
#include "postgres.h"

#include "dolly_pg.h"
#include "batch_scan.h"
#include "jobs.h"
#include "model_server.h"
#include "queue.h"
#include "settings.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/elog.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Ask the postmaster for our share of shared memory before it sizes the segment. */
static void
shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(add_size(add_size(dolly_shared_shmem_size(), dolly_queue_shmem_size()),
									dolly_jobs_shmem_size()));
	dolly_queue_request_lock();
}

/* Create (postmaster) or attach to (EXEC_BACKEND children) the shared state. */
static void
shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	dolly_shared_shmem_init();
	dolly_queue_shmem_init();
	dolly_jobs_shmem_init();
	LWLockRelease(AddinShmemInitLock);
}

void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("dolly must be loaded via shared_preload_libraries"),
				 errhint("Add dolly to shared_preload_libraries in postgresql.conf and restart the server.")));

	dolly_settings_init();
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shmem_startup;
	dolly_model_server_register();
	dolly_batch_init();
}
