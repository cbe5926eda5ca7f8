/*
 * safetensors.h: memory-mapped reader (and writer) of Hugging Face safetensors files.
 *
 * Format: u64 little-endian header length N | N bytes of JSON | tensor data.
 * Validation follows the reference reader (safetensors/src/tensor.rs): N <= 100,000,000,
 * no duplicate names, data_offsets that tile the data area from 0 without holes or
 * overlaps, END - BEGIN == numel * dtype size, and 8 + N + last END == file size.
 * A model directory holds model.safetensors, or model.safetensors.index.json naming its
 * shards; failing those, PyTorch's pytorch_model.bin or pytorch_model.bin.index.json, whose
 * .bin files torch_ckpt.c reads into the same tensor table.
 *
 * safetensors.c implements the format (st_parse, conversions, st_write); weights.c the
 * model directory (st_open to st_close).
 */
#ifndef DOLLY_SAFETENSORS_H
#define DOLLY_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

#define ST_MAX_DIMS 8

typedef enum st_dtype
{
	ST_BOOL, ST_U8, ST_I8, ST_I16, ST_U16, ST_F16, ST_BF16, ST_I32, ST_U32,
	ST_F32, ST_F64, ST_I64, ST_U64, ST_F8_E4M3, ST_F8_E5M2
} st_dtype;

typedef struct st_tensor
{
	char	   *name;
	st_dtype	dtype;
	int			ndim;
	int64_t		shape[ST_MAX_DIMS];
	int64_t		numel;
	size_t		nbytes;
	const uint8_t *data;		/* points into the mapping; not aligned in general */
	int			file;			/* index of the shard it lives in */
} st_tensor;

typedef struct st_set
{
	int			nfiles;
	char	  **paths;			/* one per shard */
	void	  **maps;			/* mmap'd shards */
	size_t	   *sizes;
	int			ntensors;
	st_tensor  *tensors;		/* sorted by name */
} st_set;

/* Size in bytes of one element of dtype. */
size_t		st_dtype_size(st_dtype dtype);

/* Name of dtype as safetensors spells it ("BF16"). */
const char *st_dtype_name(st_dtype dtype);


/*
 * Parse and validate one whole file image (header and data) held in memory.
 * On success *tensors (malloc'd, each name malloc'd, data pointing into buf) and *n
 * are set. fname only names the file in error messages. Used by st_open and the fuzzer.
 */
dl_status	st_parse(const uint8_t *buf, size_t size, const char *fname,
					 st_tensor **tensors, int *n, dl_error *err);

/* Sort n tensors by name; the index of the first whose name repeats its predecessor's, or 0. */
int			st_sort_by_name(st_tensor *tensors, int n);

/* Free what st_parse returned. */
void		st_free_tensors(st_tensor *tensors, int n);

/* Open a model directory (single file or sharded through the index, safetensors or .bin). */
dl_status	st_open(const char *dir, st_set **out, dl_error *err);

/* Open a single .safetensors file. */
dl_status	st_open_file(const char *path, st_set **out, dl_error *err);

/* Find a tensor by name; NULL if absent. */
const st_tensor *st_find(const st_set *set, const char *name);

/* Convert a F32, F16 or BF16 tensor to float32 into dst (numel floats). */
dl_status	st_to_f32(const st_tensor *t, float *dst, dl_error *err);

/* The same for elements [first, first + n) of t only (a row, say), into dst (n floats). */
dl_status	st_range_to_f32(const st_tensor *t, int64_t first, int64_t n, float *dst, dl_error *err);

/*
 * Rows [first, first + n) of t (at least one dimension) as a tensor of their own: a view of
 * the same bytes under the same name, so that a large tensor can be loaded a part at a time.
 */
st_tensor	st_rows(const st_tensor *t, int64_t first, int64_t n);

/*
 * The process is done with t's bytes: where they lie in one of set's file mappings, its
 * pages are dropped from the mapping (madvise MADV_DONTNEED), so that they stop counting
 * in the process's resident memory; the page cache keeps them, and a later read of the
 * same bytes (a neighbour's on a shared page) finds them there. Bytes outside the
 * mappings (a copy in memory) are left alone. A load calls this once a tensor is copied.
 */
void		st_release(const st_set *set, const st_tensor *t);

/* Unmap and free everything. NULL is accepted. */
void		st_close(st_set *set);

/* A tensor to write: name, dtype, shape, and its bytes in that dtype. */
typedef struct st_write_tensor
{
	const char *name;
	st_dtype	dtype;
	int			ndim;
	int64_t		shape[ST_MAX_DIMS];
	const void *data;
} st_write_tensor;

/*
 * Write a safetensors file at path (header padded with spaces to a multiple of 8,
 * tensors in the order given, optional __metadata__ given as key/value pairs).
 * Written to path + ".tmp", fsync'd and renamed, so a crash never leaves a partial file.
 */
dl_status	st_write(const char *path, const st_write_tensor *tensors, int n,
					 const char *const *meta_kv, int nmeta, dl_error *err);

/*
 * The bytes to write for tensor t, asked for just before they are written: *data is
 * t->data, or bytes of the hook's own in t's dtype and shape, valid until its next call.
 */
typedef dl_status (*st_write_hook) (void *arg, const st_write_tensor *t, const void **data,
									dl_error *err);

/*
 * st_write, each tensor's bytes given by hook(arg, ...): a file of tensors computed one
 * at a time (lora_merge) never holds more than one of them in memory.
 */
dl_status	st_write_hooked(const char *path, const st_write_tensor *tensors, int n,
							const char *const *meta_kv, int nmeta, st_write_hook hook,
							void *arg, dl_error *err);

#endif
