/*
 * models.c: the model catalog. A model fine-tuned on rows only its author may read
 * memorises them, so models have owners, and are served only to roles allowed to use
 * them.
 *
 * dolly_model (one row a model, in the database where it was registered) records the
 * owner, the roles it is granted to (InvalidOid for PUBLIC), its base model and job, and
 * its directory's identity (device and inode): the model server loads a named model only
 * when the directory still has it, so a name dropped and reused, or a directory swapped
 * in, never inherits an old entry's grants. A fine-tuning job registers its model as the
 * role's; base models that an administrator puts under dolly.model_dir are registered by
 * a superuser (dolly_register_model). dolly.model, the default, is everyone's.
 *
 * Sessions check here before a request is queued; the rows are read and written in the
 * owner scope (catalog.c), and privileges are judged afterwards, as the caller.
 */
#include "postgres.h"

#include "catalog.h"
#include "errors.h"
#include "paths.h"
#include "settings.h"

#include "lora.h"

#include <dirent.h>
#include <sys/stat.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

PG_FUNCTION_INFO_V1(dolly_register_model);
PG_FUNCTION_INFO_V1(dolly_grant_model);
PG_FUNCTION_INFO_V1(dolly_revoke_model);
PG_FUNCTION_INFO_V1(dolly_drop_model);
PG_FUNCTION_INFO_V1(dolly_merge_adapter);

/* A model's row of the catalog. */
typedef struct ModelEntry
{
	bool		found;
	Oid			owner;
	Oid		   *users;			/* granted to; InvalidOid is PUBLIC */
	int			nusers;
	DollyModelIdent ident;
	bool		written_by_dolly;	/* a job's output: dropping it removes its files */
	char	   *base;			/* the model it was made from; NULL: none recorded */
} ModelEntry;

/* Read model `name`'s row (in the owner scope). */
static void
model_lookup(const char *name, ModelEntry *e)
{
	DollyOwnerScope scope;
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(name)};

	memset(e, 0, sizeof(*e));
	dolly_owner_query(&scope, "SELECT owner, users, dir_dev, dir_ino, job IS NOT NULL, base_model FROM %s "
					  "WHERE name OPERATOR(pg_catalog.=) $1", "dolly_model",
					  1, argtypes, args, NULL, SPI_OK_SELECT);
	if (SPI_processed == 1)
	{
		HeapTuple	t = SPI_tuptable->vals[0];
		TupleDesc	d = SPI_tuptable->tupdesc;
		bool		isnull;
		Datum	   *elems;
		int			n;

		e->found = true;
		e->owner = DatumGetObjectId(SPI_getbinval(t, d, 1, &isnull));
		deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(t, d, 2, &isnull)), OIDOID, sizeof(Oid),
						  true, TYPALIGN_INT, &elems, NULL, &n);
		e->users = SPI_palloc(Max(n, 1) * sizeof(Oid));
		for (int i = 0; i < n; i++)
			e->users[i] = DatumGetObjectId(elems[i]);
		e->nusers = n;
		e->ident.dev = (uint64) DatumGetInt64(SPI_getbinval(t, d, 3, &isnull));
		e->ident.ino = (uint64) DatumGetInt64(SPI_getbinval(t, d, 4, &isnull));
		e->written_by_dolly = DatumGetBool(SPI_getbinval(t, d, 5, &isnull));
		e->base = SPI_getvalue(t, d, 6);
	}
	dolly_owner_query_end(&scope);
}

/* Does the current role have the owner's privileges on the entry (or is it a superuser)? */
static bool
owns(const ModelEntry *e)
{
	return has_privs_of_role(GetUserId(), e->owner);
}

/* May the current role use the entry's model? */
static bool
may_use(const ModelEntry *e)
{
	if (owns(e))
		return true;
	for (int i = 0; i < e->nusers; i++)
		if (!OidIsValid(e->users[i]) || has_privs_of_role(GetUserId(), e->users[i]))
			return true;
	return false;
}

/* Is `name` the model dolly.model names (by name, not by path)? */
static bool
is_default_model(const char *name)
{
	return dolly_model[0] != '/' && strcmp(name, dolly_model) == 0;
}

