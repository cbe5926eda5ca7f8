/*
 * jobs.c: dolly_finetune, dolly_cancel_job and the live progress of fine-tuning jobs.
 *
 * dolly_finetune checks everything it can in the caller's session (privileges, the table
 * and its columns, the options, the names), records the job in dolly_job, and starts a
 * background worker that runs it as the calling role (job_worker.c). The job id comes
 * back at once. Writes to dolly_job are made in the owner scope (catalog.c): users read
 * jobs through the dolly_jobs view and cannot forge them, nor run their own operators with
 * the owner's rights.
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
#include <sys/stat.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"

#include "lora.h"

DollyJobs  *dolly_jobs = NULL;

PG_FUNCTION_INFO_V1(dolly_finetune);
PG_FUNCTION_INFO_V1(dolly_cancel_job);
PG_FUNCTION_INFO_V1(dolly_job_progress);

Size
dolly_jobs_shmem_size(void)
{
	return MAXALIGN(sizeof(DollyJobs));
}

void
dolly_jobs_shmem_init(void)
{
	bool		found;

	dolly_jobs = ShmemInitStruct("dolly jobs", sizeof(DollyJobs), &found);
	if (!found)
	{
		memset(dolly_jobs, 0, sizeof(DollyJobs));
		SpinLockInit(&dolly_jobs->mutex);
	}
}

/*
 * ERROR unless column `name` of relid exists, is readable by the caller and holds text.
 * Returns false (without error) only for an optional column that is absent.
 */
static bool
check_column(Oid relid, const char *what, const char *name, bool optional)
{
	AttrNumber	attnum = get_attnum(relid, name);
	Oid			type;

	if (attnum == InvalidAttrNumber)
	{
		if (optional)
			return false;
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" of relation \"%s\" does not exist", name, get_rel_name(relid)),
				 errhint("Name the %s column with %s_column => 'name'.", what, what)));
	}
	type = get_atttype(relid, attnum);
	if (type != TEXTOID && type != VARCHAROID && type != BPCHAROID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("%s column \"%s\" has type %s, not text", what, name, format_type_be(type)),
				 errhint("Cast it in a view, e.g. CREATE VIEW v AS SELECT %s::text ... .", name)));
	/* a column is readable through the table's privilege or its own */
	if (pg_class_aclcheck(relid, GetUserId(), ACL_SELECT) != ACLCHECK_OK &&
		pg_attribute_aclcheck(relid, attnum, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for column \"%s\" of relation \"%s\"", name, get_rel_name(relid))));
	return true;
}

/* ERROR unless lo <= v <= hi, naming the parameter. */
static void
check_range(const char *param, double v, double lo, double hi)
{
	if (!(v >= lo && v <= hi))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be between %g and %g", param, lo, hi)));
}

void
dolly_job_worker_init(BackgroundWorker *w, int64 job_id, const char *function)
{
	Oid			ids[2] = {MyDatabaseId, GetUserId()};

	memset(w, 0, sizeof(*w));
	w->bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	w->bgw_start_time = BgWorkerStart_RecoveryFinished;
	w->bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(w->bgw_library_name, BGW_MAXLEN, "dolly");
	snprintf(w->bgw_function_name, BGW_MAXLEN, "%s", function);
	snprintf(w->bgw_name, BGW_MAXLEN, "dolly fine-tuning job %lld", (long long) job_id);
	snprintf(w->bgw_type, BGW_MAXLEN, "dolly fine-tuning job");
	w->bgw_main_arg = Int64GetDatum(job_id);
	memcpy(w->bgw_extra, ids, sizeof(ids));
}

/*
 * Start the worker of job_id in this database as the current role. It waits for this
 * transaction (its top-level xid follows the two OIDs in bgw_extra) to end, however long
 * that takes, and runs the job if the transaction committed it.
 */
static void
start_worker(int64 job_id)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	TransactionId xid = GetTopTransactionId();

	dolly_job_worker_init(&worker, job_id, "dolly_job_main");
	memcpy(worker.bgw_extra + 2 * sizeof(Oid), &xid, sizeof(xid));
	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("cannot start a worker for the fine-tuning job"),
				 errhint("Raise max_worker_processes.")));
}

