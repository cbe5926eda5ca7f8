/*
 * job_worker.c: the background worker that runs one fine-tuning job.
 *
 * It connects as the role that called dolly_finetune, so reading the records goes through
 * that role's privileges and row-level security; only its writes to dolly_job are made as
 * the table's owner. Steps: claim the job (once the submitting transaction has committed),
 * load the base model and give it Dolly's special tokens, read and tokenise the records
 * (counting those it must skip), split off the evaluation records, train
 * (finetune_run: progress into shared memory after every step), and save the model into
 * dolly.model_dir (written aside and renamed, so no half-written model ever appears).
 * Cancellation and SIGTERM stop it between steps; any failure is recorded in the job's row.
 */
#include "dolly_pg.h"
#include "jobs.h"

#include <math.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "mb/pg_wchar.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/wait_event.h"

#include "sampler.h"
#include "train.h"

/* How long to wait for the submitting transaction to commit the job's row. */
#define CLAIM_WAIT_MS 60000

/* What dolly_finetune recorded in the job's options. */
typedef struct JobSpec
{
	int64		id;
	char	   *output;
	char	   *base;			/* NULL: dolly.model */
	char	   *source;			/* the table, quoted */
	char	   *instr_col;
	char	   *ctx_col;		/* NULL: none */
	char	   *resp_col;
	int			epochs;
	int			batch_size;
	int			warmup_steps;
	bool		linear;
	double		weight_decay;
	double		eval_fraction;
	double		learning_rate;	/* 0: by model size */
	int			max_length;		/* 0: the model's */
	int64		seed;
	bool		checkpoint;		/* activation checkpointing */
} JobSpec;

static DollyJobSlot *my_slot;
static int64 my_job;

/* Free the job's slot when the worker exits, however it exits. */
static void
release_at_exit(int code, Datum arg)
{
	SpinLockAcquire(&dolly_jobs->mutex);
	if (my_slot && my_slot->job_id == my_job)
		my_slot->job_id = 0;
	SpinLockRelease(&dolly_jobs->mutex);
}

/* Publish the phase of the job. */
static void
set_phase(const char *phase)
{
	SpinLockAcquire(&dolly_jobs->mutex);
	strlcpy(my_slot->phase, phase, sizeof(my_slot->phase));
	SpinLockRelease(&dolly_jobs->mutex);
	pgstat_report_activity(STATE_RUNNING, psprintf("dolly fine-tuning job %lld: %s", (long long) my_job, phase));
}

/* The identity xact_begin switched from, when it switched. */
static Oid	xact_saved_user = InvalidOid;
static int	xact_saved_sec;

/*
 * Start a transaction with a snapshot and SPI, as the table's owner (to write dolly_job)
 * or as the calling role (to read the records); xact_end commits it.
 */
static void
xact_begin(bool as_owner)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	xact_saved_user = InvalidOid;
	if (as_owner)
		dolly_as_owner_begin(&xact_saved_user, &xact_saved_sec);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

/* Finish what xact_begin started. */
static void
xact_end(void)
{
	SPI_finish();
	if (OidIsValid(xact_saved_user))
		dolly_as_owner_end(xact_saved_user, xact_saved_sec);
	PopActiveSnapshot();
	CommitTransactionCommand();
}

/* Run an UPDATE of the job's row as the table's owner, in its own transaction; $1 is the
 * job id, $2.. are values (nulls[i] == 'n' for NULL, as SPI spells it). */
