/*
 * job_ranks.c: data parallelism for fine-tuning jobs, through PostgreSQL shared memory.
 *
 * With dolly.train_workers = N > 1, the job's worker (rank 0) reads and tokenises the
 * records as the calling role, then creates a DSM segment holding the examples and the
 * training options and starts N - 1 more workers (ranks 1..N-1). Every rank loads the
 * base model, takes its share of each batch (finetune_run's rank/nranks) and sums
 * gradients, losses and label counts with the others through the segment's staging area
 * (the engine's collective.c: reduce-scatter and all-gather in rank order, so every rank
 * ends bit-identical; ZeRO stages 1 and 2 shard AdamW's state and the gradients over the
 * ranks). No NCCL: GPU ranks map each other's device memory (CUDA IPC, the handles passed
 * through the segment by the engine's group_share) and sum on the GPUs; where a pair of
 * them cannot, every rank sums through the segment in host memory, and the log says which.
 *
 * The barrier is a generation counter and a condition variable in the segment. A rank
 * that fails or is told to stop raises `abort`; a rank whose peer process is gone does
 * too; everyone then leaves at their next barrier instead of waiting forever.
 *
 * See docs/ARCHITECTURE.md, the life of a fine-tuning job.
 */
#include "postgres.h"

#include "devices.h"
#include "errors.h"
#include "jobs.h"
#include "paths.h"

#include <errno.h>
#include <math.h>
#include <signal.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/condition_variable.h"
#include "storage/dsm.h"
#include "storage/ipc.h"
#include "tcop/tcopprot.h"
#include "utils/wait_event.h"

#include "cuda_plugin.h"
#include "sysinfo.h"
#include "lora.h"
#include "train.h"

#define DP_CHUNK (1 << 20)		/* floats a rank stages per round */

typedef struct DpExample
{
	int32		n;
	int32		first_label;
	Size		ids_off;		/* from the segment's start */
} DpExample;

struct DollyDP
{
	slock_t		mutex;
	ConditionVariable cv;
	int			nranks;
	int			arrived;		/* at the current barrier */
	uint64		phase;			/* barriers passed */
	bool		abort;
	char		error[512];		/* why a rank failed; "" if it was a stop */
	pid_t		pids[DOLLY_MAX_RANKS];
	char		base_path[MAXPGPATH];
	dl_finetune_opts opts;		/* the numbers only: ranks set their own hooks */
	bool		lora;			/* the ranks train an adapter of lora_cfg, not the model */
	dl_lora_config lora_cfg;
	int			ntrain;
	int			neval;			/* the first neval examples are for evaluation */
	Size		examples_off;	/* DpExample[neval + ntrain] */
	Size		stage_off;		/* the group's staging area, group_stage_bytes */
	dsm_handle	peer_handle;	/* CPU ranks at stages 0, 1: their gradient buffers; 0 if none */
	Size		peer_n;			/* floats of each */
	int64		job_id;
};

/* This process's rank. */
static int	my_rank;

/*
 * The ranks' gradient buffers, side by side in one segment, so that every rank sums from
 * the others' directly (collective.h's peers): with the staging area only, every byte
 * would be copied in and out of it. None where the segment cannot be made (a small
 * /dev/shm): the sums then go through the staging area.
 */
static dsm_segment *
create_peer_buffers(int nranks, Size bytes)
{
	MemoryContext cxt = CurrentMemoryContext;
	dsm_segment *seg = NULL;

	PG_TRY();
	{
		seg = dsm_create((Size) nranks * bytes, DSM_CREATE_NULL_IF_MAXSEGMENTS);
	}
	PG_CATCH();
	{
		ErrorData  *e;

		MemoryContextSwitchTo(cxt);
		e = CopyErrorData();
		FlushErrorState();
		elog(LOG, "dolly: fine-tuning ranks sum through the staging area only: %s", e->message);
		FreeErrorData(e);
		seg = NULL;
	}
	PG_END_TRY();
	if (seg)
		dsm_pin_mapping(seg);
	return seg;
}

