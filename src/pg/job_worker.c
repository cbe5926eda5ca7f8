/*
 * job_worker.c: the background worker that runs one fine-tuning job.
 *
 * It connects as the role that called dolly_finetune, so reading the records goes through
 * that role's privileges and row-level security; only its writes to dolly_job and
 * dolly_model are made in the owner scope (catalog.c). Steps: wait for the submitting
 * transaction to end and claim the job if it committed,
 * load the base model and give it Dolly's special tokens, read and tokenise the records
 * (counting those it must skip), split off the evaluation records, train
 * (finetune_run: progress into shared memory after every step), and save the model into
 * dolly.model_dir (written aside and renamed, so no half-written model ever appears), registered in the
 * model catalog as the role's in the transaction that records the job's success.
 * Cancellation and SIGTERM stop it between steps; any failure is recorded in the job's row.
 *
 * See docs/ARCHITECTURE.md, the life of a fine-tuning job.
 */
#include "postgres.h"

#include "catalog.h"
#include "errors.h"
#include "jobs.h"
#include "paths.h"
#include "settings.h"

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
#include "storage/lmgr.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/wait_event.h"

#include "lora.h"
#include "sampler.h"
#include "train.h"

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
	int			zero_stage;		/* -1: the smallest that fits */
	bool		comm_bf16;		/* gradients cross between ranks as bfloat16 */
	bool		lora;			/* method 'lora': an adapter of lora_cfg trains */
	dl_lora_config lora_cfg;
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

/* Start a transaction with a snapshot; xact_end commits it. */
static void
xact_begin(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
}

static void
xact_end(void)
{
	PopActiveSnapshot();
	CommitTransactionCommand();
}

/*
 * Record the job's end: state, error (or NULL) and its last progress; a job that
 * succeeded registers its model (at out_path) in the same transaction.
 */
static void
finish_job(const char *state, const char *error, const JobSpec *spec, const char *out_path)
{
	DollyJobSlot s;
	Oid			types[11] = {INT8OID, TEXTOID, TEXTOID, INT4OID, INT4OID, INT4OID, INT4OID, INT4OID,
		FLOAT8OID, FLOAT8OID, FLOAT8OID};
	Datum		values[11];
	char		nulls[11] = "           ";
	DollyOwnerScope scope;

	SpinLockAcquire(&dolly_jobs->mutex);
	s = *my_slot;
	SpinLockRelease(&dolly_jobs->mutex);
	values[0] = Int64GetDatum(my_job);
	values[1] = CStringGetTextDatum(state);
	values[2] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[2] = error ? ' ' : 'n';
	values[3] = Int32GetDatum(s.epoch);
	values[4] = Int32GetDatum(s.step);
	values[5] = Int32GetDatum(s.total_steps);
	values[6] = Int32GetDatum(s.records);
	values[7] = Int32GetDatum(s.skipped);
	/* a loss not measured yet is NaN, NULL in the table */
	values[8] = Float8GetDatum(s.train_loss);
	nulls[8] = isnan(s.train_loss) ? 'n' : ' ';
	values[9] = Float8GetDatum(s.eval_loss);
	nulls[9] = isnan(s.eval_loss) ? 'n' : ' ';
	values[10] = Float8GetDatum(s.tokens_per_second);
	xact_begin();
	if (out_path)
		dolly_register_output(spec->output, GetSessionUserId(), spec->base, my_job, out_path);
	dolly_owner_query(&scope, "UPDATE %s SET state = $2, error = $3, finished = pg_catalog.now(), "
					  "epoch = $4, step = $5, total_steps = $6, records = $7, skipped = $8, "
					  "train_loss = $9, eval_loss = $10, tokens_per_second = $11 "
					  "WHERE id OPERATOR(pg_catalog.=) $1", "dolly_job",
					  11, types, values, nulls, SPI_OK_UPDATE);
	dolly_owner_query_end(&scope);
	xact_end();
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

/* The job option `key` as text in TopMemoryContext; NULL when it is absent or null. */
static char *
option(Jsonb *opts, const char *key)
{
	JsonbValue	v;
	char	   *text;

	if (!getKeyJsonValueFromContainer(&opts->root, key, strlen(key), &v))
		return NULL;
	switch (v.type)
	{
		case jbvString:
			text = pnstrdup(v.val.string.val, v.val.string.len);
			break;
		case jbvNumeric:
			text = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v.val.numeric)));
			break;
		case jbvBool:
			text = v.val.boolean ? "true" : "false";
			break;
		default:
			return NULL;
	}
	return MemoryContextStrdup(TopMemoryContext, text);
}

