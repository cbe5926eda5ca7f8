/*
 * shmem.c: the model servers' state in the main shared memory segment (dolly_pg.h). The
 * shared-memory hooks (dolly.c) size and create it with the other modules' shares.
 */
#include "postgres.h"

#include "dolly_pg.h"
#include "paths.h"

#include "storage/shmem.h"

DollyShared *dolly_shared = NULL;

Size
dolly_shared_shmem_size(void)
{
	return MAXALIGN(sizeof(DollyShared));
}

void
dolly_shared_shmem_init(void)
{
	bool		found;

	dolly_shared = ShmemInitStruct("dolly", sizeof(DollyShared), &found);
	if (!found)
	{
		memset(dolly_shared, 0, sizeof(DollyShared));
		SpinLockInit(&dolly_shared->mutex);
		/* new shared memory: the server starts, or restarts after a crash; no job runs */
		dolly_remove_partial_models();
	}
}
