/*
 * files.h: reading a whole file, and writing one so that a crash never leaves it half
 * written: the engine's readers of config and tokenizer files and its writers of
 * safetensors and tokenizer files share these.
 */
#ifndef DOLLY_FILES_H
#define DOLLY_FILES_H

#include <stddef.h>

#include "error.h"

/*
 * The whole regular file at path, of at most max bytes (0: any size), in *buf (malloc'd,
 * NUL-terminated, *len bytes before the NUL). `what` names it in messages ("tokenizer
 * file"). When it cannot be opened, errno says why (ENOENT: it does not exist).
 */
dl_status	file_read(const char *path, const char *what, size_t max, char **buf, size_t *len,
					  dl_error *err);

/* A file being written as path.tmp, renamed to path when complete (file_commit). */
typedef struct dl_file_out
{
	int			fd;
	char		path[4096];
	char		tmp[4100];
} dl_file_out;

/* Create path.tmp to write path. */
dl_status	file_create(const char *path, dl_file_out *out, dl_error *err);

/* Write all n bytes of data (retrying short writes). */
dl_status	file_write(dl_file_out *out, const void *data, size_t n, dl_error *err);

/*
 * Finish: with st == DL_OK, fsync the file, rename it into place and fsync its directory;
 * otherwise (or when any of that fails) remove it. Returns st, or the first failure.
 */
dl_status	file_commit(dl_file_out *out, dl_status st, dl_error *err);

/* fsync the file or directory at path (flags: O_RDONLY, with O_DIRECTORY for a directory). */
dl_status	file_fsync(const char *path, int flags, dl_error *err);

/*
 * A directory written aside under a hidden name, ".<name>" DL_SAVE_TMP_MARK "<pid>"
 * beside it, and renamed into place when complete (RENAME_NOREPLACE), so that a crash
 * never leaves a half-written model or adapter under its name.
 */
#define DL_SAVE_TMP_MARK ".tmp-"
typedef struct dl_dir_aside
{
	char		final[4096];
	char		tmp[4200];		/* where the files go */
	size_t		len;			/* of final */
} dl_dir_aside;

/* Begin writing directory dir, which must not exist: create d->tmp. */
dl_status	dir_aside_begin(const char *dir, dl_dir_aside *d, dl_error *err);

/*
 * Finish: given st, the outcome of writing into d->tmp, fsync it and rename it into
 * place, or remove it (and its files). Returns st, or the first failure.
 */
dl_status	dir_aside_end(dl_dir_aside *d, dl_status st, dl_error *err);

#endif