/* Claim a shared-memory slot for job_id; ERROR when all are taken. */
static void
claim_slot(int64 job_id)
{
	int			i;

	SpinLockAcquire(&dolly_jobs->mutex);
	for (i = 0; i < DOLLY_MAX_JOBS; i++)
		if (dolly_jobs->slots[i].job_id == 0)
		{
			memset(&dolly_jobs->slots[i], 0, sizeof(DollyJobSlot));
			dolly_jobs->slots[i].job_id = job_id;
			dolly_jobs->slots[i].dboid = MyDatabaseId;
			dolly_jobs->slots[i].role = GetUserId();
			strlcpy(dolly_jobs->slots[i].phase, "starting", sizeof(dolly_jobs->slots[i].phase));
			break;
		}
	SpinLockRelease(&dolly_jobs->mutex);
	if (i == DOLLY_MAX_JOBS)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("%d fine-tuning jobs are already running", DOLLY_MAX_JOBS),
				 errhint("Wait for one to finish, or cancel one with dolly_cancel_job().")));
}

/* Free job_id's slot (if it has one). */
static void
release_slot(int64 job_id)
{
	SpinLockAcquire(&dolly_jobs->mutex);
	for (int i = 0; i < DOLLY_MAX_JOBS; i++)
		if (dolly_jobs->slots[i].job_id == job_id)
			dolly_jobs->slots[i].job_id = 0;
	SpinLockRelease(&dolly_jobs->mutex);
}

/*
 * ERROR unless a background worker can connect as the current role to this database, as
 * the job's worker will: a NOLOGIN role (dolly_trainer itself after SET ROLE), a database
 * that no longer allows connections, a role at its connection limit, or one without
 * CONNECT would leave a worker that dies at once.
 */
static void
check_can_connect(void)
{
	Oid			role = GetUserId();
	HeapTuple	tup = SearchSysCache1(AUTHOID, ObjectIdGetDatum(role));
	Form_pg_authid form;
	bool		login;
	bool		allow_conn;
	int			limit;

	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for role %u", role);
	form = (Form_pg_authid) GETSTRUCT(tup);
	login = form->rolcanlogin;
	limit = form->rolconnlimit;
	ReleaseSysCache(tup);
	if (!login)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("role \"%s\" cannot log in, so a fine-tuning job cannot run as it",
						GetUserNameFromId(role, false)),
				 errhint("A job's worker connects as the role that calls dolly_finetune: call it as a role with LOGIN (RESET ROLE first).")));
	tup = SearchSysCache1(DATABASEOID, ObjectIdGetDatum(MyDatabaseId));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for database %u", MyDatabaseId);
	allow_conn = ((Form_pg_database) GETSTRUCT(tup))->datallowconn;
	ReleaseSysCache(tup);
	if (!allow_conn)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("database \"%s\" does not allow connections, so a fine-tuning job cannot run in it",
						get_database_name(MyDatabaseId)),
				 errhint("ALTER DATABASE ... ALLOW_CONNECTIONS true.")));
	if (superuser())
		return;
	if (limit >= 0 && CountUserBackends(role) >= limit)
		ereport(ERROR,
				(errcode(ERRCODE_TOO_MANY_CONNECTIONS),
				 errmsg("role \"%s\" is at its connection limit (%d), so a fine-tuning job cannot run as it",
						GetUserNameFromId(role, false), limit),
				 errhint("A job's worker is one more connection of the role: close a session, or raise the role's CONNECTION LIMIT.")));
	if (pg_database_aclcheck(MyDatabaseId, role, ACL_CONNECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("role \"%s\" may not connect to this database, so a fine-tuning job cannot run in it",
						GetUserNameFromId(role, false)),
				 errhint("GRANT CONNECT ON DATABASE to the role.")));
}

/*
 * lora_targets: module names, comma-separated into buf for the job's options; at most
 * DL_LORA_MAX_TARGETS, each a plain name (the job checks them against the architecture).
 */
static void
lora_targets(ArrayType *arr, StringInfo buf)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	if (ARR_NDIM(arr) > 1 || n < 1 || n > DL_LORA_MAX_TARGETS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("lora_targets must list 1 to %d module names", DL_LORA_MAX_TARGETS),
				 errhint("GPT-J's are q_proj, k_proj, v_proj, out_proj, fc_in, fc_out; GPT-NeoX's query_key_value, dense, dense_h_to_4h, dense_4h_to_h.")));
	for (int i = 0; i < n; i++)
	{
		char	   *name = nulls[i] ? NULL : TextDatumGetCString(elems[i]);

		if (name == NULL || name[0] == '\0' || strlen(name) >= 32 || strspn(name, "abcdefghijklmnopqrstuvwxyz0123456789_") != strlen(name))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("lora_targets: \"%s\" is not a module name", name ? name : "NULL"),
					 errhint("A module name is lower-case letters, digits and underscores, such as q_proj.")));
		appendStringInfo(buf, "%s%s", i ? "," : "", name);
	}
}