/*
 * ERROR naming the model when the current role may not see it: a model of another role
 * is as unknown as one that does not exist.
 */
static void
unknown_model(const char *name)
{
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("model \"%s\" is not registered, or the current role may not use it", name),
			 errhint("dolly_models lists the models the current role may use; a model's owner grants it with dolly_grant_model().")));
}

/* May the current role use model `name`; *ident is what the server must find. */
static bool
usable(const char *name, DollyModelIdent *ident)
{
	ModelEntry	e;

	memset(ident, 0, sizeof(*ident));
	if (is_default_model(name))
		return true;
	model_lookup(name, &e);
	if (e.found && may_use(&e))
	{
		*ident = e.ident;
		return true;
	}
	/* superusers may name any directory under dolly.model_dir: they can read it anyway */
	return superuser();
}

void
dolly_check_model_use(const char *name, DollyModelIdent *ident)
{
	dolly_check_model_name(name);
	if (!usable(name, ident))
		unknown_model(name);
}

void
dolly_check_model_request(const char *name, DollyModelIdent *ident, char *base,
						  DollyModelIdent *base_ident)
{
	char		path[MAXPGPATH];
	bool		is_default;
	dl_error	err;
	ModelEntry	e;

	dolly_check_model_use(name, ident);
	base[0] = '\0';
	memset(base_ident, 0, sizeof(*base_ident));
	if (dolly_model_path(name, path, &is_default, &err) != DL_OK || !dolly_is_adapter(path))
		return;
	model_lookup(name, &e);
	if (is_default || e.base == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("model \"%s\" is a LoRA adapter with no base model registered", name),
				 errhint("Register it with dolly_register_model(model, base_model => ...): an adapter runs on its base.")));
	if (!usable(e.base, base_ident))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("model \"%s\" is a LoRA adapter of \"%s\", which the current role may not use", name, e.base),
				 errhint("An adapter runs on its base model: its owner grants that with dolly_grant_model().")));
	strlcpy(base, e.base, DOLLY_MODEL_NAME_MAX);
}

bool
dolly_model_visible(const char *path)
{
	char		dflt[MAXPGPATH];
	bool		is_default;
	dl_error	err;
	const char *slash = strrchr(path, '/');
	size_t		dirlen = strlen(dolly_model_dir);
	DollyModelIdent ident;

	if (superuser() ||
		(dolly_model_path("", dflt, &is_default, &err) == DL_OK && strcmp(dflt, path) == 0))
		return true;
	/* a model under dolly.model_dir, by its name */
	return slash && dirlen > 0 && (size_t) (slash - path) == dirlen &&
		strncmp(path, dolly_model_dir, dirlen) == 0 && dolly_model_name_ok(slash + 1) &&
		usable(slash + 1, &ident);
}

bool
dolly_model_registered(const char *name)
{
	ModelEntry	e;

	model_lookup(name, &e);
	return e.found;
}

/* The bytes of the files in a model directory. */
static int64
directory_size(const char *path)
{
	DIR		   *dir = AllocateDir(path);
	struct dirent *de;
	int64		size = 0;

	while ((de = ReadDir(dir, path)) != NULL)
	{
		char		file[MAXPGPATH];
		struct stat sb;

		snprintf(file, sizeof(file), "%s/%s", path, de->d_name);
		if (stat(file, &sb) == 0 && S_ISREG(sb.st_mode))
			size += sb.st_size;
	}
	FreeDir(dir);
	return size;
}

/*
 * Write model `name`'s row for the directory at path: a new row, or, for a name already
 * registered, its owner, identity and size again (and its base, when given).
 */
