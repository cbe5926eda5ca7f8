/*
 * files.c: reading a whole file, and writing one aside then renaming it; see files.h.
 */
#include "files.h"

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