static void
update_job(const char *set_clause, int nargs, Oid *types, Datum *values, const char *nulls)
{
	Oid			argtypes[16] = {INT8OID};
	Datum		args[16] = {Int64GetDatum(my_job)};
	char		argnulls[16] = {' '};

	for (int i = 0; i < nargs; i++)
	{
		argtypes[i + 1] = types[i];
		args[i + 1] = values[i];
		argnulls[i + 1] = nulls[i];
	}
	xact_begin(true);
	if (SPI_execute_with_args(psprintf("UPDATE %s SET %s WHERE id = $1", dolly_jobs_table(), set_clause),
							  nargs + 1, argtypes, args, argnulls, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cannot update fine-tuning job %lld", (long long) my_job);
	xact_end();
}

/* Record the job's end: state, error (or NULL) and its last progress. */
static void
finish_job(const char *state, const char *error)
{
	DollyJobSlot s;
	Oid			types[10] = {TEXTOID, TEXTOID, INT4OID, INT4OID, INT4OID, INT4OID, INT4OID,
		FLOAT8OID, FLOAT8OID, FLOAT8OID};
	Datum		values[10];
	char		nulls[10] = "          ";

	SpinLockAcquire(&dolly_jobs->mutex);
	s = *my_slot;
	SpinLockRelease(&dolly_jobs->mutex);
	values[0] = CStringGetTextDatum(state);
	values[1] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[1] = error ? ' ' : 'n';
	values[2] = Int32GetDatum(s.epoch);
	values[3] = Int32GetDatum(s.step);
	values[4] = Int32GetDatum(s.total_steps);
	values[5] = Int32GetDatum(s.records);
	values[6] = Int32GetDatum(s.skipped);
	/* a loss not measured yet is NaN, NULL in the table */
	values[7] = Float8GetDatum(s.train_loss);
	nulls[7] = isnan(s.train_loss) ? 'n' : ' ';
	values[8] = Float8GetDatum(s.eval_loss);
	nulls[8] = isnan(s.eval_loss) ? 'n' : ' ';
	values[9] = Float8GetDatum(s.tokens_per_second);
	update_job("state = $2, error = $3, finished = now(), epoch = $4, step = $5, "
			   "total_steps = $6, records = $7, skipped = $8, train_loss = $9, "
			   "eval_loss = $10, tokens_per_second = $11", 10, types, values, nulls);
	elog(LOG, "dolly: fine-tuning job %lld %s%s%s", (long long) my_job, state,
		 error ? ": " : "", error ? error : "");
}

/* Is the job asked to stop (dolly_cancel_job, or SIGTERM)? */
static bool
stop_requested(void *unused)
{
	bool		cancel;

	SpinLockAcquire(&dolly_jobs->mutex);
	cancel = my_slot->cancel;
	SpinLockRelease(&dolly_jobs->mutex);
	return cancel || InterruptPending;
}

/* Read a text result column (NULL for SQL NULL) into TopMemoryContext. */
static char *
getstr(HeapTuple tup, TupleDesc desc, int col)
{
	char	   *v = SPI_getvalue(tup, desc, col);

	return v ? MemoryContextStrdup(TopMemoryContext, v) : NULL;
}

/*
 * Claim the job: once the row that dolly_finetune inserted is visible (its transaction
 * committed), move it from queued to running and read its options. False when the job
 * never became visible (the submitting transaction rolled back) or was cancelled.
 */
static bool
claim(JobSpec *spec)
{
	for (int waited = 0; waited < CLAIM_WAIT_MS; waited += 100)
	{
		Oid			argtypes[2] = {INT8OID, BOOLOID};
		Datum		args[2] = {Int64GetDatum(my_job), BoolGetDatum(stop_requested(NULL))};
		bool		claimed = false;
		bool		gone = false;

		CHECK_FOR_INTERRUPTS();
		xact_begin(true);
		/* a job cancelled before it started ends here as cancelled */
		if (SPI_execute_with_args(psprintf(
						"UPDATE %s SET state = CASE WHEN $2 THEN 'cancelled' ELSE 'running' END, "
						"started = now(), finished = CASE WHEN $2 THEN now() END "
						"WHERE id = $1 AND state = 'queued' RETURNING $2, output_model, source, "
						"options->>'base_model', options->>'instruction_column', "
						"options->>'context_column', options->>'response_column', "
						"options->>'epochs', options->>'batch_size', options->>'warmup_steps', "
						"options->>'lr_schedule', options->>'weight_decay', "
						"options->>'eval_fraction', options->>'learning_rate', "
						"options->>'max_length', options->>'seed', options->>'checkpointing'",
						dolly_jobs_table()),
								  2, argtypes, args, NULL, false, 1) != SPI_OK_UPDATE_RETURNING)
			elog(ERROR, "cannot claim fine-tuning job %lld", (long long) my_job);
		if (SPI_processed == 1)
		{
			HeapTuple	t = SPI_tuptable->vals[0];
			TupleDesc	d = SPI_tuptable->tupdesc;
			char	   *v;

			gone = strcmp(SPI_getvalue(t, d, 1), "t") == 0;
			spec->output = getstr(t, d, 2);
			spec->source = getstr(t, d, 3);
			spec->base = getstr(t, d, 4);
			spec->instr_col = getstr(t, d, 5);
			spec->ctx_col = getstr(t, d, 6);
			spec->resp_col = getstr(t, d, 7);
			spec->epochs = atoi(SPI_getvalue(t, d, 8));
			spec->batch_size = atoi(SPI_getvalue(t, d, 9));
			spec->warmup_steps = atoi(SPI_getvalue(t, d, 10));
			spec->linear = strcmp(SPI_getvalue(t, d, 11), "linear") == 0;
			spec->weight_decay = strtod(SPI_getvalue(t, d, 12), NULL);
			spec->eval_fraction = strtod(SPI_getvalue(t, d, 13), NULL);
			spec->learning_rate = (v = SPI_getvalue(t, d, 14)) ? strtod(v, NULL) : 0;
			spec->max_length = (v = SPI_getvalue(t, d, 15)) ? atoi(v) : 0;
			spec->seed = strtoll(SPI_getvalue(t, d, 16), NULL, 10);
			spec->checkpoint = (v = SPI_getvalue(t, d, 17)) && strcmp(v, "true") == 0;
			claimed = !gone;
		}
		else if (SPI_execute_with_args(psprintf("SELECT 1 FROM %s WHERE id = $1", dolly_jobs_table()),
									   1, argtypes, args, NULL, true, 1) == SPI_OK_SELECT &&
				 SPI_processed == 1)
			gone = true;		/* visible but no longer queued: someone else decided */
		xact_end();
		if (claimed || gone)
			return claimed;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 100L,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	elog(LOG, "dolly: fine-tuning job %lld was never committed; nothing to do", (long long) my_job);
	return false;
}

/* The progress callback: publish, and say whether to stop. */
static int
on_progress(void *arg, const dl_train_progress *p)
{
	SpinLockAcquire(&dolly_jobs->mutex);
	strlcpy(my_slot->phase, p->phase, sizeof(my_slot->phase));
	my_slot->epoch = p->epoch;
	my_slot->step = p->step;
	my_slot->total_steps = p->total_steps;
	my_slot->train_loss = p->train_loss;
	my_slot->eval_loss = p->eval_loss;
	my_slot->tokens_per_second = p->tokens_per_second;
	SpinLockRelease(&dolly_jobs->mutex);
	return stop_requested(NULL);
}

/* Dolly v2's learning rate is for billions of parameters; small models need larger ones. */
static double
default_learning_rate(int64 params)
{
	if (params >= 1000000000)
		return 5e-6;
	if (params >= 100000000)
		return 2e-5;
	if (params >= 10000000)
		return 1e-4;
	return 1e-3;
}

/* Text of a record field in UTF-8 ("" for NULL). */
static const char *
field_utf8(HeapTuple tup, TupleDesc desc, int col)
{
	char	   *v = SPI_getvalue(tup, desc, col);

	return v ? pg_server_to_any(v, strlen(v), PG_UTF8) : "";
}

/*
 * Read the records as the calling role (privileges and row-level security apply) and
 * turn them into examples; unusable records are counted in *skipped.
 */
static dl_example *
read_records(const JobSpec *spec, const dl_tokenizer *tok, int max_length, int *n, int *skipped)
{
	Portal		cursor;
	int			cap = 1024;
	dl_example *ex = malloc(cap * sizeof(dl_example));
	char	   *query;

	*n = 0;
	*skipped = 0;
	if (ex == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	query = psprintf("SELECT %s::text, %s::text, %s::text FROM %s",
					 quote_identifier(spec->instr_col),
					 spec->ctx_col ? quote_identifier(spec->ctx_col) : "NULL",
					 quote_identifier(spec->resp_col), spec->source);
	xact_begin(false);
	cursor = SPI_cursor_open_with_args(NULL, query, 0, NULL, NULL, NULL, true, 0);
	for (;;)
	{
		SPI_cursor_fetch(cursor, true, 1000);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			HeapTuple	t = SPI_tuptable->vals[i];
			TupleDesc	d = SPI_tuptable->tupdesc;
			dl_error	err;

			if (*n == cap)
			{
				dl_example *grown = realloc(ex, 2 * cap * sizeof(dl_example));

				if (grown == NULL)
					ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
				ex = grown;
				cap *= 2;
			}
			if (example_from_record(tok, field_utf8(t, d, 1), field_utf8(t, d, 2),
									field_utf8(t, d, 3), max_length, &ex[*n], &err) == DL_OK)
				(*n)++;
			else
				(*skipped)++;
		}
		SPI_freetuptable(SPI_tuptable);
		SpinLockAcquire(&dolly_jobs->mutex);
		my_slot->records = *n;
		my_slot->skipped = *skipped;
		SpinLockRelease(&dolly_jobs->mutex);
		CHECK_FOR_INTERRUPTS();
	}
	SPI_cursor_close(cursor);
	xact_end();
	return ex;
}

/* Run the claimed job to its end; engine failures end it as failed, with their message. */
static void
run_job(const JobSpec *spec)
{
	char		base_path[MAXPGPATH];
	char		out_path[MAXPGPATH];
	char		cfg_path[MAXPGPATH + 32];
	bool		is_default;
	dl_error	err;
	dl_backend *be = NULL;
	dl_model   *m = NULL;
	dl_tokenizer *tok = NULL;
	dl_example *ex;
	int			n,
				skipped,
				neval,
				max_length;
	int64		params;
	dl_finetune_opts o;
	dl_train_progress last;
	dl_status	st;
	int			nranks = dolly_train_workers;	/* read once: a reload must not change it midway */

	set_phase("loading the base model");
	if (dolly_model_path(spec->base ? spec->base : "", base_path, &is_default, &err) != DL_OK)
		goto fail;
	snprintf(out_path, sizeof(out_path), "%s/%s", dolly_model_dir, spec->output);
	snprintf(cfg_path, sizeof(cfg_path), "%s/config.json", base_path);
	if (dolly_job_load_base(base_path, 0, nranks,
							psprintf("dolly fine-tuning job %lld: loading the base model", (long long) my_job),
							stop_requested, NULL, &be, &tok, &m, &err) != DL_OK)
		goto fail;
	params = dl_model_param_count(m);

	set_phase("reading records");
	max_length = spec->max_length > 0 ? spec->max_length : m->cfg.max_pos;
	ex = read_records(spec, tok, max_length, &n, &skipped);
	if (n < 1)
	{
		dl_fail(&err, DL_EINVAL, "no usable records in %s: %d skipped (NULL or empty instruction or response, or %d tokens or more)",
				spec->source, skipped, max_length);
		goto fail;
	}
	elog(LOG, "dolly: fine-tuning job %lld: %d records, %d skipped", (long long) my_job, n, skipped);
	neval = examples_split(ex, n, spec->eval_fraction, (uint64) spec->seed);

	memset(&o, 0, sizeof(o));
	train_defaults(&o.cfg);
	o.cfg.lr = spec->learning_rate > 0 ? spec->learning_rate : default_learning_rate(params);
	o.cfg.warmup_steps = spec->warmup_steps;
	o.cfg.weight_decay = spec->weight_decay;
	o.cfg.max_length = max_length;
	o.cfg.linear_decay = spec->linear;
	o.cfg.checkpoint = spec->checkpoint;
	o.epochs = spec->epochs;
	o.batch_size = spec->batch_size;
	o.rank = 0;
	o.nranks = 1;
	o.seed = (uint64) spec->seed;
	o.progress = on_progress;
	set_phase("training");
	if (nranks > 1)
		st = dolly_dp_train(dolly_dp_start(nranks, ex, n - neval, neval, base_path, &o, my_job),
							0, m, ex, n - neval, neval, &o, &last, &err);
	else
		st = finetune_run(m, ex + neval, n - neval, ex, neval, &o, &last, &err);
	for (int i = 0; i < n; i++)
		example_free(&ex[i]);
	free(ex);
	if (st != DL_OK)
		goto fail;

	set_phase("saving");
	if (model_save(m, tok, cfg_path, out_path, &err) != DL_OK)
		goto fail;
	finish_job("succeeded", NULL);
	goto done;

fail:
	if (err.code == DL_ECANCELLED)
	{
		CHECK_FOR_INTERRUPTS();		/* SIGTERM: FATAL here; the view shows the job failed */
		finish_job("cancelled", NULL);
	}
	else
	{
		dolly_relative_paths(&err);
		finish_job("failed", err.msg);
	}
done:
	dl_model_free(m);
	tok_free(tok);
	if (be)
		be->destroy(be);
}

void
dolly_job_main(Datum main_arg)
{
	Oid			ids[2];
	JobSpec		spec;

	my_job = DatumGetInt64(main_arg);
	memcpy(ids, MyBgworkerEntry->bgw_extra, sizeof(ids));
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(ids[0], ids[1], 0);

	SpinLockAcquire(&dolly_jobs->mutex);
	for (int i = 0; i < DOLLY_MAX_JOBS; i++)
		if (dolly_jobs->slots[i].job_id == my_job)
		{
			my_slot = &dolly_jobs->slots[i];
			my_slot->pid = MyProcPid;
		}
	SpinLockRelease(&dolly_jobs->mutex);
	if (my_slot == NULL)
		proc_exit(0);			/* the submitting session freed it: nothing to run */
	on_shmem_exit(release_at_exit, (Datum) 0);
	pgstat_report_appname(MyBgworkerEntry->bgw_name);

	memset(&spec, 0, sizeof(spec));
	spec.id = my_job;
	if (!claim(&spec))
		proc_exit(0);

	PG_TRY();
	{
		run_job(&spec);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		/* an ERROR (a privilege, a dropped column...): record it, then leave */
		MemoryContextSwitchTo(TopMemoryContext);
		edata = CopyErrorData();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		finish_job("failed", edata->message);
	}
	PG_END_TRY();
	proc_exit(0);
}
