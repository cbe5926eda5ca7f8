/*
 * zip.c: the directory of a zip archive held in memory, checked entry by entry (zip.h),
 * following APPNOTE.TXT (PKWARE's specification; section numbers below are its).
 */
#include "zip.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "zip records are little-endian and are read in place: a little-endian host is required"
#endif

/* record signatures and fixed sizes (4.3) */
#define ZIP_LOCAL_SIG 0x04034b50u
#define ZIP_CENTRAL_SIG 0x02014b50u
#define ZIP_END_SIG 0x06054b50u
#define ZIP64_END_SIG 0x06064b50u
#define ZIP64_LOCATOR_SIG 0x07064b50u
#define ZIP_DESCRIPTOR_SIG 0x08074b50u
#define ZIP_LOCAL_SIZE 30
#define ZIP_CENTRAL_SIZE 46
#define ZIP_END_SIZE 22
#define ZIP64_END_SIZE 56
#define ZIP64_LOCATOR_SIZE 20
#define ZIP_FLAG_ENCRYPTED 0x0001
#define ZIP_FLAG_DESCRIPTOR 0x0008
#define ZIP_FLAG_STRONG_ENCRYPTION 0x0040
#define ZIP64_EXTRA_ID 0x0001
#define ZIP_STORED 0

static inline uint16_t
rd16(const uint8_t *p)
{
	uint16_t	v;

	memcpy(&v, p, sizeof(v));
	return v;
}

static inline uint32_t
rd32(const uint8_t *p)
{
	uint32_t	v;

	memcpy(&v, p, sizeof(v));
	return v;
}

static inline uint64_t
rd64(const uint8_t *p)
{
	uint64_t	v;

	memcpy(&v, p, sizeof(v));
	return v;
}

/* CRC-32 (reflected, polynomial 0xEDB88320), a bit at a time: it checks small entries only. */
uint32_t
zip_crc32(const uint8_t *p, size_t n)
{
	uint32_t	c = 0xFFFFFFFFu;

	for (size_t i = 0; i < n; i++)
	{
		c ^= p[i];
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0xEDB88320u & -(c & 1u));
	}
	return ~c;
}

/*
 * Find the central directory: the end record is the last 22 bytes plus its comment,
 * which must reach the end of the file; a ZIP64 locator right before it points to the
 * ZIP64 end record, which must end where the locator begins.
 */
static dl_status
zip_find_directory(const uint8_t *buf, size_t size, const char *fname, uint64_t *cd_off,
				   uint64_t *cd_len, uint64_t *count, dl_error *err)
{
	size_t		end = SIZE_MAX,
				dir_end;
	const uint8_t *e;
	uint64_t	n,
				len,
				off;

	for (size_t comment = 0; comment <= 0xFFFF && ZIP_END_SIZE + comment <= size; comment++)
	{
		size_t		at = size - ZIP_END_SIZE - comment;

		if (rd32(buf + at) == ZIP_END_SIG && rd16(buf + at + 20) == comment)
		{
			end = at;
			break;
		}
	}
	if (end == SIZE_MAX)
		return dl_fail(err, DL_EFORMAT, "%s: not a zip archive (no end of central directory record at its end)",
					   fname);
	e = buf + end;
	if (rd16(e + 4) != 0 || rd16(e + 6) != 0 || rd16(e + 8) != rd16(e + 10))
		return dl_fail(err, DL_EUNSUPPORTED, "%s: the zip archive spans several disks", fname);
	n = rd16(e + 10);
	len = rd32(e + 12);
	off = rd32(e + 16);
	dir_end = end;
	if (end >= ZIP64_LOCATOR_SIZE && rd32(e - ZIP64_LOCATOR_SIZE) == ZIP64_LOCATOR_SIG)
	{
		const uint8_t *loc = e - ZIP64_LOCATOR_SIZE;
		uint64_t	at = rd64(loc + 8),
					loc_at = end - ZIP64_LOCATOR_SIZE;
		const uint8_t *z;

		if (rd32(loc + 4) != 0 || rd32(loc + 16) != 1)
			return dl_fail(err, DL_EUNSUPPORTED, "%s: the zip archive spans several disks", fname);
		/* its size field counts what follows the first 12 bytes */
		if (at > loc_at || loc_at - at < ZIP64_END_SIZE || rd32(buf + at) != ZIP64_END_SIG ||
			rd64(buf + at + 4) != loc_at - at - 12)
			return dl_fail(err, DL_EFORMAT, "%s: the zip archive's ZIP64 end record is missing or misplaced",
						   fname);
		z = buf + at;
		if (rd32(z + 16) != 0 || rd32(z + 20) != 0 || rd64(z + 24) != rd64(z + 32))
			return dl_fail(err, DL_EUNSUPPORTED, "%s: the zip archive spans several disks", fname);
		/* the classic record holds each value, or all ones where it does not fit */
		if ((n != 0xFFFF && n != rd64(z + 32)) || (len != 0xFFFFFFFF && len != rd64(z + 40)) ||
			(off != 0xFFFFFFFF && off != rd64(z + 48)))
			return dl_fail(err, DL_EFORMAT, "%s: the zip archive's end record and ZIP64 end record disagree",
						   fname);
		n = rd64(z + 32);
		len = rd64(z + 40);
		off = rd64(z + 48);
		dir_end = at;
	}
	if (off > dir_end || len != dir_end - off)
		return dl_fail(err, DL_EFORMAT, "%s: the zip central directory (%llu bytes at offset %llu) does not end where the end records begin (offset %zu)",
					   fname, (unsigned long long) len, (unsigned long long) off, dir_end);
	if (n == 0 || n > len / ZIP_CENTRAL_SIZE)
		return dl_fail(err, DL_EFORMAT, "%s: the zip archive claims %llu entries in a central directory of %llu bytes",
					   fname, (unsigned long long) n, (unsigned long long) len);
	*cd_off = off;
	*cd_len = len;
	*count = n;
	return DL_OK;
}

