/*
 * zip.h: zip archives read in place (in a mapping), as PyTorch checkpoints need them.
 *
 * zip_read checks the whole directory before anything is read from it: the end record
 * closes the file; with ZIP64 (miniz, torch's writer, uses it past 4 GB) the values come
 * from the ZIP64 end record, which sits right before its locator; the central directory
 * ends where the end records begin; every entry's local header agrees with its central
 * record (name, flags, method; CRC and sizes, or the data descriptor after the data when
 * flag 3 is set, 8-byte sizes where the local header has a ZIP64 field, as miniz writes
 * it); entries lie inside the file, before the directory, without overlapping; no name
 * appears twice; nothing is encrypted or spread over disks. Only stored entries can be
 * used in place: zip_check_stored refuses compressed ones.
 */
#ifndef DOLLY_ZIP_H
#define DOLLY_ZIP_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

/* One entry, from its central record and its local header; offsets are in the file. */
typedef struct zip_entry
{
	const uint8_t *name;		/* not NUL-terminated, any bytes */
	size_t		name_len;
	uint16_t	flags;
	uint16_t	method;			/* 0: stored */
	uint32_t	crc;
	uint64_t	size;			/* uncompressed */
	uint64_t	csize;			/* as stored in the file */
	uint64_t	header;			/* the local header */
	uint64_t	data;
	uint64_t	end;			/* past the data and its descriptor */
} zip_entry;

/* The entries of an archive, sorted by name; e[i] refers into the file image. */
typedef struct zip_dir
{
	zip_entry  *e;
	size_t		n;
} zip_dir;

/* Read and check the directory of the archive image buf (see above); fname names it in messages. */
dl_status	zip_read(const uint8_t *buf, size_t size, const char *fname, zip_dir *z, dl_error *err);

/* The entry whose name is the len bytes at name; NULL if there is none. */
const zip_entry *zip_find(const zip_dir *z, const void *name, size_t len);

/* DL_OK if e is stored (can be used in place), else an error naming it. */
dl_status	zip_check_stored(const zip_entry *e, const char *fname, dl_error *err);

/* CRC-32 of n bytes as zip computes it. */
uint32_t	zip_crc32(const uint8_t *p, size_t n);

/* Free what zip_read allocated (the file image is the caller's). */
void		zip_free(zip_dir *z);

#endif
