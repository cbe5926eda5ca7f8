/*
 * dolly.c: the extension's entry point. _PG_init only insists on being preloaded and
 * calls one init function per module; CUDA is never touched here (nor in the postmaster):
 * only the model server worker initialises it, after fork.
 */
#include "dolly_pg.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/elog.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("dolly must be loaded via shared_preload_libraries"),
				 errhint("Add dolly to shared_preload_libraries in postgresql.conf and restart the server.")));

	dolly_guc_init();
	dolly_shmem_init();
	dolly_server_register();
	dolly_batch_init();
}

/* Map engine status codes to SQLSTATEs a client can act on. */
int
dolly_errcode(dl_status code)
{
	switch (code)
	{
		case DL_EIO:
			return ERRCODE_IO_ERROR;
		case DL_EFORMAT:
			return ERRCODE_DATA_CORRUPTED;
		case DL_EUNSUPPORTED:
			return ERRCODE_FEATURE_NOT_SUPPORTED;
		case DL_ENOMEM:
			return ERRCODE_OUT_OF_MEMORY;
		case DL_EINVAL:
			return ERRCODE_INVALID_PARAMETER_VALUE;
		case DL_ECANCELLED:
			return ERRCODE_QUERY_CANCELED;
		case DL_EBACKEND:
		case DL_OK:
			break;
	}
	return ERRCODE_EXTERNAL_ROUTINE_EXCEPTION;
}

void
dolly_report(int elevel, const dl_error *err)
{
	ereport(elevel,
			(errcode(dolly_errcode(err->code)),
			 errmsg("%s", err->msg),
			 err->hint[0] ? errhint("%s", err->hint) : 0));
}