static void
register_model(const char *name, Oid owner, const char *base, int64 job, const char *path)
{
	DollyOwnerScope scope;
	DollyModelIdent ident;
	Oid			argtypes[7] = {TEXTOID, OIDOID, TEXTOID, INT8OID, INT8OID, INT8OID, INT8OID};
	Datum		args[7];
	char		nulls[7] = "       ";

	if (!dolly_model_ident(path, &ident))
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("cannot read the directory of model \"%s\": %m", name)));
	args[0] = CStringGetTextDatum(name);
	args[1] = ObjectIdGetDatum(owner);
	args[2] = base ? CStringGetTextDatum(base) : (Datum) 0;
	nulls[2] = base ? ' ' : 'n';
	args[3] = Int64GetDatum(job);
	nulls[3] = job > 0 ? ' ' : 'n';
	args[4] = Int64GetDatum(directory_size(path));
	args[5] = Int64GetDatum((int64) ident.dev);
	args[6] = Int64GetDatum((int64) ident.ino);

	dolly_owner_query(&scope, "INSERT INTO %s AS m (name, owner, base_model, job, size_bytes, dir_dev, dir_ino) "
					  "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO UPDATE "
					  "SET owner = $2, base_model = COALESCE($3, m.base_model), size_bytes = $5, "
					  "dir_dev = $6, dir_ino = $7",
					  "dolly_model", 7, argtypes, args, nulls, SPI_OK_INSERT);
	dolly_owner_query_end(&scope);
	/* apart, as upgrades from before 0.5 register (full) models before the column exists */
	if (dolly_is_adapter(path))
	{
		dolly_owner_query(&scope, "UPDATE %s SET adapter = true WHERE name OPERATOR(pg_catalog.=) $1",
						  "dolly_model", 1, argtypes, args, NULL, SPI_OK_UPDATE);
		dolly_owner_query_end(&scope);
	}
}

void
dolly_register_output(const char *name, Oid owner, const char *base, int64 job, const char *path)
{
	register_model(name, owner, base ? base : (dolly_model[0] != '/' ? dolly_model : NULL), job, path);
}

void
dolly_register_copy(const char *name, Oid owner, const char *base, const char *path)
{
	register_model(name, owner, base, 0, path);
}

char *
dolly_check_new_model(const char *name)
{
	struct stat sb;
	char	   *path;

	dolly_check_model_name(name);
	if (dolly_model_dir[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("dolly.model_dir is not set"),
				 errhint("A superuser sets dolly.model_dir to the directory where models are read and written.")));
	path = psprintf("%s/%s", dolly_model_dir, name);
	if (dolly_model_registered(name) || stat(path, &sb) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("model \"%s\" already exists in dolly.model_dir", name),
				 errhint("Choose another name, or remove that directory.")));
	return path;
}

char *
dolly_model_arg(FunctionCallInfo fcinfo)
{
	char	   *name;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("model must not be NULL")));
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	dolly_check_model_name(name);
	return name;
}

/*
 * The base of adapter directory `name` at path: base_model if given, else the model its
 * adapter_config.json names when that is registered (or dolly.model); it must be a model
 * (not an adapter) the catalog knows.
 */
static char *
adapter_base(const char *name, const char *path, const char *given)
{
	char		named[1024];
	char	   *base = NULL;
	char		base_path[MAXPGPATH];
	bool		is_default;
	dl_error	err;

	/* the configuration is checked either way; PEFT's names the base (a hub name, often) */
	if (lora_base_name(path, named, sizeof(named), &err) != DL_OK)
	{
		dolly_hide_path(&err, path, name);
		dolly_report(ERROR, &err);
	}
	base = given ? pstrdup(given) : named[0] ? pstrdup(named) : NULL;
	if (base == NULL || !dolly_model_name_ok(base) ||
		(!dolly_model_registered(base) && !(dolly_model[0] != '/' && strcmp(base, dolly_model) == 0)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the base model of LoRA adapter \"%s\" is not a registered model%s%s%s", name,
						base ? " (\"" : "", base ? base : "", base ? "\")" : ""),
				 errhint("Give base_model: the registered model the adapter was trained from.")));
	if (dolly_model_path(base, base_path, &is_default, &err) != DL_OK)
		dolly_report(ERROR, &err);
	if (dolly_is_adapter(base_path))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the base model of LoRA adapter \"%s\", \"%s\", is itself an adapter", name, base)));
	return base;
}

