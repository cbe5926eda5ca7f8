/*
 * paths.c: model names, the directories they stand for, and loading them. Model
 * directories are for superusers to choose (dolly.model, dolly.model_dir); sessions only
 * name models, and a name can only ever be one directory under dolly.model_dir.
 */
#include "postgres.h"

#include "paths.h"
#include "settings.h"

#include <dirent.h>
#include <sys/stat.h>

#include "miscadmin.h"
#include "pgstat.h"

#include "train.h"

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
	{
		/* only a superuser may see what dolly.model says */
		elog(LOG, "dolly: dolly.model \"%s\" is neither an absolute path nor a model name", name);
		return dl_fail(err, DL_EINVAL, "dolly.model is neither an absolute path nor a model name");
	}
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
		return dl_hint(err, "A model directory holds config.json, the tokenizer files and the weights (safetensors or pytorch_model.bin), as Hugging Face stores them.");
	}
	return DL_OK;
}

bool
dolly_is_adapter(const char *path)
{
	char		config[MAXPGPATH];

	snprintf(config, sizeof(config), "%s/adapter_config.json", path);
	return access(config, F_OK) == 0;
}

bool
dolly_model_ident(const char *path, DollyModelIdent *out)
{
	struct stat sb;

	if (stat(path, &sb) != 0)
		return false;
	out->dev = (uint64) sb.st_dev;
	out->ino = (uint64) sb.st_ino;
	return true;
}

dl_status
dolly_model_ident_check(const char *name, const char *path, const DollyModelIdent *want,
						DollyModelIdent *have, dl_error *err)
{
	if (!dolly_model_ident(path, have))
		return dl_fail(err, DL_EIO, "model \"%s\" cannot be read: %s", name, strerror(errno));
	if (want == NULL || (want->dev == 0 && want->ino == 0) ||
		(have->dev == want->dev && have->ino == want->ino))
		return DL_OK;
	dl_fail(err, DL_EINVAL, "model \"%s\" has changed since it was registered", name);
	return dl_hint(err, "A superuser registers it again with dolly_register_model('%s').", name);
}

const char *
dolly_model_display_name(const char *name)
{
	if (name[0] != '\0')
		return name;
	return dolly_model[0] == '/' ? "dolly.model" : dolly_model;
}

typedef struct LoadWatch
{
	const char *activity;
	int			percent;		/* last shown */
	bool		(*stop) (void *arg);
	void	   *arg;
} LoadWatch;

/* dl_load_fn: show the progress when it changes by a percent; say whether to stop. */
static int
watch_load(void *arg, int64_t done, int64_t total)
{
	LoadWatch  *w = arg;
	int			percent = total > 0 ? (int) (100 * done / total) : 100;

	if (percent != w->percent)
	{
		char		line[MAXPGPATH + 64];

		snprintf(line, sizeof(line), "%s: %d%%", w->activity, percent);
		pgstat_report_activity(STATE_RUNNING, line);
		w->percent = percent;
	}
	return ProcDiePending || (w->stop && w->stop(w->arg));
}

dl_status
dolly_open_model(const char *path, dl_backend *be, const char *activity,
				 bool (*stop) (void *arg), void *arg, dl_pipeline **out, dl_error *err)
{
	LoadWatch	w = {activity, -1, stop, arg};

	return pipeline_open(path, be, watch_load, &w, out, err);
}

void
dolly_remove_partial_models(void)
{
	DIR		   *dir;
	struct dirent *de;

	if (dolly_model_dir[0] == '\0' || (dir = opendir(dolly_model_dir)) == NULL)
		return;
	while ((de = readdir(dir)) != NULL)
		if (de->d_name[0] == '.' && strstr(de->d_name, DL_SAVE_TMP_MARK) != NULL)
		{
			char		path[MAXPGPATH];

			snprintf(path, sizeof(path), "%s/%s", dolly_model_dir, de->d_name);
			ereport(LOG,
					(errmsg("dolly: removing \"%s\", a model a crash left half-written", path)));
			(void) rmtree(path, true);
		}
	closedir(dir);
}