/* This rank's view of the peers' gradient buffers (NULL when there are none). */
static float **
peer_buffers(DollyDP *d)
{
	static dsm_segment *seg;
	float	  **peers;

	if (d->peer_handle == 0)
		return NULL;
	if (seg == NULL && (seg = dsm_find_mapping(d->peer_handle)) == NULL)
	{
		seg = dsm_attach(d->peer_handle);
		if (seg == NULL)
			return NULL;
		dsm_pin_mapping(seg);
	}
	peers = palloc(sizeof(float *) * d->nranks);
	for (int r = 0; r < d->nranks; r++)
		peers[r] = (float *) dsm_segment_address(seg) + (Size) r * d->peer_n;
	return peers;
}

/* Is process pid gone? */
static bool
gone(pid_t pid)
{
	return pid != 0 && kill(pid, 0) != 0 && errno == ESRCH;
}

void
dolly_dp_abort(DollyDP *d, const char *error)
{
	SpinLockAcquire(&d->mutex);
	d->abort = true;
	if (error && d->error[0] == '\0')
		strlcpy(d->error, error, sizeof(d->error));
	SpinLockRelease(&d->mutex);
	ConditionVariableBroadcast(&d->cv);
}

/* Wait until every rank arrives; false if the group is aborting. */
static bool
barrier(DollyDP *d)
{
	uint64		phase;
	bool		ok = true;

	SpinLockAcquire(&d->mutex);
	phase = d->phase;
	if (++d->arrived == d->nranks)
	{
		d->arrived = 0;
		d->phase++;
		ok = !d->abort;
		SpinLockRelease(&d->mutex);
		ConditionVariableBroadcast(&d->cv);
		return ok;
	}
	SpinLockRelease(&d->mutex);

	ConditionVariablePrepareToSleep(&d->cv);
	for (;;)
	{
		bool		passed;

		SpinLockAcquire(&d->mutex);
		passed = d->phase != phase;
		ok = !d->abort;
		SpinLockRelease(&d->mutex);
		if (passed || !ok)
			break;
		for (int r = 0; r < d->nranks; r++)
			if (gone(d->pids[r]))
				dolly_dp_abort(d, "a fine-tuning worker exited unexpectedly");
		/* a stop request (SIGTERM) leaves through the engine, not a longjmp */
		if (ProcDiePending)
			dolly_dp_abort(d, NULL);
		/*
		 * Interrupts held: the sleep's CHECK_FOR_INTERRUPTS would otherwise act on SIGTERM
		 * by exiting from inside the engine, with its threads running (a crash).
		 */
		HOLD_INTERRUPTS();
		(void) ConditionVariableTimedSleep(&d->cv, 100, PG_WAIT_EXTENSION);
		RESUME_INTERRUPTS();
	}
	ConditionVariableCancelSleep();
	return ok;
}

/* The group's barrier: nonzero when the group stops. */
static int
group_barrier(void *arg)
{
	return !barrier(arg);
}

/* A rank of the group fails or stops (on the main thread): the others leave their barriers. */
static void
group_stop(void *arg, const char *error)
{
	dolly_dp_abort(arg, error);
}

/* What the engine says about the way the ranks sum (on the main thread): to the log. */
static void
group_note(void *arg, const char *msg)
{
	DollyDP    *d = arg;

	elog(LOG, "dolly: fine-tuning job %lld: %s", (long long) d->job_id, msg);
}

/* The examples in the segment, as dl_examples pointing into it (never freed). */
static dl_example *
examples_of(DollyDP *d)
{
	DpExample  *de = (DpExample *) ((char *) d + d->examples_off);
	int			n = d->neval + d->ntrain;
	dl_example *ex = palloc(sizeof(dl_example) * n);

	for (int i = 0; i < n; i++)
	{
		ex[i].ids = (int32_t *) ((char *) d + de[i].ids_off);
		ex[i].n = de[i].n;
		ex[i].first_label = de[i].first_label;
	}
	return ex;
}

