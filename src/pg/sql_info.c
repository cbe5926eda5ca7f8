/* sql_info.c: SQL functions that describe the installation and the model server. */
#include "postgres.h"

#include "dolly_pg.h"
#include "catalog.h"

#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "sysinfo.h"

/* How long a session waits for a (re)starting model server before giving up. */
#define SERVER_WAIT_MS 10000

PG_FUNCTION_INFO_V1(dolly_version);
PG_FUNCTION_INFO_V1(dolly_backends);
PG_FUNCTION_INFO_V1(dolly_server_status);

/* dolly_version(): the extension's version. */
Datum
dolly_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(psprintf("dolly %s", sys_engine_version())));
}

/* Wait, interruptibly, until the model server has published what it found. */
static void
wait_for_server(void)
{
	for (int waited = 0;; waited += 10)
	{
		DollyServerState state;

		/* server 0 publishes what the machine offers */
		SpinLockAcquire(&dolly_shared->mutex);
		state = dolly_shared->servers[0].state;
		SpinLockRelease(&dolly_shared->mutex);
		if (state == DOLLY_SERVER_READY)
			return;
		if (waited >= SERVER_WAIT_MS)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("dolly model server is not running"),
					 errhint("Check the server log for messages from \"dolly model server\".")));
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 10L,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/* dolly_backends(): one row per compute backend: can it be used, on how many devices, why. */
Datum
dolly_backends(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			cpu_threads,
				cuda_ngpus;
	bool		cuda_available;
	char		cpu_detail[sizeof(dolly_shared->cpu_detail)];
	char		cuda_detail[sizeof(dolly_shared->cuda_detail)];
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};

	wait_for_server();
	SpinLockAcquire(&dolly_shared->mutex);
	cpu_threads = dolly_shared->cpu_threads;
	cuda_available = dolly_shared->cuda_available;
	cuda_ngpus = dolly_shared->cuda_ngpus;
	memcpy(cpu_detail, dolly_shared->cpu_detail, sizeof(cpu_detail));
	memcpy(cuda_detail, dolly_shared->cuda_detail, sizeof(cuda_detail));
	SpinLockRelease(&dolly_shared->mutex);

	InitMaterializedSRF(fcinfo, 0);

	values[0] = CStringGetTextDatum("cpu");
	values[1] = BoolGetDatum(true);
	values[2] = Int32GetDatum(cpu_threads);
	values[3] = CStringGetTextDatum(cpu_detail);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);

	values[0] = CStringGetTextDatum("cuda");
	values[1] = BoolGetDatum(cuda_available);
	values[2] = Int32GetDatum(cuda_ngpus);
	values[3] = CStringGetTextDatum(cuda_detail);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);

	return (Datum) 0;
}

/*
 * dolly_server_status(): one row per model each model server holds, of the models the
 * current role may use (superusers: all).
 */
Datum
dolly_server_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	DollyModelStatus *st = palloc(sizeof(DollyModelStatus) * DOLLY_MAX_MODELS);

	InitMaterializedSRF(fcinfo, 0);
	for (int s = 0; s < DOLLY_MAX_SERVERS; s++)
	{
		pid_t		pid;

		SpinLockAcquire(&dolly_shared->mutex);
		memcpy(st, dolly_shared->servers[s].models, sizeof(DollyModelStatus) * DOLLY_MAX_MODELS);
		pid = dolly_shared->servers[s].pid;
		SpinLockRelease(&dolly_shared->mutex);

		for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		{
			Datum		values[16];
			bool		nulls[16];
			const char *slash = strrchr(st[i].path, '/');
			int			c = 0;

			if (!st[i].in_use || !dolly_model_visible(st[i].path))
				continue;
			memset(nulls, 0, sizeof(nulls));
			values[c++] = Int32GetDatum(pid);
			/* the directory's name only: paths are for superusers (dolly.model is hidden too) */
			values[c++] = CStringGetTextDatum(slash ? slash + 1 : st[i].path);
			values[c++] = CStringGetTextDatum(st[i].arch);
			values[c++] = CStringGetTextDatum(st[i].device);
			values[c++] = TimestampTzGetDatum(st[i].loaded_at);
			values[c++] = Float8GetDatum(st[i].load_seconds);
			values[c++] = Int64GetDatum(st[i].params);
			values[c++] = Int64GetDatum(st[i].param_bytes);
			values[c++] = Int64GetDatum(st[i].cache_bytes);
			values[c++] = Int32GetDatum(st[i].max_batch);
			values[c++] = Int32GetDatum(st[i].max_context);
			values[c++] = Int32GetDatum(st[i].active);
			values[c++] = Int64GetDatum(st[i].requests);
			values[c++] = Int64GetDatum(st[i].prompt_tokens);
			values[c++] = Int64GetDatum(st[i].generated_tokens);
			values[c++] = Float8GetDatum(st[i].tokens_per_second);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	return (Datum) 0;
}
