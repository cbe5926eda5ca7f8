/*
 * model_server.c: the model servers' background workers, one per device, and their main
 * loop; the serving work each tick does is the batcher's (batcher.c).
 *
 * Server 0, registered at postmaster start, finds out which compute backends the machine
 * offers (devices.c) and publishes that for dolly_backends(). It serves on the CPU, or on
 * GPU 0 when dolly.device asks for GPUs; then it starts server g for every further GPU g,
 * as a dynamic background worker (how many GPUs there are is known only once CUDA ran,
 * which the postmaster must never do: CUDA state does not survive fork()). Each server
 * loads dolly.model, then serves the requests sessions queue, sleeping on its latch when
 * there is nothing to do. SIGTERM ends a server with FATAL; the postmaster restarts it
 * after bgw_restart_time unless the whole server is shutting down. A GPU's server exits for
 * good (code 0) when dolly.device no longer asks for GPUs, or when it finds its device
 * served already.
 *
 * See docs/ARCHITECTURE.md, the life of a request.
 */
#include "postgres.h"

#include "dolly_pg.h"
#include "batcher.h"
#include "devices.h"
#include "model_server.h"
#include "queue.h"
#include "step_trace.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#define DOLLY_SERVER_NAME "dolly model server"

/* The worker that serves device `server`. */
static void
server_worker(int server, BackgroundWorker *worker)
{
	memset(worker, 0, sizeof(*worker));
	/* a connection to no database: enough to appear in pg_stat_activity */
	worker->bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker->bgw_start_time = BgWorkerStart_ConsistentState;
	worker->bgw_restart_time = 1;
	worker->bgw_main_arg = Int32GetDatum(server);
	snprintf(worker->bgw_library_name, BGW_MAXLEN, "dolly");
	snprintf(worker->bgw_function_name, BGW_MAXLEN, "dolly_model_server_main");
	if (server == 0)
		snprintf(worker->bgw_name, BGW_MAXLEN, DOLLY_SERVER_NAME);
	else
		snprintf(worker->bgw_name, BGW_MAXLEN, DOLLY_SERVER_NAME " for GPU %d", server);
	snprintf(worker->bgw_type, BGW_MAXLEN, DOLLY_SERVER_NAME);
}

void
dolly_model_server_register(void)
{
	BackgroundWorker worker;

	server_worker(0, &worker);
	RegisterBackgroundWorker(&worker);
}

/*
 * Does dolly.device (still) ask for a server on GPU `server` > 0: GPUs wanted, and that one
 * seen by server 0's probe, with the self-test passed?
 */
static bool
gpu_wanted(int server)
{
	bool		seen;

	SpinLockAcquire(&dolly_shared->mutex);
	seen = dolly_shared->cuda_available && server < dolly_shared->cuda_ngpus;
	SpinLockRelease(&dolly_shared->mutex);
	return seen && dolly_want_cuda();
}

/* Server 0: start a server for every further GPU that has none, when dolly.device wants GPUs. */
static void
start_gpu_servers(void)
{
	for (int g = 1; g < DOLLY_MAX_SERVERS && gpu_wanted(g); g++)
	{
		BackgroundWorker worker;
		BackgroundWorkerHandle *handle;
		bool		stopped;

		SpinLockAcquire(&dolly_shared->mutex);
		stopped = dolly_shared->servers[g].state == DOLLY_SERVER_STOPPED;
		if (stopped)
			dolly_shared->servers[g].state = DOLLY_SERVER_STARTING;
		SpinLockRelease(&dolly_shared->mutex);
		if (!stopped)
			continue;
		server_worker(g, &worker);
		if (!RegisterDynamicBackgroundWorker(&worker, &handle))
		{
			SpinLockAcquire(&dolly_shared->mutex);
			dolly_shared->servers[g].state = DOLLY_SERVER_STOPPED;
			SpinLockRelease(&dolly_shared->mutex);
			ereport(LOG,
					(errmsg("dolly: no background worker slot for the model server of GPU %d; GPU %d serves nothing", g, g),
					 errhint("Raise max_worker_processes: dolly needs one per GPU, and one per fine-tuning rank.")));
		}
	}
}