/*
 * Walk an extra field (records of id, length, data), which must tile its len bytes;
 * *z64 / *z64_len: the ZIP64 record's data (NULL when there is none). False if malformed.
 */
static bool
zip_extra(const uint8_t *x, size_t len, const uint8_t **z64, size_t *z64_len)
{
	*z64 = NULL;
	*z64_len = 0;
	while (len > 0)
	{
		uint16_t	id,
					n;

		if (len < 4)
			return false;
		id = rd16(x);
		n = rd16(x + 2);
		if (n > len - 4 || (id == ZIP64_EXTRA_ID && *z64))
			return false;
		if (id == ZIP64_EXTRA_ID)
		{
			*z64 = x + 4;
			*z64_len = n;
		}
		x += 4 + (size_t) n;
		len -= 4 + (size_t) n;
	}
	return true;
}

/* Read the central record at p (avail bytes left in the directory) into e; *used: its length. */
static dl_status
zip_central(const uint8_t *p, uint64_t avail, size_t idx, const char *fname, zip_entry *e,
			uint64_t *used, dl_error *err)
{
	uint64_t   *wide[3] = {&e->size, &e->csize, &e->header};
	const uint8_t *z64;
	size_t		z64_len,
				k = 0,
				nlen,
				xlen,
				clen;
	uint32_t	disk;
	char		nm[128];

	if (avail < ZIP_CENTRAL_SIZE || rd32(p) != ZIP_CENTRAL_SIG)
		return dl_fail(err, DL_EFORMAT, "%s: the zip central directory is damaged at entry %zu", fname, idx);
	nlen = rd16(p + 28);
	xlen = rd16(p + 30);
	clen = rd16(p + 32);
	if (avail - ZIP_CENTRAL_SIZE < nlen + xlen + clen)
		return dl_fail(err, DL_EFORMAT, "%s: the zip central directory is damaged at entry %zu", fname, idx);
	e->name = p + ZIP_CENTRAL_SIZE;
	e->name_len = nlen;
	e->flags = rd16(p + 8);
	e->method = rd16(p + 10);
	e->crc = rd32(p + 16);
	e->csize = rd32(p + 20);
	e->size = rd32(p + 24);
	e->header = rd32(p + 42);
	disk = rd16(p + 34);
	dl_shown(nm, sizeof(nm), e->name, nlen);
	if (nlen == 0)
		return dl_fail(err, DL_EFORMAT, "%s: zip entry %zu has no name", fname, idx);
	if (!zip_extra(p + ZIP_CENTRAL_SIZE + nlen, xlen, &z64, &z64_len))
		return dl_fail(err, DL_EFORMAT, "%s: zip entry \"%s\" has a damaged extra field", fname, nm);
	/* ZIP64: the values that do not fit are all ones and follow in this order (APPNOTE 4.5.3) */
	for (int f = 0; f < 3; f++)
		if (*wide[f] == 0xFFFFFFFF)
		{
			if (z64_len < k + 8)
				return dl_fail(err, DL_EFORMAT, "%s: zip entry \"%s\" lacks its ZIP64 sizes", fname, nm);
			*wide[f] = rd64(z64 + k);
			k += 8;
		}
	if (disk == 0xFFFF)
	{
		if (z64_len < k + 4)
			return dl_fail(err, DL_EFORMAT, "%s: zip entry \"%s\" lacks its ZIP64 disk number", fname, nm);
		disk = rd32(z64 + k);
	}
	if (disk != 0)
		return dl_fail(err, DL_EUNSUPPORTED, "%s: the zip archive spans several disks", fname);
	if (e->flags & (ZIP_FLAG_ENCRYPTED | ZIP_FLAG_STRONG_ENCRYPTION))
		return dl_fail(err, DL_EUNSUPPORTED, "%s: zip entry \"%s\" is encrypted", fname, nm);
	if (e->method == ZIP_STORED && e->csize != e->size)
		return dl_fail(err, DL_EFORMAT, "%s: zip entry \"%s\" is stored but its sizes differ (%llu and %llu)",
					   fname, nm, (unsigned long long) e->csize, (unsigned long long) e->size);
	*used = ZIP_CENTRAL_SIZE + nlen + xlen + clen;
	return DL_OK;
}