/*
 * dolly_register_model(model, owner, base_model): record a model directory under
 * dolly.model_dir in the catalog, owned by `owner` (the caller when NULL); for a model
 * registered already, its directory's identity and size again (and the owner and base,
 * when given). A LoRA adapter's directory records its base (adapter_base). Superusers only.
 */
Datum
dolly_register_model(PG_FUNCTION_ARGS)
{
	char	   *name;
	char		path[MAXPGPATH];
	char		config[MAXPGPATH + 16];
	bool		is_default;
	dl_error	err;
	struct stat sb;
	Oid			owner;
	char	   *base = NULL;

	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only superusers may register models"),
				 errhint("Models a role fine-tunes are registered as that role's when the job succeeds.")));
	name = dolly_model_arg(fcinfo);
	if (dolly_model_path(name, path, &is_default, &err) != DL_OK)
		dolly_report(ERROR, &err);
	if (dolly_is_adapter(path))
		base = adapter_base(name, path, PG_NARGS() > 2 && !PG_ARGISNULL(2) ? text_to_cstring(PG_GETARG_TEXT_PP(2)) : NULL);
	else if (PG_NARGS() > 2 && !PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("model \"%s\" is not a LoRA adapter: only an adapter takes a base_model", name)));
	snprintf(config, sizeof(config), "%s/config.json", path);
	if (!base && stat(config, &sb) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("directory \"%s\" under dolly.model_dir has no config.json", name),
				 errhint("A model directory holds config.json, a tokenizer and the weights, as Hugging Face stores them.")));
	/* a new row without an owner given belongs to the caller; a registered one keeps its */
	if (PG_ARGISNULL(1))
	{
		ModelEntry	e;

		model_lookup(name, &e);
		owner = e.found ? e.owner : GetUserId();
	}
	else
		owner = PG_GETARG_OID(1);
	register_model(name, owner, base, 0, path);
	PG_RETURN_VOID();
}

/* The model named by argument 0, which the current role must own (or be a superuser). */
static char *
owned_model(FunctionCallInfo fcinfo, const char *action, ModelEntry *e)
{
	char	   *name = dolly_model_arg(fcinfo);

	model_lookup(name, e);
	if (!e->found || !may_use(e))
		unknown_model(name);
	if (!owns(e))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to %s model \"%s\"", action, name),
				 errhint("Only the model's owner (or a superuser) may %s it.", action)));
	return name;
}

/* The role argument 1 names: a role, or PUBLIC (InvalidOid). */
static Oid
grantee_arg(FunctionCallInfo fcinfo)
{
	char	   *grantee;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("grantee must not be NULL"),
				 errhint("Name a role, or PUBLIC for every role.")));
	grantee = text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (pg_strcasecmp(grantee, "public") == 0)
		return InvalidOid;
	return get_role_oid(grantee, false);
}

/* Add (grant) or remove a grantee of the model named by argument 0. */
static void
change_grant(FunctionCallInfo fcinfo, bool grant)
{
	ModelEntry	e;
	char	   *name = owned_model(fcinfo, grant ? "grant" : "revoke", &e);
	Oid			grantee = grantee_arg(fcinfo);
	DollyOwnerScope scope;
	Oid			argtypes[2] = {TEXTOID, OIDOID};
	Datum		args[2] = {CStringGetTextDatum(name), ObjectIdGetDatum(grantee)};

	dolly_owner_query(&scope, grant ?
					  "UPDATE %s SET users = pg_catalog.array_append(users, $2) "
					  "WHERE name OPERATOR(pg_catalog.=) $1 AND NOT $2 OPERATOR(pg_catalog.=) ANY (users)" :
					  "UPDATE %s SET users = pg_catalog.array_remove(users, $2) "
					  "WHERE name OPERATOR(pg_catalog.=) $1",
					  "dolly_model", 2, argtypes, args, NULL, SPI_OK_UPDATE);
	dolly_owner_query_end(&scope);
}

/* dolly_grant_model(model, grantee): let a role (or PUBLIC) use a model. */
Datum
dolly_grant_model(PG_FUNCTION_ARGS)
{
	change_grant(fcinfo, true);
	PG_RETURN_VOID();
}