/* dolly_finetune's parameters, in order, for messages. */
static const char *const finetune_params[] = {
	"source", "output_model", "base_model", "instruction_column", "context_column",
	"response_column", "epochs", "learning_rate", "batch_size", "max_length", "warmup_steps",
	"lr_schedule", "weight_decay", "eval_fraction", "seed", "checkpointing", "zero_stage",
	"bf16_communication", "method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"
};

/*
 * dolly_finetune(source, output_model, base_model, instruction_column, context_column,
 * response_column, epochs, learning_rate, batch_size, max_length, warmup_steps,
 * lr_schedule, weight_decay, eval_fraction, seed, checkpointing, zero_stage,
 * bf16_communication, method, lora_rank, lora_alpha, lora_dropout, lora_targets): the new
 * job's id. Called through an older version's definition (before ALTER EXTENSION UPDATE),
 * the arguments it lacks are absent: their defaults.
 */
Datum
dolly_finetune(PG_FUNCTION_ARGS)
{
	Oid			relid;
	char	   *output;
	char	   *base = NULL;
	const char *instr_col,
			   *ctx_col = NULL,
			   *resp_col;
	int			epochs,
				batch_size,
				warmup_steps;
	int			max_length = 0;
	double		lr = 0,
				weight_decay,
				eval_fraction;
	char	   *schedule;
	int64		seed;
	bool		checkpointing;
	int			zero_stage = -1;	/* -1: the job picks */
	bool		comm_bf16 = false;
	bool		lora = false;
	int			lora_rank = 8;
	double		lora_alpha = 16,
				lora_dropout = 0.05;
	StringInfoData targets;
	char		base_path[MAXPGPATH];
	bool		is_default;
	dl_error	err;
	StringInfoData opts;
	DollyOwnerScope scope;
	DollyModelIdent ident;
	int64		job_id;
	Oid			argtypes[4] = {OIDOID, TEXTOID, TEXTOID, JSONBOID};
	Datum		args[4];
	bool		isnull;

	for (int i = 0; i < PG_NARGS(); i++)
		if (PG_ARGISNULL(i) && i != 2 && i != 4 && i != 7 && i != 9 && i != 16 && i != 22)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not be NULL", finetune_params[i]),
					 errhint("Only base_model, context_column, learning_rate, max_length, zero_stage and lora_targets may be NULL.")));
	relid = PG_GETARG_OID(0);
	output = text_to_cstring(PG_GETARG_TEXT_PP(1));
	dolly_check_model_name(output);
	if (!PG_ARGISNULL(2))
	{
		base = text_to_cstring(PG_GETARG_TEXT_PP(2));
		dolly_check_model_name(base);
	}
	instr_col = NameStr(*PG_GETARG_NAME(3));
	if (!PG_ARGISNULL(4))
		ctx_col = NameStr(*PG_GETARG_NAME(4));
	resp_col = NameStr(*PG_GETARG_NAME(5));
	epochs = PG_GETARG_INT32(6);
	if (!PG_ARGISNULL(7))
		lr = PG_GETARG_FLOAT8(7);
	batch_size = PG_GETARG_INT32(8);
	if (!PG_ARGISNULL(9))
		max_length = PG_GETARG_INT32(9);
	warmup_steps = PG_GETARG_INT32(10);
	schedule = text_to_cstring(PG_GETARG_TEXT_PP(11));
	weight_decay = PG_GETARG_FLOAT8(12);
	eval_fraction = PG_GETARG_FLOAT8(13);
	seed = PG_GETARG_INT64(14);
	checkpointing = PG_GETARG_BOOL(15);
	if (PG_NARGS() > 16 && !PG_ARGISNULL(16))
	{
		zero_stage = PG_GETARG_INT32(16);
		check_range("zero_stage", zero_stage, 0, 2);
	}
	if (PG_NARGS() > 17)
		comm_bf16 = PG_GETARG_BOOL(17);
	initStringInfo(&targets);
	if (PG_NARGS() > 22)
	{
		char	   *method = text_to_cstring(PG_GETARG_TEXT_PP(18));

		if (strcmp(method, "full") != 0 && strcmp(method, "lora") != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("method must be \"full\" or \"lora\", not \"%s\"", method),
					 errhint("\"lora\" trains a low-rank adapter of the base model and leaves the base as it is.")));
		lora = strcmp(method, "lora") == 0;
		lora_rank = PG_GETARG_INT32(19);
		lora_alpha = PG_GETARG_FLOAT8(20);
		lora_dropout = PG_GETARG_FLOAT8(21);
		check_range("lora_rank", lora_rank, 1, DL_LORA_MAX_RANK);
		check_range("lora_alpha", lora_alpha, 1e-6, 1e6);
		check_range("lora_dropout", lora_dropout, 0, 0.99);
		if (!PG_ARGISNULL(22))
			lora_targets(PG_GETARG_ARRAYTYPE_P(22), &targets);
	}

	check_range("epochs", epochs, 1, 10000);
	if (!PG_ARGISNULL(7))
		check_range("learning_rate", lr, 1e-12, 1);
	check_range("batch_size", batch_size, 1, 4096);
	if (!PG_ARGISNULL(9))
		check_range("max_length", max_length, 2, 1 << 20);
	check_range("warmup_steps", warmup_steps, 0, 100000000);
	check_range("weight_decay", weight_decay, 0, 1);
	check_range("eval_fraction", eval_fraction, 0, 0.5);
	if (strcmp(schedule, "constant") != 0 && strcmp(schedule, "linear") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("lr_schedule must be \"constant\" or \"linear\", not \"%s\"", schedule)));

	/* the table and its columns, with the caller's privileges */
	check_column(relid, "instruction", instr_col, false);
	check_column(relid, "response", resp_col, false);
	/* the default context column is optional: tables without one have no contexts */
	if (ctx_col && !check_column(relid, "context", ctx_col, strcmp(ctx_col, "context") == 0))
		ctx_col = NULL;

	check_can_connect();

	dolly_check_new_model(output);
	/* the base: a model the caller may use, or the served model */
	if (base)
		dolly_check_model_use(base, &ident);
	if (dolly_model_path(base ? base : "", base_path, &is_default, &err) != DL_OK)
		dolly_report(ERROR, &err);
	if (dolly_is_adapter(base_path))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("base model \"%s\" is a LoRA adapter", base ? base : dolly_model),
				 errhint("Fine-tune its base model, or first merge the adapter into it with dolly_merge_adapter().")));
	/* an adapter is served on its base by name: dolly.model given as a path has none */
	if (lora && !base && dolly_model[0] == '/')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("method \"lora\" needs base_model: dolly.model is a path, not a model name"),
				 errhint("Name the base model, a directory under dolly.model_dir.")));

	/* the options as JSON; names through escape_json, so any name is safe */
	initStringInfo(&opts);
	appendStringInfoString(&opts, "{\"base_model\": ");
	if (base)
		escape_json(&opts, base);
	else
		appendStringInfoString(&opts, "null");
	appendStringInfoString(&opts, ", \"instruction_column\": ");
	escape_json(&opts, instr_col);
	appendStringInfoString(&opts, ", \"context_column\": ");
	if (ctx_col)
		escape_json(&opts, ctx_col);
	else
		appendStringInfoString(&opts, "null");
	appendStringInfoString(&opts, ", \"response_column\": ");
	escape_json(&opts, resp_col);
	appendStringInfo(&opts, ", \"epochs\": %d, \"batch_size\": %d, \"warmup_steps\": %d, "
					 "\"lr_schedule\": \"%s\", \"weight_decay\": %.17g, "
					 "\"eval_fraction\": %.17g, \"seed\": %lld, \"checkpointing\": %s, "
					 "\"source_oid\": %u",
					 epochs, batch_size, warmup_steps, schedule, weight_decay, eval_fraction,
					 (long long) seed, checkpointing ? "true" : "false", relid);
	if (!PG_ARGISNULL(7))
		appendStringInfo(&opts, ", \"learning_rate\": %.17g", lr);
	if (!PG_ARGISNULL(9))
		appendStringInfo(&opts, ", \"max_length\": %d", max_length);
	if (zero_stage >= 0)
		appendStringInfo(&opts, ", \"zero_stage\": %d", zero_stage);
	appendStringInfo(&opts, ", \"bf16_communication\": %s", comm_bf16 ? "true" : "false");
	if (lora)
	{
		appendStringInfo(&opts, ", \"method\": \"lora\", \"lora_rank\": %d, \"lora_alpha\": %.17g, "
						 "\"lora_dropout\": %.17g, \"lora_targets\": ", lora_rank, lora_alpha, lora_dropout);
		if (targets.len)
			escape_json(&opts, targets.data);
		else
			appendStringInfoString(&opts, "null");
	}
	appendStringInfoChar(&opts, '}');

	/* record the job (in the owner scope), then start its worker */
	args[0] = ObjectIdGetDatum(GetUserId());
	args[1] = CStringGetTextDatum(quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
															 get_rel_name(relid)));
	args[2] = CStringGetTextDatum(output);
	args[3] = DirectFunctionCall1(jsonb_in, CStringGetDatum(opts.data));
	dolly_owner_query(&scope, "INSERT INTO %s (role, source, output_model, options) "
					  "VALUES ($1, $2, $3, $4) RETURNING id", "dolly_job",
					  4, argtypes, args, NULL, SPI_OK_INSERT_RETURNING);
	job_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	dolly_owner_query_end(&scope);

	claim_slot(job_id);
	PG_TRY();
	{
		start_worker(job_id);
	}
	PG_CATCH();
	{
		release_slot(job_id);
		PG_RE_THROW();
	}
	PG_END_TRY();
	PG_RETURN_INT64(job_id);
}

