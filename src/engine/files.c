/*
 * files.c: reading a whole file, and writing one aside then renaming it; see files.h.
 */
#define _GNU_SOURCE				/* renameat2 */

#include "files.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

dl_status
file_read(const char *path, const char *what, size_t max, char **buf, size_t *len, dl_error *err)
{
	int			fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat sb;
	size_t		got = 0;
	int			e;

	*buf = NULL;
	if (fd < 0)
	{
		e = errno;
		dl_fail(err, DL_EIO, "could not open %s \"%s\": %s", what, path, strerror(e));
		errno = e;
		return DL_EIO;
	}
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || (max > 0 && (size_t) sb.st_size > max))
	{
		close(fd);
		if (max > 0)
			return dl_fail(err, DL_EIO, "%s \"%s\" is not a regular file of at most %zu bytes", what, path, max);
		return dl_fail(err, DL_EIO, "%s \"%s\" is not a regular file", what, path);
	}
	*buf = malloc((size_t) sb.st_size + 1);
	if (*buf == NULL)
	{
		close(fd);
		return dl_fail(err, DL_ENOMEM, "out of memory reading %s \"%s\"", what, path);
	}
	while (got < (size_t) sb.st_size)
	{
		ssize_t		r = read(fd, *buf + got, (size_t) sb.st_size - got);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
		{
			e = errno;
			free(*buf);
			*buf = NULL;
			close(fd);
			return dl_fail(err, DL_EIO, "could not read %s \"%s\": %s", what, path,
						   r < 0 ? strerror(e) : "it became shorter");
		}
		got += (size_t) r;
	}
	close(fd);
	(*buf)[got] = '\0';
	*len = got;
	return DL_OK;
}

dl_status
file_create(const char *path, dl_file_out *out, dl_error *err)
{
	if ((size_t) snprintf(out->path, sizeof(out->path), "%s", path) >= sizeof(out->path))
		return dl_fail(err, DL_EINVAL, "path \"%s\" is too long", path);
	snprintf(out->tmp, sizeof(out->tmp), "%s.tmp", path);
	out->fd = open(out->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (out->fd < 0)
		return dl_fail(err, DL_EIO, "cannot create \"%s\": %s", out->tmp, strerror(errno));
	return DL_OK;
}

dl_status
file_write(dl_file_out *out, const void *data, size_t n, dl_error *err)
{
	const uint8_t *p = data;

	while (n > 0)
	{
		ssize_t		w = write(out->fd, p, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return dl_fail(err, DL_EIO, "cannot write \"%s\": %s", out->tmp,
						   w < 0 ? strerror(errno) : "no progress");
		p += w;
		n -= (size_t) w;
	}
	return DL_OK;
}

dl_status
file_fsync(const char *path, int flags, dl_error *err)
{
	int			fd = open(path, flags | O_CLOEXEC);
	dl_status	st = DL_OK;

	if (fd < 0)
		return dl_fail(err, DL_EIO, "cannot open \"%s\": %s", path, strerror(errno));
	if (fsync(fd) != 0)
		st = dl_fail(err, DL_EIO, "cannot fsync \"%s\": %s", path, strerror(errno));
	close(fd);
	return st;
}

dl_status
file_commit(dl_file_out *out, dl_status st, dl_error *err)
{
	char		parent[sizeof(out->path)];

	if (st == DL_OK && fsync(out->fd) != 0)
		st = dl_fail(err, DL_EIO, "cannot fsync \"%s\": %s", out->tmp, strerror(errno));
	if (close(out->fd) != 0 && st == DL_OK)
		st = dl_fail(err, DL_EIO, "cannot close \"%s\": %s", out->tmp, strerror(errno));
	if (st == DL_OK && rename(out->tmp, out->path) != 0)
		st = dl_fail(err, DL_EIO, "cannot rename \"%s\" to \"%s\": %s", out->tmp, out->path, strerror(errno));
	if (st != DL_OK)
	{
		unlink(out->tmp);
		return st;
	}
	/* the rename survives a crash once the directory holding it is on disk */
	memcpy(parent, out->path, sizeof(parent));
	return file_fsync(dirname(parent), O_RDONLY | O_DIRECTORY, err);
}

/* Remove the temporary directory and whatever was written into it (files only). */
static void
aside_remove(const dl_dir_aside *d)
{
	DIR		   *dir = opendir(d->tmp);
	struct dirent *de;
	char		path[4500];

	while (dir && (de = readdir(dir)) != NULL)
		if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
		{
			snprintf(path, sizeof(path), "%s/%s", d->tmp, de->d_name);
			unlink(path);
		}
	if (dir)
		closedir(dir);
	rmdir(d->tmp);
}

/* See files.h. */
dl_status
dir_aside_begin(const char *dir, dl_dir_aside *d, dl_error *err)
{
	struct stat sb;
	const char *slash;

	d->len = strlen(dir);
	/* "out/" must not become "out/.tmp-<pid>" inside the directory it names */
	while (d->len > 1 && dir[d->len - 1] == '/')
		d->len--;
	if (d->len == 0 || d->len >= sizeof(d->final))
		return dl_fail(err, DL_EINVAL, "model directory \"%s\" is empty or too long", dir);
	memcpy(d->final, dir, d->len);
	d->final[d->len] = '\0';
	if (lstat(d->final, &sb) == 0)
	{
		dl_fail(err, DL_EINVAL, "model directory \"%s\" already exists", d->final);
		return dl_hint(err, "Choose another name, or remove the old model first.");
	}
	slash = strrchr(d->final, '/');
	snprintf(d->tmp, sizeof(d->tmp), "%.*s.%s%s%ld", slash ? (int) (slash - d->final + 1) : 0, d->final,
			 slash ? slash + 1 : d->final, DL_SAVE_TMP_MARK, (long) getpid());
	if (mkdir(d->tmp, 0755) != 0)
		return dl_fail(err, DL_EIO, "cannot create \"%s\": %s", d->tmp, strerror(errno));
	return DL_OK;
}

/* See files.h. */
dl_status
dir_aside_end(dl_dir_aside *d, dl_status st, dl_error *err)
{
	char		parent[4096];

	if (st == DL_OK)
		st = file_fsync(d->tmp, O_RDONLY | O_DIRECTORY, err);
	/* RENAME_NOREPLACE: a directory made meanwhile under the name is not replaced */
	if (st == DL_OK && renameat2(AT_FDCWD, d->tmp, AT_FDCWD, d->final, RENAME_NOREPLACE) != 0)
	{
		st = dl_fail(err, DL_EIO, "cannot rename \"%s\" to \"%s\": %s", d->tmp, d->final, strerror(errno));
		if (errno == EEXIST)
			dl_hint(err, "Another process created \"%s\" meanwhile.", d->final);
	}
	if (st != DL_OK)
	{
		aside_remove(d);
		return st;
	}
	memcpy(parent, d->final, d->len + 1);
	return file_fsync(dirname(parent), O_RDONLY | O_DIRECTORY, err);
}