DollyDP *
dolly_dp_start(int nranks, const dl_example *ex, int ntrain, int neval, const char *base_path,
			   const dl_finetune_opts *opts, const dl_lora_config *lora, Size trained_bytes,
			   int64 job_id)
{
	Size		ids = 0,
				size;
	dsm_segment *seg;
	DollyDP    *d;
	DpExample  *de;
	Size		off;

	for (int i = 0; i < ntrain + neval; i++)
		ids += MAXALIGN(ex[i].n * sizeof(int32));
	size = MAXALIGN(sizeof(DollyDP)) + MAXALIGN(sizeof(DpExample) * (ntrain + neval)) + ids +
		group_stage_bytes(nranks, DP_CHUNK);
	seg = dsm_create(size, 0);
	dsm_pin_mapping(seg);		/* kept until the process exits */
	d = dsm_segment_address(seg);
	memset(d, 0, sizeof(DollyDP));
	SpinLockInit(&d->mutex);
	ConditionVariableInit(&d->cv);
	d->nranks = nranks;
	d->job_id = job_id;
	d->pids[0] = MyProcPid;
	strlcpy(d->base_path, base_path, sizeof(d->base_path));
	d->opts = *opts;
	d->opts.group = NULL;
	d->opts.progress = NULL;
	d->opts.progress_arg = NULL;
	d->opts.lora = NULL;
	d->lora = lora != NULL;
	if (lora)
		d->lora_cfg = *lora;
	d->ntrain = ntrain;
	d->neval = neval;
	d->examples_off = MAXALIGN(sizeof(DollyDP));
	de = (DpExample *) ((char *) d + d->examples_off);
	off = d->examples_off + MAXALIGN(sizeof(DpExample) * (ntrain + neval));
	for (int i = 0; i < ntrain + neval; i++)
	{
		de[i].n = ex[i].n;
		de[i].first_label = ex[i].first_label;
		de[i].ids_off = off;
		memcpy((char *) d + off, ex[i].ids, ex[i].n * sizeof(int32));
		off += MAXALIGN(ex[i].n * sizeof(int32));
	}
	d->stage_off = off;
	memset((char *) d + off, 0, group_stage_bytes(nranks, DP_CHUNK));
	/* CPU ranks keep every gradient (stages 0, 1): in a segment all of them map */
	if (!dolly_want_cuda() && opts->zero_stage < 2)
	{
		dsm_segment *peers = create_peer_buffers(nranks, MAXALIGN(trained_bytes));

		d->peer_handle = peers ? dsm_segment_handle(peers) : 0;
		d->peer_n = MAXALIGN(trained_bytes) / sizeof(float);
		if (peers)
			elog(LOG, "dolly: fine-tuning job %lld: the ranks sum from each other's gradient buffers (%.0f MB of shared memory)",
				 (long long) job_id, (double) nranks * MAXALIGN(trained_bytes) / 1048576.0);
	}

	for (int r = 1; r < nranks; r++)
	{
		BackgroundWorker w;
		BackgroundWorkerHandle *h;
		uint32		args[2] = {dsm_segment_handle(seg), (uint32) r};

		dolly_job_worker_init(&w, job_id, "dolly_job_rank_main");
		snprintf(w.bgw_name, BGW_MAXLEN, "dolly fine-tuning job %lld rank %d", (long long) job_id, r);
		memcpy(w.bgw_extra + 2 * sizeof(Oid), args, sizeof(args));
		w.bgw_notify_pid = MyProcPid;
		if (!RegisterDynamicBackgroundWorker(&w, &h) ||
			WaitForBackgroundWorkerStartup(h, &d->pids[r]) != BGWH_STARTED)
		{
			dolly_dp_abort(d, "cannot start the fine-tuning workers of every rank (raise max_worker_processes)");
			return d;
		}
	}
	return d;
}

