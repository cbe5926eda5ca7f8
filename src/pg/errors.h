/*
 * errors.h: engine failures (dl_error) as a session sees them (errors.c): the one mapping
 * of engine status codes to SQLSTATEs, and messages that name models, not directories.
 */
#ifndef DOLLY_ERRORS_H
#define DOLLY_ERRORS_H

#include "error.h"

/* Report an engine failure as an ERROR (or another elevel) with its SQLSTATE and hint. */
extern void dolly_report(int elevel, const dl_error *err);

/* Replace path by name in err's message and hint (the full path belongs in the log). */
extern void dolly_hide_path(dl_error *err, const char *path, const char *name);

/* Rewrite full paths under dolly.model_dir in err's message as paths relative to it. */
extern void dolly_relative_paths(dl_error *err);

#endif