/* Mark the server gone and fail what it was running, so that no session waits for it. */
static void
server_on_exit(int code, Datum arg)
{
	int			server = DatumGetInt32(arg);
	DollyServer *me = &dolly_shared->servers[server];

	dolly_queue_taking(server, false);
	SpinLockAcquire(&dolly_shared->mutex);
	me->state = DOLLY_SERVER_STOPPED;
	me->pid = 0;
	me->latch = NULL;
	for (int i = 0; i < DOLLY_MAX_MODELS; i++)
		me->models[i].in_use = false;
	SpinLockRelease(&dolly_shared->mutex);
	dolly_queue_fail_running(server, "dolly model server stopped while the request ran");
}

/*
 * Claim device `server` for this process. False when another live process serves it: a
 * GPU's server registered twice (server 0 restarted while it was restarting) leaves.
 */
static bool
claim(int server)
{
	DollyServer *me = &dolly_shared->servers[server];
	bool		mine;

	SpinLockAcquire(&dolly_shared->mutex);
	mine = me->pid == 0;
	if (mine)
	{
		me->pid = MyProcPid;
		me->state = DOLLY_SERVER_STARTING;
	}
	SpinLockRelease(&dolly_shared->mutex);
	return mine;
}

void
dolly_model_server_main(Datum arg)
{
	int			server = DatumGetInt32(arg);
	bool		was_busy = false;
	MemoryContext tick_context;

	pqsignal(SIGTERM, die);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname(DOLLY_SERVER_NAME);

	/* before claiming: a worker that leaves must not touch the state of its device */
	if (server > 0 && !gpu_wanted(server))
	{
		/* server 0 starts it again once it has probed the GPUs, if they are wanted */
		elog(LOG, "dolly: no model server for GPU %d: dolly.device does not ask for it, or it is not probed yet", server);
		proc_exit(0);
	}
	if (!claim(server))
	{
		elog(LOG, "dolly: GPU %d has its model server already; this one leaves", server);
		proc_exit(0);
	}
	on_shmem_exit(server_on_exit, Int32GetDatum(server));
	/* requests a previous server of this device took died with it; queued ones are served */
	dolly_queue_fail_running(server, "dolly model server restarted while the request ran");

	dolly_cuda_restrict();
	if (server == 0)
	{
		pgstat_report_activity(STATE_RUNNING, "probing compute backends");
		dolly_probe_cpu();
		dolly_probe_cuda();
		start_gpu_servers();
	}
	dolly_batcher_init(server);
	SpinLockAcquire(&dolly_shared->mutex);
	dolly_shared->servers[server].latch = MyLatch;
	dolly_shared->servers[server].state = DOLLY_SERVER_READY;
	SpinLockRelease(&dolly_shared->mutex);
	pgstat_report_activity(STATE_IDLE, "");
	elog(LOG, "dolly model server ready%s", server ? psprintf(" on GPU %d", server) : "");

	/*
	 * What a tick allocates (answers' texts, activity lines) lives until the next one, so
	 * that a server that runs for months does not grow; what lasts is in TopMemoryContext.
	 */
	tick_context = AllocSetContextCreate(TopMemoryContext, "dolly model server tick",
										 ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(tick_context);
	for (;;)
	{
		bool		busy;

		MemoryContextReset(tick_context);
		/* reset first: a request queued during the tick sets it again, nothing is missed */
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (server == 0)
				dolly_probe_cpu();
			dolly_batcher_reconfigure();
			if (server == 0)
				start_gpu_servers();
		}
		busy = dolly_batcher_tick();
		if (dolly_batcher_retired())
		{
			elog(LOG, "dolly model server of GPU %d stops: dolly.device no longer asks for GPUs", server);
			proc_exit(0);
		}
		if (busy != was_busy)
			pgstat_report_activity(busy ? STATE_RUNNING : STATE_IDLE, busy ? "generating" : "");
		was_busy = busy;
		if (!busy)
		{
			dolly_trace_flush();
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 1000L, PG_WAIT_EXTENSION);
		}
	}
}