dl_status
dolly_dp_train(DollyDP *d, int rank, dl_model *m, const dl_example *ex, int ntrain, int neval,
			   dl_finetune_opts *o, dl_train_progress *last, dl_error *err)
{
	dl_group	group = {
		.rank = rank, .nranks = d->nranks, .stage = (char *) d + d->stage_off, .chunk = DP_CHUNK,
		.bf16 = o->comm_bf16, .barrier = group_barrier, .barrier_arg = d,
		.peers = peer_buffers(d), .peer_n = d->peer_n, .note = group_note, .stop = group_stop,
	};
	dl_status	st;

	my_rank = rank;
	o->rank = rank;
	o->nranks = d->nranks;
	o->group = &group;
	/* everyone has loaded the model before the first step */
	if (!barrier(d))
		st = dl_fail(err, DL_ECANCELLED, "data-parallel group stopped");
	else
		st = finetune_run(m, ex + neval, ntrain, ex, neval, o, last, err);
	if (st != DL_OK)
	{
		dolly_dp_abort(d, st == DL_ECANCELLED ? NULL : err->msg);
		/* a peer's failure reaches the others as a stop: report the failure instead */
		if (st == DL_ECANCELLED && d->error[0])
			st = dl_fail(err, DL_EBACKEND, "%s", d->error);
	}
	group_release(&group);
	o->group = NULL;
	return st;
}

dl_status
dolly_job_load_base(const char *base_path, int rank, int nranks, const dl_lora_config *lora,
					uint64 seed, const char *activity, bool (*stop) (void *arg), void *arg,
					dl_backend **be, dl_pipeline **base, dl_lora **adapter, dl_error *err)
{
	char		path[MAXPGPATH + 32];
	dl_lora_config cfg;
	dl_status	st;

	if (dolly_want_cuda())
	{
		dl_gpu_info gpus[DL_MAX_GPUS];
		int			ngpus;
		dl_error	unseen;			/* the backend's creation says what is wrong */

		dolly_cuda_restrict();
		dolly_cuda_plugin_path(path, sizeof(path));
		/* more ranks than GPUs share them, rank r on GPU r mod the GPUs */
		(void) dolly_cuda_gpus(gpus, &ngpus, &unseen);
		st = backend_cuda_create(path, ngpus > 0 ? rank % ngpus : rank, DL_CUDA_MIXED, be, err);
	}
	else
		st = backend_cpu_create(Max(1, dolly_cpu_threads() / nranks), 0, be, err);
	if (st != DL_OK)
		return st;
	elog(LOG, "dolly: fine-tuning rank %d of %d trains on %s", rank, nranks, (*be)->name);
	if (dolly_open_model(base_path, *be, activity, stop, arg, base, err) != DL_OK)
		return err->code;
	if (lora == NULL)
		return model_add_dolly_tokens(&(*base)->model, (*base)->tok, err);
	cfg = *lora;
	if (lora_dolly_tokens((*base)->model, (*base)->tok, &cfg, err) != DL_OK)
		return err->code;
	return dl_lora_create((*base)->model, &cfg, seed, adapter, err);
}

/*
 * Bytes each of nranks ranks has for training state, or -1 when unknown. This rank's
 * weights are loaded; those of the ranks that share its memory are still to come.
 */
static long long
rank_memory(const dl_model *m, const dl_backend *be, int nranks)
{
	dl_gpu_info gpus[DL_MAX_GPUS];
	int			ngpus,
				sharing;
	long long	avail;
	dl_error	err;

	if (be->host_memory)
	{
		avail = sys_mem_available();
		sharing = nranks;
	}
	else
	{
		/* GPU 0 (rank 0's) stands for all; ranks r = 0 mod the GPUs share it */
		if (dolly_cuda_gpus(gpus, &ngpus, &err) == NULL || ngpus < 1)
			return -1;
		avail = (long long) gpus[0].free_bytes;
		sharing = (nranks + ngpus - 1) / ngpus;
	}
	return avail < 0 ? -1 : (avail - (long long) (sharing - 1) * (long long) m->param_bytes) / sharing;
}