/* Whether the local header at p states e's sizes (all ones: in its ZIP64 field, uncompressed first). */
static bool
local_sizes_match(const uint8_t *p, const uint8_t *z64, size_t z64_len, const zip_entry *e)
{
	uint32_t	cs = rd32(p + 18),
				us = rd32(p + 22);

	if (cs == 0xFFFFFFFF || us == 0xFFFFFFFF)
		return z64 && z64_len >= 16 && rd64(z64) == e->size && rd64(z64 + 8) == e->csize;
	return rd32(p + 14) == e->crc && cs == e->csize && us == e->size;
}

/* Check e's local header against its central record; set its data offset and its end. */
static dl_status
zip_local(const uint8_t *buf, size_t size, const char *fname, zip_entry *e, dl_error *err)
{
	const uint8_t *p,
			   *z64;
	size_t		z64_len,
				nlen,
				xlen;
	char		nm[128];

	dl_shown(nm, sizeof(nm), e->name, e->name_len);
	if (e->header > size || size - e->header < ZIP_LOCAL_SIZE || rd32(buf + e->header) != ZIP_LOCAL_SIG)
		return dl_fail(err, DL_EFORMAT, "%s: zip entry \"%s\" has no local header at offset %llu",
					   fname, nm, (unsigned long long) e->header);
	p = buf + e->header;
	nlen = rd16(p + 26);
	xlen = rd16(p + 28);
	if (size - e->header - ZIP_LOCAL_SIZE < nlen + xlen)
		return dl_fail(err, DL_EFORMAT, "%s: the local header of zip entry \"%s\" runs past the end of the file",
					   fname, nm);
	if (nlen != e->name_len || memcmp(p + ZIP_LOCAL_SIZE, e->name, nlen) != 0 ||
		rd16(p + 6) != e->flags || rd16(p + 8) != e->method)
		return dl_fail(err, DL_EFORMAT, "%s: the local header of zip entry \"%s\" disagrees with the central directory (name, flags or method)",
					   fname, nm);
	if (!zip_extra(p + ZIP_LOCAL_SIZE + nlen, xlen, &z64, &z64_len))
		return dl_fail(err, DL_EFORMAT, "%s: the local header of zip entry \"%s\" has a damaged extra field",
					   fname, nm);
	e->data = e->header + ZIP_LOCAL_SIZE + nlen + xlen;
	if (e->csize > size - e->data)
		return dl_fail(err, DL_EFORMAT, "%s: zip entry \"%s\" (%llu bytes at offset %llu) runs past the end of the file (%zu bytes)",
					   fname, nm, (unsigned long long) e->csize, (unsigned long long) e->data, size);
	e->end = e->data + e->csize;
	if (!(e->flags & ZIP_FLAG_DESCRIPTOR))
	{
		if (!local_sizes_match(p, z64, z64_len, e))
			return dl_fail(err, DL_EFORMAT, "%s: the local header of zip entry \"%s\" disagrees with the central directory (CRC or sizes)",
						   fname, nm);
	}
	else
	{
		/* after the data: an optional signature, the CRC, both sizes (8 bytes each with ZIP64) */
		size_t		w = z64 ? 8 : 4;
		uint64_t	at = e->end;

		if (size - at >= 4 && rd32(buf + at) == ZIP_DESCRIPTOR_SIG)
			at += 4;
		if (size - at < 4 + 2 * w || rd32(buf + at) != e->crc ||
			(w == 8 ? rd64(buf + at + 4) : rd32(buf + at + 4)) != e->csize ||
			(w == 8 ? rd64(buf + at + 12) : rd32(buf + at + 8)) != e->size)
			return dl_fail(err, DL_EFORMAT, "%s: the data descriptor of zip entry \"%s\" is missing or disagrees with the central directory",
						   fname, nm);
		e->end = at + 4 + 2 * w;
	}
	return DL_OK;
}

