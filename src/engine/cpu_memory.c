/*
 * cpu_memory.c: the CPU backend's memory, which is host memory: allocation checked against
 * what the host can back, copies in every direction (plain memcpy: operations are
 * synchronous here), and upload_tensor, which converts a tensor of the weight files to
 * float32, or to bfloat16 matrices, with rows permuted if asked, on the pool.
 */
#include "backend_cpu.h"
#include "bf16.h"
#include "sysinfo.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Allocations from this size on are checked against the memory the host has left... */
#define CPU_CHECKED_BYTES ((size_t) 64 << 20)
/* ...of which they leave this much to the rest of the system (PostgreSQL's own processes) */
#define CPU_HEADROOM_BYTES (256LL << 20)

/*
 * Host memory, CPU_ALIGN-aligned. A large allocation the host cannot back fails here:
 * with overcommit malloc would succeed, and the kernel would kill the process (and with
 * it every session of the server) once the pages were touched.
 */
void *
cpu_alloc(dl_backend *be, size_t bytes, dl_error *err)
{
	void	   *p;
	long long	avail = bytes >= CPU_CHECKED_BYTES ? sys_mem_available() : -1;

	(void) be;
	bytes = (bytes + CPU_ALIGN - 1) / CPU_ALIGN * CPU_ALIGN;
	if (avail >= 0 && (long long) bytes > avail - CPU_HEADROOM_BYTES)
	{
		dl_fail(err, DL_ENOMEM, "out of memory on the CPU: %.1f MB needed, %.1f MB available "
				"(%lld MB of it left to the rest of the system)",
				bytes / 1048576.0, avail / 1048576.0, CPU_HEADROOM_BYTES >> 20);
		return NULL;
	}
	p = aligned_alloc(CPU_ALIGN, bytes ? bytes : CPU_ALIGN);
	if (p == NULL)
		dl_fail(err, DL_ENOMEM, "out of memory on the CPU: %.1f MB needed", bytes / 1048576.0);
	return p;
}

/* Free cpu_alloc's memory. */
void
cpu_free(dl_backend *be, void *ptr)
{
	(void) be;
	free(ptr);
}

/* memset to zero. */
void
cpu_zero(dl_backend *be, void *dst, size_t bytes)
{
	(void) be;
	memset(dst, 0, bytes);
}

/* Within the "device": a copy. */
void
cpu_copy(dl_backend *be, void *dst, const void *src, size_t bytes)
{
	(void) be;
	memcpy(dst, src, bytes);
}

/* Host to "device" and back (upload and download): a copy, as operations are synchronous. */
dl_status
cpu_transfer(dl_backend *be, void *dst, const void *src, size_t bytes, dl_error *err)
{
	(void) be;
	(void) err;
	memcpy(dst, src, bytes);
	return DL_OK;
}

/* Nothing is ever queued. */
dl_status
cpu_synchronize(dl_backend *be, dl_error *err)
{
	(void) be;
	(void) err;
	return DL_OK;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23	/* Linux's value, for C libraries older than the flag */
#endif

/*
 * Map the whole pages of [p, p + bytes) at once (Linux 5.14's MADV_POPULATE_WRITE; older
 * kernels refuse it and the copy faults them in as before): a fault per 4 KB page of a
 * fresh allocation costs more than the copy itself, most of all in a virtual machine.
 */
static void
prefault(void *p, size_t bytes)
{
	uintptr_t	page = (uintptr_t) sysconf(_SC_PAGESIZE),
				lo = ((uintptr_t) p + page - 1) & ~(page - 1),
				hi = ((uintptr_t) p + bytes) & ~(page - 1);

	if (hi > lo)
		madvise((void *) lo, hi - lo, MADV_POPULATE_WRITE);
}

/* One upload_tensor: dst (float32, or bfloat16) from t, row r from row rows[r] when rows is not NULL. */
typedef struct upload_args
{
	void	   *dst;
	int			bf16;
	const st_tensor *t;
	const int32_t *rows;
	int64_t		cols;
	float	  **widen;			/* bf16: per thread, WIDEN_FLOATS for F32 and F16 sources */
} upload_args;

/* elements of a tensor below which one upload task is not worth sharing out (4 MB of floats) */
#define UPLOAD_TASK_ELEMS ((int64_t) 1 << 20)

/*
 * Elements [lo, hi) of dst, in runs that are contiguous in the file (to the end of a row
 * under a permutation): the file's bytes copied as they are where the formats agree,
 * widened to float32, or rounded to bfloat16 through the thread's buffer.
 */
static void
upload_rows(const void *ctx, size_t lo_, size_t hi_, int thread)
{
	const upload_args *a = ctx;
	int64_t		lo = (int64_t) lo_,
				hi = (int64_t) hi_,
				n;
	size_t		es = a->bf16 ? 2 : 4;

	prefault((char *) a->dst + lo * es, (size_t) (hi - lo) * es);
	for (int64_t e = lo; e < hi; e += n)
	{
		int64_t		r = a->rows ? e / a->cols : 0,
					end = a->rows && (r + 1) * a->cols < hi ? (r + 1) * a->cols : hi,
					from = a->rows ? (int64_t) a->rows[r] * a->cols + e - r * a->cols : e;
		uint16_t   *d16 = (uint16_t *) a->dst + e;

		n = end - e;
		if (!a->bf16)
			st_range_to_f32(a->t, from, n, (float *) a->dst + e, NULL);
		else if (a->t->dtype == ST_BF16)
			memcpy(d16, a->t->data + from * 2, (size_t) n * 2);
		else
		{
			n = n < (int64_t) WIDEN_FLOATS ? n : (int64_t) WIDEN_FLOATS;
			st_range_to_f32(a->t, from, n, a->widen[thread], NULL);
			for (int64_t i = 0; i < n; i++)
				d16[i] = float_to_bf16(a->widen[thread][i]);
		}
	}
}

/*
 * Convert to the format (float32, or bfloat16 matrices) with rows permuted if asked, on
 * the pool: a load runs at the speed of memory, not of one core.
 */
dl_status
cpu_upload_tensor(dl_backend *be, void *dst, dl_fmt fmt, const st_tensor *t,
				  const int32_t *rows, dl_error *err)
{
	int64_t		cols = t->ndim > 1 ? t->shape[t->ndim - 1] : 1;
	int64_t		nrows = cols ? t->numel / cols : 0;
	int64_t		tasks = (t->numel + UPLOAD_TASK_ELEMS - 1) / UPLOAD_TASK_ELEMS;
	upload_args a = {dst, fmt == DL_FMT_WEIGHT && cpu_of(be)->bf16, t, rows, cols, cpu_of(be)->widen};

	if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
		return dl_fail(err, DL_EUNSUPPORTED, "tensor \"%s\" is neither F32, F16 nor BF16", t->name);
	for (int64_t r = 0; rows && r < nrows; r++)
		if (rows[r] < 0 || rows[r] >= nrows)
			return dl_fail(err, DL_EINVAL, "tensor \"%s\": row %d of %lld does not exist",
						   t->name, rows[r], (long long) nrows);
	cpu_for_rows(be, (size_t) t->numel, (int) (tasks < 4 * cpu_threads(be) ? tasks : 4 * cpu_threads(be)),
				 upload_rows, &a);
	return DL_OK;
}
