/*
 * model_copy.c: a model directory copied to another node through SQL, for Citus clusters
 * without a shared file system. On the coordinator, dolly_copy_model_to_workers (PL/pgSQL,
 * sql/dolly--0.3--0.4.sql) reads each file of a model a megabyte at a time and sends it to
 * every worker through Citus's run_command_on_workers. On each worker these functions
 * receive it: dolly_receive_model_begin makes a hidden directory beside the models,
 * dolly_receive_model_part writes a piece there once its SHA-256 matches the sender's, and
 * dolly_receive_model_done checks every file's size, syncs them, renames the directory into
 * place and registers the model, its owner the coordinator's. Superusers only, like every
 * path under dolly.model_dir.
 */
#include "postgres.h"

#include "catalog.h"
#include "paths.h"
#include "settings.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "catalog/pg_type.h"
#include "common/file_perm.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"

PG_FUNCTION_INFO_V1(dolly_receive_model_begin);
PG_FUNCTION_INFO_V1(dolly_receive_model_part);
PG_FUNCTION_INFO_V1(dolly_receive_model_done);

/* The checked model name of argument 0, superusers only. */
static char *
receiving_model(FunctionCallInfo fcinfo)
{
	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only superusers may receive models"),
				 errhint("Run dolly_copy_model_to_workers(model) on the coordinator as a superuser.")));
	return dolly_model_arg(fcinfo);
}

/* Where model's files arrive: a hidden directory under dolly.model_dir. */
static char *
incoming_dir(const char *model)
{
	return psprintf("%s/.%s.incoming", dolly_model_dir, model);
}

/* A file name of a model directory: no path, not hidden. */
static char *
file_arg(FunctionCallInfo fcinfo, int argno)
{
	char	   *file;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("file must not be NULL")));
	file = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	if (file[0] == '\0' || file[0] == '.' || strchr(file, '/') != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"%s\" is not a file name of a model directory", file)));
	return file;
}

/* dolly_receive_model_begin(model): an empty directory for model's files to arrive in. */
Datum
dolly_receive_model_begin(PG_FUNCTION_ARGS)
{
	char	   *model = receiving_model(fcinfo);
	char	   *dir = incoming_dir(model);

	if (dolly_model_registered(model))
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("model \"%s\" already exists on this node", model),
				 errhint("Drop it here with dolly_drop_model, or copy the model under another name.")));
	/* what an interrupted copy left goes first */
	(void) rmtree(dir, true);
	if (MakePGDirectory(dir) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("cannot create directory \"%s\": %m", dir)));
	PG_RETURN_VOID();
}

/*
 * dolly_receive_model_part(model, file, offset, data, digest): write data at offset of
 * the arriving file, once SHA-256(data) equals digest. Returns the bytes written.
 */
Datum
dolly_receive_model_part(PG_FUNCTION_ARGS)
{
	char	   *model = receiving_model(fcinfo);
	char	   *file = file_arg(fcinfo, 1);
	int64		offset = PG_ARGISNULL(2) ? -1 : PG_GETARG_INT64(2);
	bytea	   *data,
			   *digest,
			   *sum;
	char	   *path;
	int			fd;
	Size		len;

	if (offset < 0 || PG_ARGISNULL(3) || PG_ARGISNULL(4))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a piece of a model file needs an offset >= 0, data and its digest")));
	data = PG_GETARG_BYTEA_PP(3);
	digest = PG_GETARG_BYTEA_PP(4);
	sum = DatumGetByteaPP(DirectFunctionCall1(sha256_bytea, PointerGetDatum(data)));
	if (VARSIZE_ANY_EXHDR(sum) != VARSIZE_ANY_EXHDR(digest) ||
		memcmp(VARDATA_ANY(sum), VARDATA_ANY(digest), VARSIZE_ANY_EXHDR(sum)) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("the piece of \"%s\" of model \"%s\" at offset %lld does not match its SHA-256",
						file, model, (long long) offset),
				 errhint("Copy the model again.")));
	path = psprintf("%s/%s", incoming_dir(model), file);
	fd = OpenTransientFile(path, O_WRONLY | O_CREAT | PG_BINARY);
	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("cannot open \"%s\": %m", path),
				 errhint("dolly_receive_model_begin makes the directory first.")));
	len = VARSIZE_ANY_EXHDR(data);
	if (pg_pwrite(fd, VARDATA_ANY(data), len, (off_t) offset) != (ssize_t) len)
	{
		int			save = errno ? errno : ENOSPC;

		CloseTransientFile(fd);
		errno = save;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("cannot write \"%s\": %m", path)));
	}
	if (CloseTransientFile(fd) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("cannot close \"%s\": %m", path)));
	PG_RETURN_INT64((int64) len);
}

/*
 * dolly_receive_model_done(model, owner, base_model, files, sizes): check that every file
 * arrived whole, sync them, move the directory into place as model and register it,
 * owned by the role named owner. Returns what it installed, in words.
 */
Datum
dolly_receive_model_done(PG_FUNCTION_ARGS)
{
	char	   *model = receiving_model(fcinfo);
	char	   *dir = incoming_dir(model);
	char	   *target;
	Oid			owner;
	Datum	   *files,
			   *sizes;
	bool	   *fnulls,
			   *snulls;
	int			nfiles,
				nsizes;
	int64		total = 0;
	struct stat sb;

	if (PG_ARGISNULL(1) || PG_ARGISNULL(3) || PG_ARGISNULL(4))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("owner, files and sizes must not be NULL")));
	owner = get_role_oid(NameStr(*PG_GETARG_NAME(1)), true);
	if (!OidIsValid(owner))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role \"%s\", the owner of model \"%s\", does not exist on this node",
						NameStr(*PG_GETARG_NAME(1)), model),
				 errhint("Create the role on every node (Citus propagates CREATE ROLE run on the coordinator).")));
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(3), TEXTOID, -1, false, TYPALIGN_INT, &files, &fnulls, &nfiles);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(4), INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &sizes, &snulls, &nsizes);
	if (nfiles != nsizes || nfiles == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%d files and %d sizes of model \"%s\"", nfiles, nsizes, model)));
	for (int i = 0; i < nfiles; i++)
	{
		char	   *file,
				   *path;

		if (fnulls[i] || snulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("a file of model \"%s\" has no name or size", model)));
		file = TextDatumGetCString(files[i]);
		path = psprintf("%s/%s", dir, file);
		if (stat(path, &sb) != 0 || (int64) sb.st_size != DatumGetInt64(sizes[i]))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("file \"%s\" of model \"%s\" arrived with %lld bytes of %lld",
							file, model, stat(path, &sb) == 0 ? (long long) sb.st_size : 0LL,
							(long long) DatumGetInt64(sizes[i])),
					 errhint("Copy the model again.")));
		fsync_fname(path, false);
		total += sb.st_size;
	}
	fsync_fname(dir, true);
	target = psprintf("%s/%s", dolly_model_dir, model);
	if (stat(target, &sb) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("directory \"%s\" already exists under dolly.model_dir on this node", model),
				 errhint("Remove it, or copy the model under another name.")));
	if (rename(dir, target) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("cannot move the copy of model \"%s\" into place: %m", model)));
	fsync_fname(dolly_model_dir, true);
	dolly_register_copy(model, owner, PG_ARGISNULL(2) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(2)),
						target);
	PG_RETURN_TEXT_P(cstring_to_text(psprintf("model \"%s\": %d files, %lld bytes", model, nfiles,
											  (long long) total)));
}
