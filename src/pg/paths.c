/*
 * paths.c: model names and the directories they stand for. Model directories are for
 * superusers to choose (dolly.model, dolly.model_dir); sessions only name models, and a
 * name can only ever be one directory under dolly.model_dir.
 */
#include "dolly_pg.h"

#include <sys/stat.h>

#include "queue.h"

/* A model name is one directory under dolly.model_dir: no separators, no way out of it. */
bool
dolly_model_name_ok(const char *name)
{
	size_t		len = strlen(name);

	return len > 0 && len < DOLLY_MODEL_NAME_MAX && name[0] != '.' && strstr(name, "..") == NULL &&
		strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") == len;
}

/* ERROR, saying what a name may be, unless dolly_model_name_ok(name). */
void
dolly_check_model_name(const char *name)
{
	if (!dolly_model_name_ok(name))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid model name \"%s\"", name),
				 errhint("A model name is the name of a directory under dolly.model_dir: letters, digits, \".\", \"_\" and \"-\", not starting with \".\".")));
}

/*
 * The directory a request's model name stands for: "" is dolly.model (an absolute
 * path, or a name under dolly.model_dir), anything else a name under dolly.model_dir.
 */
dl_status
dolly_model_path(const char *name, char *path, bool *is_default, dl_error *err)
{
	struct stat sb;

	*is_default = name[0] == '\0';
	if (*is_default)
	{
		if (dolly_model[0] == '\0')
		{
			dl_fail(err, DL_EINVAL, "no model is configured");
			return dl_hint(err, "Set dolly.model to a Hugging Face model directory in postgresql.conf and reload, or pass model => name.");
		}
		name = dolly_model;
	}
	if (name[0] == '/')
		strlcpy(path, name, MAXPGPATH);
	else if (!dolly_model_name_ok(name))
		return dl_fail(err, DL_EINVAL, "dolly.model \"%s\" is neither an absolute path nor a model name", name);
	else if (dolly_model_dir[0] == '\0')
	{
		dl_fail(err, DL_EINVAL, "model \"%s\" cannot be found because dolly.model_dir is not set", name);
		return dl_hint(err, "Set dolly.model_dir to the directory that holds the models.");
	}
	else
		snprintf(path, MAXPGPATH, "%s/%s", dolly_model_dir, name);
	if (stat(path, &sb) != 0 || !S_ISDIR(sb.st_mode))
	{
		elog(LOG, "dolly: model directory \"%s\" does not exist", path);
		if (*is_default && dolly_model[0] == '/')
			dl_fail(err, DL_EIO, "the directory that dolly.model names does not exist");
		else
			dl_fail(err, DL_EIO, "model \"%s\" does not exist in dolly.model_dir", name);
		return dl_hint(err, "A model directory holds config.json, tokenizer.json and *.safetensors, as Hugging Face stores them.");
	}
	return DL_OK;
}

/*
 * Engine messages name files by full path; show them relative to dolly.model_dir, which
 * sessions know (and the log has the full story).
 */
void
dolly_relative_paths(dl_error *err)
{
	size_t		dirlen = strlen(dolly_model_dir);
	char	   *p;

	if (dirlen == 0)
		return;
	while ((p = strstr(err->msg, dolly_model_dir)) != NULL && p[dirlen] == '/')
		memmove(p, p + dirlen + 1, strlen(p + dirlen + 1) + 1);
}