/* The options dolly_finetune recorded (read in C: no operator runs on them). */
static void
read_options(Jsonb *opts, JobSpec *spec)
{
	char	   *v;

	spec->base = option(opts, "base_model");
	spec->instr_col = option(opts, "instruction_column");
	spec->ctx_col = option(opts, "context_column");
	spec->resp_col = option(opts, "response_column");
	spec->epochs = atoi(option(opts, "epochs"));
	spec->batch_size = atoi(option(opts, "batch_size"));
	spec->warmup_steps = atoi(option(opts, "warmup_steps"));
	spec->linear = strcmp(option(opts, "lr_schedule"), "linear") == 0;
	spec->weight_decay = strtod(option(opts, "weight_decay"), NULL);
	spec->eval_fraction = strtod(option(opts, "eval_fraction"), NULL);
	spec->learning_rate = (v = option(opts, "learning_rate")) ? strtod(v, NULL) : 0;
	spec->max_length = (v = option(opts, "max_length")) ? atoi(v) : 0;
	spec->seed = strtoll(option(opts, "seed"), NULL, 10);
	spec->checkpoint = (v = option(opts, "checkpointing")) && strcmp(v, "true") == 0;
	spec->zero_stage = (v = option(opts, "zero_stage")) ? atoi(v) : -1;
	spec->comm_bf16 = (v = option(opts, "bf16_communication")) && strcmp(v, "true") == 0;
	spec->lora = (v = option(opts, "method")) && strcmp(v, "lora") == 0;
	lora_defaults(&spec->lora_cfg);
	if (spec->lora)
	{
		char	   *save = NULL;

		spec->lora_cfg.r = atoi(option(opts, "lora_rank"));
		spec->lora_cfg.alpha = (float) strtod(option(opts, "lora_alpha"), NULL);
		spec->lora_cfg.dropout = (float) strtod(option(opts, "lora_dropout"), NULL);
		/* dolly_finetune checked them: at most DL_LORA_MAX_TARGETS names */
		for (char *t = (v = option(opts, "lora_targets")) ? strtok_r(v, ",", &save) : NULL;
			 t && spec->lora_cfg.ntargets < DL_LORA_MAX_TARGETS; t = strtok_r(NULL, ",", &save))
			strlcpy(spec->lora_cfg.targets[spec->lora_cfg.ntargets++], t, 32);
	}
}

/* Record the ZeRO stage the job runs, for dolly_jobs. */
static void
record_stage(int stage)
{
	Oid			argtypes[2] = {INT8OID, INT4OID};
	Datum		args[2] = {Int64GetDatum(my_job), Int32GetDatum(stage)};
	DollyOwnerScope scope;

	xact_begin();
	dolly_owner_query(&scope, "UPDATE %s SET zero_stage = $2 WHERE id OPERATOR(pg_catalog.=) $1",
					  "dolly_job", 2, argtypes, args, NULL, SPI_OK_UPDATE);
	dolly_owner_query_end(&scope);
	xact_end();
}

/*
 * Claim the job: wait for the transaction that submitted it to end, however long it takes
 * (a lock wait, interruptible), then, if the row it inserted is visible (it committed),
 * move it from queued to running and read its options. False when the submitting
 * transaction rolled back, or the job was cancelled before it started.
 */