/* dolly_revoke_model(model, grantee): take a grant back. */
Datum
dolly_revoke_model(PG_FUNCTION_ARGS)
{
	change_grant(fcinfo, false);
	PG_RETURN_VOID();
}

/* Directories of dropped models, removed when the dropping transaction commits. */
static List *doomed = NIL;
static bool doom_callback_registered = false;

static void
remove_doomed(XactEvent event, void *arg)
{
	ListCell   *lc;

	if (event != XACT_EVENT_COMMIT && event != XACT_EVENT_ABORT)
		return;
	foreach(lc, doomed)
	{
		if (event == XACT_EVENT_COMMIT && !rmtree((char *) lfirst(lc), true))
			elog(WARNING, "dolly: could not remove the directory of a dropped model");
		pfree(lfirst(lc));
	}
	list_free(doomed);
	doomed = NIL;
}

/*
 * dolly_drop_model(model): remove a model from the catalog (owner or superuser); a model a
 * job wrote loses its directory too, when the transaction commits. A base model an
 * administrator placed keeps its files.
 */
Datum
dolly_drop_model(PG_FUNCTION_ARGS)
{
	ModelEntry	e;
	char	   *name = owned_model(fcinfo, "drop", &e);
	DollyOwnerScope scope;
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(name)};
	char		path[MAXPGPATH];
	bool		is_default;
	dl_error	err;

	dolly_owner_query(&scope, "DELETE FROM %s WHERE name OPERATOR(pg_catalog.=) $1", "dolly_model",
					  1, argtypes, args, NULL, SPI_OK_DELETE);
	dolly_owner_query_end(&scope);

	if (e.written_by_dolly && dolly_model_path(name, path, &is_default, &err) == DL_OK)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		doomed = lappend(doomed, pstrdup(path));
		MemoryContextSwitchTo(old);
		if (!doom_callback_registered)
		{
			RegisterXactCallback(remove_doomed, NULL);
			doom_callback_registered = true;
		}
	}
	PG_RETURN_VOID();
}

/*
 * dolly_merge_adapter(adapter, output_model): the adapter merged into its base (W + scale
 * B A in each target, lora_merge), written as a new model of the caller's, based on the
 * adapter's base. The caller must be allowed to use both; the files are read and written
 * here, in the session, as they are small beside what serving them costs.
 */
Datum
dolly_merge_adapter(PG_FUNCTION_ARGS)
{
	char	   *adapter = dolly_model_arg(fcinfo);
	char	   *output,
			   *out_path;
	char		base[DOLLY_MODEL_NAME_MAX],
				adapter_path[MAXPGPATH],
				base_path[MAXPGPATH];
	DollyModelIdent ident,
				base_ident,
				have;
	bool		is_default;
	dl_error	err;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("output_model must not be NULL")));
	output = text_to_cstring(PG_GETARG_TEXT_PP(1));
	dolly_check_model_request(adapter, &ident, base, &base_ident);
	if (base[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("model \"%s\" is not a LoRA adapter", adapter),
				 errhint("dolly_merge_adapter merges an adapter (dolly_models.adapter) into its base model.")));
	out_path = dolly_check_new_model(output);
	/* the directories the catalog knows, still */
	if (dolly_model_path(adapter, adapter_path, &is_default, &err) != DL_OK ||
		dolly_model_ident_check(adapter, adapter_path, &ident, &have, &err) != DL_OK ||
		dolly_model_path(base, base_path, &is_default, &err) != DL_OK ||
		dolly_model_ident_check(base, base_path, &base_ident, &have, &err) != DL_OK)
		dolly_report(ERROR, &err);
	elog(LOG, "dolly: merging adapter \"%s\" into \"%s\" as \"%s\"", adapter, base, output);
	if (lora_merge(base_path, adapter_path, out_path, &err) != DL_OK)
	{
		dolly_hide_path(&err, adapter_path, adapter);
		dolly_hide_path(&err, base_path, base);
		dolly_relative_paths(&err);
		dolly_report(ERROR, &err);
	}
	register_model(output, GetUserId(), base, 0, out_path);
	PG_RETURN_VOID();
}