/* qsort: entries by local header offset. */
static int
entry_by_offset(const void *a, const void *b)
{
	const zip_entry *x = a,
			   *y = b;

	return (x->header > y->header) - (x->header < y->header);
}

/* memcmp order of two byte strings of different lengths. */
static int
name_cmp(const uint8_t *a, size_t alen, const void *b, size_t blen)
{
	int			c = memcmp(a, b, alen < blen ? alen : blen);

	return c != 0 ? c : (alen > blen) - (alen < blen);
}

/* qsort: entries by name. */
static int
entry_by_name(const void *a, const void *b)
{
	const zip_entry *x = a,
			   *y = b;

	return name_cmp(x->name, x->name_len, y->name, y->name_len);
}

/* Find an entry by name (binary search: the entries are sorted by name). */
const zip_entry *
zip_find(const zip_dir *z, const void *name, size_t len)
{
	size_t		lo = 0,
				hi = z->n;

	while (lo < hi)
	{
		size_t		mid = lo + (hi - lo) / 2;
		int			c = name_cmp(z->e[mid].name, z->e[mid].name_len, name, len);

		if (c == 0)
			return &z->e[mid];
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

/* Read and check the archive's directory into z (see zip.h); zip_free it even on failure. */
dl_status
zip_read(const uint8_t *buf, size_t size, const char *fname, zip_dir *z, dl_error *err)
{
	uint64_t	cd_off = 0,
				cd_len = 0,
				n = 0,
				at = 0;
	dl_status	st;

	st = zip_find_directory(buf, size, fname, &cd_off, &cd_len, &n, err);
	if (st != DL_OK)
		return st;
	z->e = calloc(n, sizeof(*z->e));
	if (z->e == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory reading %s", fname);
	z->n = n;
	for (size_t i = 0; i < n; i++)
	{
		uint64_t	used = 0;

		st = zip_central(buf + cd_off + at, cd_len - at, i, fname, &z->e[i], &used, err);
		if (st != DL_OK)
			return st;
		at += used;
	}
	if (at != cd_len)
		return dl_fail(err, DL_EFORMAT, "%s: the zip central directory has %llu bytes after its %llu entries",
					   fname, (unsigned long long) (cd_len - at), (unsigned long long) n);
	for (size_t i = 0; i < n; i++)
		if ((st = zip_local(buf, size, fname, &z->e[i], err)) != DL_OK)
			return st;
	qsort(z->e, n, sizeof(*z->e), entry_by_offset);
	for (size_t i = 0; i < n; i++)
	{
		uint64_t	next = i + 1 < n ? z->e[i + 1].header : cd_off;

		if (z->e[i].end > next)
		{
			char		nm[128];

			return dl_fail(err, DL_EFORMAT, "%s: zip entry \"%s\" (offsets %llu to %llu) overlaps %s at offset %llu",
						   fname, dl_shown(nm, sizeof(nm), z->e[i].name, z->e[i].name_len),
						   (unsigned long long) z->e[i].header, (unsigned long long) z->e[i].end,
						   i + 1 < n ? "the next entry" : "the central directory", (unsigned long long) next);
		}
	}
	qsort(z->e, n, sizeof(*z->e), entry_by_name);
	for (size_t i = 1; i < n; i++)
		if (entry_by_name(&z->e[i - 1], &z->e[i]) == 0)
		{
			char		nm[128];

			return dl_fail(err, DL_EFORMAT, "%s: zip entry \"%s\" appears twice",
						   fname, dl_shown(nm, sizeof(nm), z->e[i].name, z->e[i].name_len));
		}
	return DL_OK;
}

/* Stored entries can be used in place; compressed ones are refused. */
dl_status
zip_check_stored(const zip_entry *e, const char *fname, dl_error *err)
{
	char		nm[128];

	if (e->method == ZIP_STORED)
		return DL_OK;
	dl_fail(err, DL_EUNSUPPORTED, "%s: zip entry \"%s\" is compressed (method %d); only stored entries are read, in place",
			fname, dl_shown(nm, sizeof(nm), e->name, e->name_len), e->method);
	return dl_hint(err, "torch.save stores every entry: save the state dict again with torch.save rather than rewriting the archive with another zip tool.");
}

void
zip_free(zip_dir *z)
{
	free(z->e);
	z->e = NULL;
	z->n = 0;
}