static bool
claim(TransactionId submitter, JobSpec *spec)
{
	Oid			argtypes[2] = {INT8OID, BOOLOID};
	Datum		args[2];
	bool		claimed = false;
	DollyOwnerScope scope;

	StartTransactionCommand();
	XactLockTableWait(submitter, NULL, NULL, XLTW_None);
	CommitTransactionCommand();

	args[0] = Int64GetDatum(my_job);
	args[1] = BoolGetDatum(stop_requested(NULL));
	xact_begin();
	/* a job cancelled before it started ends here as cancelled */
	dolly_owner_query(&scope, "UPDATE %s SET state = CASE WHEN $2 THEN 'cancelled' ELSE 'running' END, "
					  "started = pg_catalog.now(), finished = CASE WHEN $2 THEN pg_catalog.now() END "
					  "WHERE id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.=) 'queued' "
					  "RETURNING $2, output_model, source, options", "dolly_job",
					  2, argtypes, args, NULL, SPI_OK_UPDATE_RETURNING);
	if (SPI_processed == 1)
	{
		HeapTuple	t = SPI_tuptable->vals[0];
		TupleDesc	d = SPI_tuptable->tupdesc;
		bool		isnull;

		claimed = strcmp(SPI_getvalue(t, d, 1), "t") != 0;
		spec->output = getstr(t, d, 2);
		spec->source = getstr(t, d, 3);
		read_options(DatumGetJsonbP(SPI_getbinval(t, d, 4, &isnull)), spec);
	}
	dolly_owner_query_end(&scope);
	xact_end();
	if (!claimed)
		elog(LOG, "dolly: fine-tuning job %lld was rolled back or cancelled before it started", (long long) my_job);
	return claimed;
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
/* An adapter's default learning rate (PEFT's examples use 1e-4 to 3e-4). */
#define LORA_LEARNING_RATE 2e-4

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

/*
 * Text of a record field in UTF-8 ("" for SQL NULL); NULL when it is not UTF-8 in a
 * SQL_ASCII database, which stores any bytes (the record is skipped, not the job failed).
 */
static const char *
field_utf8(HeapTuple tup, TupleDesc desc, int col)
{
	char	   *v = SPI_getvalue(tup, desc, col);

	if (v == NULL)
		return "";
	if (GetDatabaseEncoding() == PG_SQL_ASCII)
		return pg_verify_mbstr(PG_UTF8, v, strlen(v), true) ? v : NULL;
	return pg_server_to_any(v, strlen(v), PG_UTF8);
}

/*
 * Read the records as the calling role (privileges and row-level security apply) and
 * turn them into examples; unusable records (empty, too long, not UTF-8) are counted in
 * *skipped.
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
	xact_begin();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
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
			const char *instr = field_utf8(t, d, 1);
			const char *ctx = field_utf8(t, d, 2);
			const char *resp = field_utf8(t, d, 3);
			dl_error	err;

			if (*n == cap)
			{
				dl_example *grown = realloc(ex, 2 * cap * sizeof(dl_example));

				if (grown == NULL)
					ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
				ex = grown;
				cap *= 2;
			}
			if (instr && ctx && resp &&
				example_from_record(tok, instr, ctx, resp, max_length, &ex[*n], &err) == DL_OK)
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
	SPI_finish();
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
	dl_pipeline *base = NULL;	/* the base model, Dolly's tokens added */
	dl_lora    *lora = NULL;	/* method 'lora': the adapter that trains */
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
	DollyModelIdent base_ident = {0, 0};
	DollyModelIdent base_have;

	set_phase("loading the base model");
	/* the role may still use the base, and it is still the directory the catalog knows */
	if (spec->base)
	{
		xact_begin();
		dolly_check_model_use(spec->base, &base_ident);
		xact_end();
	}
	if (dolly_model_path(spec->base ? spec->base : "", base_path, &is_default, &err) != DL_OK ||
		(spec->base && dolly_model_ident_check(spec->base, base_path, &base_ident, &base_have, &err) != DL_OK))
		goto fail;
	snprintf(out_path, sizeof(out_path), "%s/%s", dolly_model_dir, spec->output);
	snprintf(cfg_path, sizeof(cfg_path), "%s/config.json", base_path);
	if (dolly_job_load_base(base_path, 0, nranks, spec->lora ? &spec->lora_cfg : NULL, (uint64) spec->seed,
							psprintf("dolly fine-tuning job %lld: loading the base model", (long long) my_job),
							stop_requested, NULL, &be, &base, &lora, &err) != DL_OK)
		goto fail;
	params = dl_model_param_count(base->model);
	if (lora)
		elog(LOG, "dolly: fine-tuning job %lld: a LoRA adapter of rank %d over %d modules a layer, %lld parameters trained (the base's %lld frozen)",
			 (long long) my_job, lora->r, lora->ntargets, (long long) dl_lora_param_count(lora),
			 (long long) params);

	set_phase("reading records");
	max_length = spec->max_length > 0 ? spec->max_length : base->model->cfg.max_pos;
	ex = read_records(spec, base->tok, max_length, &n, &skipped);
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
	/* an adapter's few parameters take PEFT's usual rate whatever the model's size */
	o.cfg.lr = spec->learning_rate > 0 ? spec->learning_rate
		: lora ? LORA_LEARNING_RATE : default_learning_rate(params);
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
	o.lora = lora;
	o.zero_stage = dolly_dp_choose_stage(base->model, lora, be, nranks, spec->zero_stage, my_job);
	o.comm_bf16 = spec->comm_bf16;
	record_stage(o.zero_stage);
	set_phase("training");
	if (nranks > 1)
		st = dolly_dp_train(dolly_dp_start(nranks, ex, n - neval, neval, base_path, &o,
										   spec->lora ? &spec->lora_cfg : NULL,
										   lora ? lora->bytes : base->model->param_bytes, my_job),
							0, base->model, ex, n - neval, neval, &o, &last, &err);
	else
		st = finetune_run(base->model, ex + neval, n - neval, ex, neval, &o, &last, &err);
	for (int i = 0; i < n; i++)
		example_free(&ex[i]);
	free(ex);
	if (st != DL_OK)
		goto fail;

	set_phase("saving");
	if (lora ? dl_lora_save(lora, spec->base ? spec->base : dolly_model, base->tok, out_path, &err) != DL_OK
		: model_save(base->model, base->tok, cfg_path, out_path, &err) != DL_OK)
		goto fail;
	finish_job("succeeded", NULL, spec, out_path);
	goto done;

fail:
	if (err.code == DL_ECANCELLED)
	{
		CHECK_FOR_INTERRUPTS();		/* SIGTERM: FATAL here; the view shows the job failed */
		finish_job("cancelled", NULL, spec, NULL);
	}
	else
	{
		dolly_relative_paths(&err);
		finish_job("failed", err.msg, spec, NULL);
	}
done:
	dl_lora_free(lora);
	pipeline_close(base);
	if (be)
		be->destroy(be);
}

void
dolly_job_main(Datum main_arg)
{
	Oid			ids[2];
	TransactionId submitter;
	JobSpec		spec;

	my_job = DatumGetInt64(main_arg);
	memcpy(ids, MyBgworkerEntry->bgw_extra, sizeof(ids));
	memcpy(&submitter, MyBgworkerEntry->bgw_extra + sizeof(ids), sizeof(submitter));
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* the slot is freed however the worker exits, even when it cannot connect */
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
	BackgroundWorkerInitializeConnectionByOid(ids[0], ids[1], 0);
	pgstat_report_appname(MyBgworkerEntry->bgw_name);

	memset(&spec, 0, sizeof(spec));
	spec.id = my_job;
	if (!claim(submitter, &spec))
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
		finish_job("failed", edata->message, &spec, NULL);
	}
	PG_END_TRY();
	proc_exit(0);
}