/* Ask the live job job_id to stop; false if it has no worker here. */
static bool
request_cancel(int64 job_id)
{
	bool		found = false;

	SpinLockAcquire(&dolly_jobs->mutex);
	for (int i = 0; i < DOLLY_MAX_JOBS; i++)
		if (dolly_jobs->slots[i].job_id == job_id && dolly_jobs->slots[i].dboid == MyDatabaseId)
		{
			dolly_jobs->slots[i].cancel = true;
			found = true;
		}
	SpinLockRelease(&dolly_jobs->mutex);
	return found;
}

/* dolly_cancel_job(id): ask a queued or running job to stop; true if it was asked. */
Datum
dolly_cancel_job(PG_FUNCTION_ARGS)
{
	int64		job_id = PG_GETARG_INT64(0);
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(job_id)};
	DollyOwnerScope scope;
	bool		found;
	Oid			role = InvalidOid;
	bool		live = false;
	bool		asked;
	bool		isnull;

	dolly_owner_query(&scope, "SELECT role, state OPERATOR(pg_catalog.=) ANY ('{queued,running}') "
					  "FROM %s WHERE id OPERATOR(pg_catalog.=) $1", "dolly_job",
					  1, argtypes, args, NULL, SPI_OK_SELECT);
	found = SPI_processed == 1;
	if (found)
	{
		role = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		live = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	}
	dolly_owner_query_end(&scope);

	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("fine-tuning job %lld does not exist", (long long) job_id)));
	if (!has_privs_of_role(GetUserId(), role))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to cancel fine-tuning job %lld", (long long) job_id),
				 errhint("Only the role that started a job (or a superuser) may cancel it.")));
	if (!live)
		PG_RETURN_BOOL(false);
	asked = request_cancel(job_id);
	PG_RETURN_BOOL(asked);
}

