/* shmem.c: the model server's state in the main shared memory segment. */
#include "dolly_pg.h"
#include "jobs.h"
#include "queue.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"

DollyShared *dolly_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Ask the postmaster for our share of shared memory before it sizes the segment. */
static void
dolly_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(add_size(add_size(MAXALIGN(sizeof(DollyShared)), dolly_queue_shmem_size()),
									dolly_jobs_shmem_size()));
	dolly_queue_request_lock();
}

/* Create (postmaster) or attach to (EXEC_BACKEND children) the shared state. */
static void
dolly_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	dolly_shared = ShmemInitStruct("dolly", sizeof(DollyShared), &found);
	if (!found)
	{
		memset(dolly_shared, 0, sizeof(DollyShared));
		SpinLockInit(&dolly_shared->mutex);
		/* new shared memory: the server starts, or restarts after a crash; no job runs */
		dolly_remove_partial_models();
	}
	dolly_queue_shmem_init();
	dolly_jobs_shmem_init();
	LWLockRelease(AddinShmemInitLock);
}

void
dolly_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = dolly_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = dolly_shmem_startup;
}