int
dolly_dp_choose_stage(const dl_model *m, const dl_lora *lora, const dl_backend *be, int nranks,
					  int wanted, int64 job_id)
{
	long long	avail = rank_memory(m, be, nranks);
	int			stage = wanted;
	const char *why = "asked for";

	if (nranks < 2)
	{
		stage = 0;
		why = "one rank";
	}
	else if (wanted < 0)
	{
		/* a tenth kept for activations and the allocator */
		for (stage = 0; stage < 2; stage++)
			if (avail >= 0 && (double) trainer_state_floats(m, lora, nranks, stage) * sizeof(float) <= 0.9 * avail)
				break;
		why = stage < 2 || (avail >= 0 && (double) trainer_state_floats(m, lora, nranks, 2) * sizeof(float) <= 0.9 * avail)
			? "the smallest stage that fits" : "nothing smaller fits";
	}
	elog(LOG, "dolly: fine-tuning job %lld: ZeRO stage %d (%s): gradients and AdamW state %.0f MB a rank "
		 "(stage 0: %.0f MB), %.0f MB available a rank",
		 (long long) job_id, stage, why,
		 trainer_state_floats(m, lora, nranks, stage) * sizeof(float) / 1048576.0,
		 trainer_state_floats(m, lora, nranks, 0) * sizeof(float) / 1048576.0,
		 avail >= 0 ? avail / 1048576.0 : NAN);
	return stage;
}

/* Does the group stop (a rank failed or was stopped)? */
static bool
group_stops(void *arg)
{
	DollyDP    *d = arg;

	return d->abort || ProcDiePending;
}

/* Progress of ranks > 0: nothing to publish; stop when the group stops. */
static int
rank_progress(void *arg, const dl_train_progress *p)
{
	return group_stops(arg);
}

void
dolly_job_rank_main(Datum main_arg)
{
	Oid			extra[2];
	uint32		args[2];
	dsm_segment *seg;
	DollyDP    *d;
	dl_backend *be = NULL;
	dl_pipeline *base = NULL;
	dl_lora    *lora = NULL;
	dl_error	err;
	dl_finetune_opts o;
	dl_train_progress last;

	memcpy(extra, MyBgworkerEntry->bgw_extra, sizeof(extra));
	memcpy(args, MyBgworkerEntry->bgw_extra + sizeof(extra), sizeof(args));
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(extra[0], extra[1], 0);
	pgstat_report_appname(MyBgworkerEntry->bgw_name);
	seg = dsm_attach(args[0]);
	if (seg == NULL)
		proc_exit(0);			/* rank 0 is already gone */
	d = dsm_segment_address(seg);
	my_rank = (int) args[1];
	d->pids[my_rank] = MyProcPid;
	elog(LOG, "dolly: fine-tuning job %lld: rank %d of %d started",
		 (long long) DatumGetInt64(main_arg), my_rank, d->nranks);
	pgstat_report_activity(STATE_RUNNING, "loading the base model");

	if (dolly_job_load_base(d->base_path, my_rank, d->nranks, d->lora ? &d->lora_cfg : NULL,
							d->opts.seed, "loading the base model", group_stops, d, &be, &base,
							&lora, &err) != DL_OK)
	{
		dolly_relative_paths(&err);
		dolly_dp_abort(d, err.msg);
	}
	else
	{
		o = d->opts;
		o.progress = rank_progress;
		o.progress_arg = d;
		o.lora = lora;
		pgstat_report_activity(STATE_RUNNING, "training");
		(void) dolly_dp_train(d, my_rank, base->model, examples_of(d), d->ntrain, d->neval, &o, &last, &err);
	}
	dl_lora_free(lora);
	pipeline_close(base);
	if (be)
		be->destroy(be);
	proc_exit(0);
}