/* dolly_job_progress(): the live state of the current role's jobs running in this database. */
Datum
dolly_job_progress(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	DollyJobSlot slots[DOLLY_MAX_JOBS];

	SpinLockAcquire(&dolly_jobs->mutex);
	memcpy(slots, dolly_jobs->slots, sizeof(slots));
	SpinLockRelease(&dolly_jobs->mutex);

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < DOLLY_MAX_JOBS; i++)
	{
		DollyJobSlot *j = &slots[i];
		Datum		values[11];
		bool		nulls[11] = {0};
		int			c = 0;

		if (j->job_id == 0 || j->dboid != MyDatabaseId || !has_privs_of_role(GetUserId(), j->role))
			continue;
		values[c++] = Int64GetDatum(j->job_id);
		values[c++] = Int32GetDatum(j->pid);
		values[c++] = CStringGetTextDatum(j->phase);
		values[c++] = Int32GetDatum(j->epoch);
		values[c++] = Int32GetDatum(j->step);
		values[c++] = Int32GetDatum(j->total_steps);
		nulls[c] = isnan(j->train_loss);
		values[c++] = Float8GetDatum(j->train_loss);
		nulls[c] = isnan(j->eval_loss);
		values[c++] = Float8GetDatum(j->eval_loss);
		values[c++] = Float8GetDatum(j->tokens_per_second);
		values[c++] = Int32GetDatum(j->records);
		values[c++] = Int32GetDatum(j->skipped);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
