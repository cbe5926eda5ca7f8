/*
 * errors.c: engine failures as a session sees them. The engine reports a failure as a value
 * (dl_error: status, message, hint) and never longjmps; this file is the one place that
 * turns one into ereport, with the SQLSTATE for its status. The model servers and the
 * fine-tuning jobs fail in processes of their own and hand the failure to a session (a
 * request's answer, a job's row), so they make it fit for the session first: a model's
 * directory is a superuser's business, shown by the model's name, or relative to
 * dolly.model_dir (the log keeps the full path).
 *
 * See docs/ARCHITECTURE.md, the parts.
 */
#include "postgres.h"

#include "errors.h"
#include "settings.h"

/* The SQLSTATE for an engine status code: one a client can act on. */
static int
errcode_of(dl_status code)
{
	switch (code)
	{
		case DL_EIO:
			return ERRCODE_IO_ERROR;
		case DL_EFORMAT:
			return ERRCODE_DATA_CORRUPTED;
		case DL_EUNSUPPORTED:
			return ERRCODE_FEATURE_NOT_SUPPORTED;
		case DL_ENOMEM:
			return ERRCODE_OUT_OF_MEMORY;
		case DL_EINVAL:
			return ERRCODE_INVALID_PARAMETER_VALUE;
		case DL_ECANCELLED:
			return ERRCODE_QUERY_CANCELED;
		case DL_EBACKEND:
		case DL_OK:
			break;
	}
	return ERRCODE_EXTERNAL_ROUTINE_EXCEPTION;
}

void
dolly_report(int elevel, const dl_error *err)
{
	ereport(elevel,
			(errcode(errcode_of(err->code)),
			 errmsg("%s", err->msg),
			 err->hint[0] ? errhint("%s", err->hint) : 0));
}

/* Replace every occurrence of s in buf (of size len) by by. */
static void
replace_all(char *buf, size_t len, const char *s, const char *by)
{
	size_t		slen = strlen(s),
				bylen = strlen(by);
	char	   *p = buf;

	while (slen > 0 && (p = strstr(p, s)) != NULL)
	{
		size_t		off = p - buf;
		size_t		tail = strlen(p + slen) + 1;	/* with its NUL */

		/* what no longer fits is cut: the log has the full message */
		if (off + bylen >= len)
		{
			*p = '\0';
			break;
		}
		tail = Min(tail, len - off - bylen);
		memmove(p + bylen, p + slen, tail);
		memcpy(p, by, bylen);
		buf[off + bylen + tail - 1] = '\0';
		p += bylen;
	}
}

void
dolly_hide_path(dl_error *err, const char *path, const char *name)
{
	replace_all(err->msg, sizeof(err->msg), path, name);
	replace_all(err->hint, sizeof(err->hint), path, name);
}

/*
 * Engine messages name files by full path; show them relative to dolly.model_dir, which
 * sessions know (and the log has the full story).
 */
void
dolly_relative_paths(dl_error *err)
{
	char		dir[MAXPGPATH + 1];

	if (dolly_model_dir[0] == '\0')
		return;
	snprintf(dir, sizeof(dir), "%s/", dolly_model_dir);
	dolly_hide_path(err, dir, "");
}
