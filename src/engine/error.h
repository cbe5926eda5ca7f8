/*
 * error.h: how the engine reports failure.
 *
 * Engine functions return a dl_status and, on failure, fill a caller-owned dl_error with
 * a message (and optionally a hint). The engine never exits, never longjmps and never
 * calls PostgreSQL: the glue turns a dl_error into ereport(ERROR, errmsg, errhint).
 */
#ifndef DOLLY_ERROR_H
#define DOLLY_ERROR_H

#include <stddef.h>

typedef enum dl_status
{
	DL_OK = 0,
	DL_EIO,				/* a file could not be opened, read, mapped or written */
	DL_EFORMAT,			/* a file exists but its content is malformed */
	DL_EUNSUPPORTED,	/* well-formed but not something the engine supports */
	DL_ENOMEM,			/* an allocation failed */
	DL_EINVAL,			/* a caller passed an argument out of range */
	DL_EBACKEND,		/* the compute backend failed (GPU error, plugin missing) */
	DL_ECANCELLED		/* the caller asked to stop */
} dl_status;

#define DL_ERRMSG_LEN 512

typedef struct dl_error
{
	dl_status	code;
	char		msg[DL_ERRMSG_LEN];
	char		hint[DL_ERRMSG_LEN];	/* empty when there is nothing to suggest */
} dl_error;

/* Record a failure in err (which may be NULL) and return code, so callers can write
 * `return dl_fail(err, DL_EFORMAT, "...", ...);`. The hint is cleared. */
dl_status	dl_fail(dl_error *err, dl_status code, const char *fmt,...)
			__attribute__((format(printf, 3, 4)));

/* Attach a hint to the failure already recorded in err; returns err->code. */
dl_status	dl_hint(dl_error *err, const char *fmt,...)
			__attribute__((format(printf, 2, 3)));

/*
 * Untrusted bytes s[0..len) (a name read from a file) fit for a message: printable ASCII
 * kept, '?' for any other byte, cut at 120 with "..."; written to out, which is returned.
 */
const char *dl_shown(char *out, size_t outlen, const void *s, size_t len);

/* A short lower-case name for a status, for logs and test output. */
const char *dl_status_name(dl_status code);

#endif
