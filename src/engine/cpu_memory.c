/*
 * cpu_memory.c: the CPU backend's memory, which is host memory: allocation checked against
 * what the host can back, copies in every direction (plain memcpy: operations are
 * synchronous here), and upload_tensor, which converts safetensors data to float32, or
 * to bfloat16 matrices, with rows permuted if asked.
 */
#include "backend_cpu.h"
#include "bf16.h"
#include "sysinfo.h"

#include <stdlib.h>
#include <string.h>

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

/*
 * Matrices in bfloat16: each row (or, without a permutation, each run of up to 64K
 * elements) converted to float32 through a small buffer, then rounded.
 */
static dl_status
upload_bf16(uint16_t *dst, const st_tensor *t, int64_t cols, const int32_t *rows, dl_error *err)
{
	int64_t		unit = rows ? cols : (t->numel < 65536 ? t->numel : 65536);
	float	   *buf = malloc((size_t) (unit ? unit : 1) * sizeof(float));
	dl_status	st = DL_OK;

	if (buf == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory converting tensor \"%s\"", t->name);
	for (int64_t off = 0, r = 0; off < t->numel && st == DL_OK; off += unit, r++)
	{
		int64_t		n = t->numel - off < unit ? t->numel - off : unit;

		st = st_range_to_f32(t, rows ? (int64_t) rows[r] * cols : off, n, buf, err);
		for (int64_t i = 0; i < n && st == DL_OK; i++)
			dst[off + i] = float_to_bf16(buf[i]);
	}
	free(buf);
	return st;
}

/* Convert to the format (float32, or bfloat16 matrices), then permute rows if asked. */
dl_status
cpu_upload_tensor(dl_backend *be, void *dst, dl_fmt fmt, const st_tensor *t,
				  const int32_t *rows, dl_error *err)
{
	int64_t		cols = t->ndim > 1 ? t->shape[t->ndim - 1] : 1;
	int64_t		nrows = cols ? t->numel / cols : 0;
	float	   *tmp;
	dl_status	st;

	if (fmt == DL_FMT_WEIGHT && cpu_of(be)->bf16)
		return upload_bf16(dst, t, cols, rows, err);
	if (rows == NULL)
		return st_to_f32(t, dst, err);
	tmp = malloc((size_t) t->numel * sizeof(float));
	if (tmp == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory converting tensor \"%s\"", t->name);
	st = st_to_f32(t, tmp, err);
	if (st == DL_OK)
		for (int64_t r = 0; r < nrows; r++)
			memcpy((float *) dst + r * cols, tmp + (int64_t) rows[r] * cols, cols * sizeof(float));
	free(tmp);
	return st;
}
