/*
 * backend_cpu.c: the CPU backend, the reference implementation of backend.h.
 *
 * Device memory is host memory; weights, activations and the KV cache are float32.
 * Matrix products with many rows go to OpenBLAS: each pool thread multiplies its own
 * slice of the weight's rows with a single-threaded cblas_sgemm, so one set of threads
 * does all the work and never competes with OpenBLAS's own threads for the cores; those
 * with a few rows (decode steps) to a kernel of our own that streams the weights once.
 * Everything else runs as tasks over rows or heads on the same pool. exp, tanh and erf
 * are written out below so that the loops vectorise (libm's are scalar calls).
 */
#include "backend.h"
#include "bf16.h"
#include "sysinfo.h"
#include "threadpool.h"

#include <cblas.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define CPU_ALIGN 64
/* query tokens of one sequence per attention task (rows of its score block) */
#define ATTN_QBLOCK 32

/* floats of W's rows a thread widens from bfloat16 at a time for one sgemm (4 MB) */
#define WIDEN_FLOATS ((size_t) 1 << 20)

typedef struct cpu_backend
{
	dl_backend	be;				/* first: a dl_backend * is a cpu_backend * */
	dl_threadpool *pool;
	int			bf16;			/* matrices in bfloat16 (weight_elem_size 2) */
	float	  **widen;			/* bf16: per thread, WIDEN_FLOATS for mm_sgemm */
} cpu_backend;

/* The pool behind a backend. */
static inline dl_threadpool *
pool_of(dl_backend *be)
{
	return ((cpu_backend *) be)->pool;
}

/* Split n items into ntasks nearly equal ranges; task i gets [*lo, *hi). */
static inline void
task_range(int n, int ntasks, int i, int *lo, int *hi)
{
	*lo = (int) ((long long) n * i / ntasks);
	*hi = (int) ((long long) n * (i + 1) / ntasks);
}

/* floats of work below which a task is not worth handing to another thread */
#define MIN_TASK_FLOATS 8192

/*
 * Tasks for n rows of per_row floats: a few per thread for balance, never more than
 * rows, nor so many that a task has under MIN_TASK_FLOATS (the few rows of a decode
 * step take less time to do than to share out).
 */
static int
row_tasks(dl_backend *be, int n, size_t per_row)
{
	size_t		t = (size_t) threadpool_size(pool_of(be)) * 4,
				by_size = (n * per_row + MIN_TASK_FLOATS - 1) / MIN_TASK_FLOATS;

	t = by_size < t ? by_size : t;
	return (size_t) n < t ? n : (int) t;
}

/* --- vectorisable helpers --- */

/* The widest float vector the target has: gcc's vector extension, so any ISA compiles. */
#if defined(__AVX512F__)
#define VEC_LANES 16
#elif defined(__AVX__)
#define VEC_LANES 8
#else
#define VEC_LANES 4
#endif

typedef float vfloat __attribute__((vector_size(VEC_LANES * sizeof(float))));

/* VEC_LANES floats from p, any alignment. */
static inline vfloat
vload(const float *p)
{
	vfloat		v;

	memcpy(&v, p, sizeof(v));
	return v;
}

typedef uint16_t vbf16 __attribute__((vector_size(VEC_LANES * sizeof(uint16_t))));
typedef uint32_t vu32 __attribute__((vector_size(VEC_LANES * sizeof(uint32_t))));

/* VEC_LANES bfloat16 from p widened to float32: a bfloat16 is a float's upper 16 bits. */
static inline vfloat
vload_bf16(const uint16_t *p)
{
	vbf16		h;
	vu32		u;
	vfloat		v;

	memcpy(&h, p, sizeof(h));
	u = __builtin_convertvector(h, vu32) << 16;
	memcpy(&v, &u, sizeof(v));
	return v;
}

/* Element i of a matrix in weight format (bf16 or float32) as float32. */
static inline float
weight_at(const void *W, size_t i, int bf16)
{
	return bf16 ? bf16_to_float(((const uint16_t *) W)[i]) : ((const float *) W)[i];
}

/* Sum of the lanes of v. */
static inline float
vhsum(vfloat v)
{
#if defined(__AVX512F__)
	return _mm512_reduce_add_ps((__m512) v);
#else
	float		s = 0.0f;

	for (int i = 0; i < VEC_LANES; i++)
		s += v[i];
	return s;
#endif
}

/* Dot product of a (float32) and b (float32, or bfloat16 widened when bf16), n values. */
static inline float
vdot(const float *a, const void *b, int n, int bf16)
{
	vfloat		acc = {0};
	float		s;
	int			i = 0;

	if (bf16)
		for (; i + VEC_LANES <= n; i += VEC_LANES)
			acc += vload(a + i) * vload_bf16((const uint16_t *) b + i);
	else
		for (; i + VEC_LANES <= n; i += VEC_LANES)
			acc += vload(a + i) * vload((const float *) b + i);
	s = vhsum(acc);
	for (; i < n; i++)
		s += a[i] * weight_at(b, i, bf16);
	return s;
}

/* y[i] += alpha x[i], x float32 or (bf16) bfloat16, n values. */
static inline void
vaxpy(float *restrict y, const void *restrict x, float alpha, int n, int bf16)
{
	int			i = 0;

	for (; i + VEC_LANES <= n; i += VEC_LANES)
	{
		vfloat		yv = vload(y + i) + alpha * (bf16 ? vload_bf16((const uint16_t *) x + i)
											 : vload((const float *) x + i));

		memcpy(y + i, &yv, sizeof(yv));
	}
	for (; i < n; i++)
		y[i] += alpha * weight_at(x, i, bf16);
}

/* Sum of a[i]. */
static inline float
vsum(const float *a, int n)
{
	float		acc[16] = {0};
	float		s = 0.0f;
	int			i = 0;

	for (; i + 16 <= n; i += 16)
		for (int j = 0; j < 16; j++)
			acc[j] += a[i + j];
	for (; i < n; i++)
		s += a[i];
	for (int j = 0; j < 16; j++)
		s += acc[j];
	return s;
}

/* Largest a[i] (n >= 1). */
static inline float
vmax(const float *a, int n)
{
	float		acc[16];
	float		m = a[0];
	int			i = 0;

	for (int j = 0; j < 16; j++)
		acc[j] = a[0];
	for (; i + 16 <= n; i += 16)
		for (int j = 0; j < 16; j++)
			acc[j] = a[i + j] > acc[j] ? a[i + j] : acc[j];
	for (; i < n; i++)
		m = a[i] > m ? a[i] : m;
	for (int j = 0; j < 16; j++)
		m = acc[j] > m ? acc[j] : m;
	return m;
}

/*
 * exp(x) for float32 (Cephes expf: x = n ln2 + r, a degree-6 polynomial in r, 2^n put
 * into the exponent bits), within 2 ulp where the result is a normal float. Below
 * -87 it returns a value under 1e-29 rather than 0, above 88 a huge finite value or
 * infinity; non-finite inputs give unspecified values. The comparisons are 0/1 values,
 * not branches, and floor is done by hand, so that loops calling it vectorise without
 * -ffast-math (gcc will not if-convert float selects or vectorise floorf otherwise).
 */
static inline float
fast_expf(float x)
{
	float		t = x * 1.44269504088896341f + 0.5f;
	float		fx,
				y,
				r,
				r2,
				scale;
	int32_t		n,
				bits;

	t += (float) (t < -127.0f) * (-127.0f - t);
	t -= (float) (t > 128.0f) * (t - 128.0f);
	n = (int32_t) t;
	n -= (float) n > t;			/* floor */
	fx = (float) n;
	r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
	r2 = r * r;
	y = 1.9875691500e-4f;
	y = y * r + 1.3981999507e-3f;
	y = y * r + 8.3334519073e-3f;
	y = y * r + 4.1665795894e-2f;
	y = y * r + 1.6666665459e-1f;
	y = y * r + 5.0000001201e-1f;
	y = y * r2 + r + 1.0f;
	n = n < -126 ? -126 : n;
	n = n > 127 ? 127 : n;
	bits = (n + 127) << 23;
	memcpy(&scale, &bits, sizeof(scale));
	return y * scale;
}

/* tanh(sqrt(2/pi) (x + 0.044715 x^3)), GELU's tanh form; tanh(u) = 1 - 2 / (exp(2u) + 1). */
static inline float
gelu_tanh_t(float x)
{
	float		u = 0.7978845608028654f * (x + 0.044715f * x * x * x);

	return 1.0f - 2.0f / (fast_expf(2.0f * u) + 1.0f);
}

/* GELU, tanh form (transformers' gelu_new). */
static inline float
gelu_tanh(float x)
{
	return 0.5f * x * (1.0f + gelu_tanh_t(x));
}

/* Its derivative: 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2). */
static inline float
gelu_tanh_grad(float x)
{
	float		t = gelu_tanh_t(x);

	return 0.5f * (1.0f + t) +
		0.5f * x * (1.0f - t * t) * 0.7978845608028654f * (1.0f + 0.134145f * x * x);
}

/*
 * The standard normal CDF Phi(x) with erf from Abramowitz and Stegun 7.1.26 (absolute
 * error below 1.5e-7, well inside the float32 tolerance of the tests); *gauss gets
 * exp(-x^2 / 2), which the derivative needs and the formula computes anyway.
 */
static inline float
normal_cdf(float x, float *gauss)
{
	float		z = fabsf(x) * 0.7071067811865476f;
	float		t = 1.0f / (1.0f + 0.3275911f * z);
	float		p = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
									 t * (-1.453152027f + t * 1.061405429f))));
	float		g = fast_expf(-z * z);

	*gauss = g;
	return 0.5f * (1.0f + copysignf(1.0f - p * g, x));
}

/* GELU, erf form (torch.nn.functional.gelu): x Phi(x). */
static inline float
gelu_erf(float x)
{
	float		g;

	return x * normal_cdf(x, &g);
}

/* Its derivative: Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi). */
static inline float
gelu_erf_grad(float x)
{
	float		g;
	float		cdf = normal_cdf(x, &g);

	return cdf + x * 0.3989422804014327f * g;
}

/* --- memory --- */

/* Allocations from this size on are checked against the memory the host has left... */
#define CPU_CHECKED_BYTES ((size_t) 64 << 20)
/* ...of which they leave this much to the rest of the system (PostgreSQL's own processes) */
#define CPU_HEADROOM_BYTES (256LL << 20)

/*
 * Host memory, CPU_ALIGN-aligned. A large allocation the host cannot back fails here:
 * with overcommit malloc would succeed, and the kernel would kill the process (and with
 * it every session of the server) once the pages were touched.
 */
static void *
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
static void
cpu_free(dl_backend *be, void *ptr)
{
	(void) be;
	free(ptr);
}

/* memset to zero. */
static void
cpu_zero(dl_backend *be, void *dst, size_t bytes)
{
	(void) be;
	memset(dst, 0, bytes);
}

/* Within the "device": a copy. */
static void
cpu_copy(dl_backend *be, void *dst, const void *src, size_t bytes)
{
	(void) be;
	memcpy(dst, src, bytes);
}

/* Host to "device": a copy. */
static dl_status
cpu_upload(dl_backend *be, void *dst, const void *src, size_t bytes, dl_error *err)
{
	(void) be;
	(void) err;
	memcpy(dst, src, bytes);
	return DL_OK;
}

/* "Device" to host: a copy (operations are synchronous here). */
static dl_status
cpu_download(dl_backend *be, void *dst, const void *src, size_t bytes, dl_error *err)
{
	(void) be;
	(void) err;
	memcpy(dst, src, bytes);
	return DL_OK;
}

/* Nothing is ever queued. */
static dl_status
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

/* One upload_tensor: dst (fmt) from t, row r from row rows[r] when rows is not NULL. */
typedef struct upload_args
{
	void	   *dst;
	int			bf16;			/* dst is bfloat16, else float32 */
	const st_tensor *t;
	const int32_t *rows;
	int64_t		cols;
	int64_t		numel;
	int			ntasks;
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
upload_task(void *arg, int task, int thread)
{
	upload_args *a = arg;
	int64_t		lo = a->numel * task / a->ntasks,
				hi = a->numel * (task + 1) / a->ntasks,
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
static dl_status
cpu_upload_tensor(dl_backend *be, void *dst, dl_fmt fmt, const st_tensor *t,
				  const int32_t *rows, dl_error *err)
{
	cpu_backend *cb = (cpu_backend *) be;
	int64_t		cols = t->ndim > 1 ? t->shape[t->ndim - 1] : 1;
	int64_t		nrows = cols ? t->numel / cols : 0;
	int64_t		tasks = (t->numel + UPLOAD_TASK_ELEMS - 1) / UPLOAD_TASK_ELEMS;
	upload_args a = {dst, fmt == DL_FMT_WEIGHT && cb->bf16, t, rows, cols, t->numel, 0, cb->widen};

	if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
		return dl_fail(err, DL_EUNSUPPORTED, "tensor \"%s\" is neither F32, F16 nor BF16", t->name);
	for (int64_t r = 0; rows && r < nrows; r++)
		if (rows[r] < 0 || rows[r] >= nrows)
			return dl_fail(err, DL_EINVAL, "tensor \"%s\": row %d of %lld does not exist",
						   t->name, rows[r], (long long) nrows);
	a.ntasks = (int) (tasks < 4 * be->threads ? tasks : 4 * be->threads);
	threadpool_run(cb->pool, upload_task, &a, a.ntasks);
	return DL_OK;
}

/* --- row copies: embedding and gather --- */

typedef struct rows_args
{
	float	   *out;
	const void *in;
	int			bf16;			/* in is bfloat16 */
	const int32_t *rows;
	int			n;
	int			C;
	int			ntasks;
} rows_args;

/* Copy rows [lo, hi) of the selection, widened to float32 from bfloat16 if need be. */
static void
rows_task(void *p, int task, int thread)
{
	rows_args  *a = p;
	int			lo,
				hi;

	(void) thread;
	task_range(a->n, a->ntasks, task, &lo, &hi);
	for (int i = lo; i < hi; i++)
	{
		float	   *o = a->out + (size_t) i * a->C;
		size_t		r = (size_t) a->rows[i] * a->C;

		if (a->bf16)
			for (int c = 0; c < a->C; c++)
				o[c] = bf16_to_float(((const uint16_t *) a->in)[r + c]);
		else
			memcpy(o, (const float *) a->in + r, a->C * sizeof(float));
	}
}

/* out[i] = in[rows[i]] over the pool. */
static void
copy_rows(dl_backend *be, float *out, const void *in, int bf16, const int32_t *rows, int n, int C)
{
	rows_args	a = {out, in, bf16, rows, n, C, row_tasks(be, n, C)};

	threadpool_run(pool_of(be), rows_task, &a, a.ntasks);
}

/* An embedding lookup is a gather of the table's rows. */
static void
cpu_embedding_forward(dl_backend *be, float *out, const void *table, const int32_t *ids,
					  int T, int C)
{
	copy_rows(be, out, table, ((cpu_backend *) be)->bf16, ids, T, C);
}

/* Rows whose logits are wanted. */
static void
cpu_gather_rows_forward(dl_backend *be, float *out, const float *in, const int32_t *rows,
						int n, int C)
{
	copy_rows(be, out, in, 0, rows, n, C);
}

typedef struct scatter_args
{
	float	   *dtable;
	const float *dout;
	const int32_t *ids;
	int			T;
	int			C;
	int			ntasks;
} scatter_args;

/*
 * Columns [c0, c1) of every row: tasks own columns, not rows, so that repeated ids
 * (the same token twice in a batch) never make two threads add to one element.
 */
static void
scatter_task(void *p, int task, int thread)
{
	scatter_args *a = p;
	int			c0,
				c1;

	(void) thread;
	task_range((a->C + 15) / 16, a->ntasks, task, &c0, &c1);
	c0 *= 16;
	c1 = c1 * 16 < a->C ? c1 * 16 : a->C;
	for (int t = 0; t < a->T; t++)
	{
		float	   *d = a->dtable + (size_t) a->ids[t] * a->C;
		const float *g = a->dout + (size_t) t * a->C;

		for (int c = c0; c < c1; c++)
			d[c] += g[c];
	}
}

/* Scatter-add of rows into the table's gradient, column blocks over the pool. */
static void
cpu_embedding_backward(dl_backend *be, float *dtable, const float *dout, const int32_t *ids,
					   int T, int C)
{
	int			blocks = (C + 15) / 16;
	int			nt = threadpool_size(pool_of(be));
	scatter_args a = {dtable, dout, ids, T, C, blocks < nt ? blocks : nt};

	threadpool_run(pool_of(be), scatter_task, &a, a.ntasks);
}

/* --- layer norm --- */

typedef struct ln_args
{
	float	   *out;
	float	   *mean;
	float	   *rstd;
	const float *in;
	const float *w;
	const float *b;
	int			T;
	int			C;
	float		eps;
	int			ntasks;
} ln_args;

/* Normalise rows [lo, hi): two passes (mean, then centred variance) for accuracy. */
static void
ln_task(void *p, int task, int thread)
{
	ln_args    *a = p;
	int			lo,
				hi;

	(void) thread;
	task_range(a->T, a->ntasks, task, &lo, &hi);
	for (int t = lo; t < hi; t++)
	{
		const float *x = a->in + (size_t) t * a->C;
		float	   *y = a->out + (size_t) t * a->C;
		float		acc[16] = {0};
		float		m = vsum(x, a->C) / a->C;
		float		var = 0.0f;
		float		rs;
		int			i = 0;

		for (; i + 16 <= a->C; i += 16)
			for (int j = 0; j < 16; j++)
				acc[j] += (x[i + j] - m) * (x[i + j] - m);
		for (; i < a->C; i++)
			var += (x[i] - m) * (x[i] - m);
		for (int j = 0; j < 16; j++)
			var += acc[j];
		rs = 1.0f / sqrtf(var / a->C + a->eps);
		for (i = 0; i < a->C; i++)
			y[i] = (x[i] - m) * rs * a->w[i] + a->b[i];
		if (a->mean)
			a->mean[t] = m;
		if (a->rstd)
			a->rstd[t] = rs;
	}
}

/* Layer norm over rows, on the pool. */
static void
cpu_layernorm_forward(dl_backend *be, float *out, float *mean, float *rstd, const float *in,
					  const float *w, const float *b, int T, int C, float eps)
{
	ln_args		a = {out, mean, rstd, in, w, b, T, C, eps, row_tasks(be, T, C)};

	threadpool_run(pool_of(be), ln_task, &a, a.ntasks);
}

/* columns whose parameter-gradient sums one pass keeps in double accumulators */
#define COLSUM_BLOCK 64

typedef struct lnb_args
{
	float	   *din;
	float	   *dw;
	float	   *db;
	const float *dout;
	const float *in;
	const float *mean;
	const float *rstd;
	const float *w;
	int			T;
	int			C;
	int			row_tasks;		/* tasks below: din by rows; the others: dw, db by columns */
	int			col_tasks;
} lnb_args;

/* din of rows [lo, hi): rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)). */
static void
lnb_rows(lnb_args *a, int lo, int hi)
{
	int			C = a->C;

	for (int t = lo; t < hi; t++)
	{
		const float *x = a->in + (size_t) t * C;
		const float *g = a->dout + (size_t) t * C;
		float	   *d = a->din + (size_t) t * C;
		float		m = a->mean[t],
					rs = a->rstd[t];
		float		acc1[16] = {0},
					acc2[16] = {0};
		float		s1 = 0.0f,
					s2 = 0.0f;
		int			i = 0;

		for (; i + 16 <= C; i += 16)
			for (int j = 0; j < 16; j++)
			{
				float		dxh = g[i + j] * a->w[i + j];

				acc1[j] += dxh;
				acc2[j] += dxh * (x[i + j] - m) * rs;
			}
		for (; i < C; i++)
		{
			float		dxh = g[i] * a->w[i];

			s1 += dxh;
			s2 += dxh * (x[i] - m) * rs;
		}
		for (int j = 0; j < 16; j++)
		{
			s1 += acc1[j];
			s2 += acc2[j];
		}
		s1 /= C;
		s2 /= C;
		for (i = 0; i < C; i++)
			d[i] += rs * (g[i] * a->w[i] - s1 - (x[i] - m) * rs * s2);
	}
}

/* dw and db of columns [c0, c1): sums over every row, in double. */
static void
lnb_cols(lnb_args *a, int c0, int c1)
{
	for (int cb = c0; cb < c1; cb += COLSUM_BLOCK)
	{
		int			n = c1 - cb < COLSUM_BLOCK ? c1 - cb : COLSUM_BLOCK;
		double		sw[COLSUM_BLOCK] = {0},
					sb[COLSUM_BLOCK] = {0};

		for (int t = 0; t < a->T; t++)
		{
			const float *x = a->in + (size_t) t * a->C + cb;
			const float *g = a->dout + (size_t) t * a->C + cb;
			float		m = a->mean[t],
						rs = a->rstd[t];

			for (int j = 0; j < n; j++)
			{
				sw[j] += (double) (g[j] * ((x[j] - m) * rs));
				sb[j] += g[j];
			}
		}
		for (int j = 0; j < n; j++)
		{
			a->dw[cb + j] += (float) sw[j];
			a->db[cb + j] += (float) sb[j];
		}
	}
}

/* One task of the layer norm backward: a block of rows, or a block of columns. */
static void
lnb_task(void *p, int task, int thread)
{
	lnb_args   *a = p;
	int			lo,
				hi;

	(void) thread;
	if (task < a->row_tasks)
	{
		task_range(a->T, a->row_tasks, task, &lo, &hi);
		lnb_rows(a, lo, hi);
		return;
	}
	task_range((a->C + 15) / 16, a->col_tasks, task - a->row_tasks, &lo, &hi);
	lnb_cols(a, lo * 16, hi * 16 < a->C ? hi * 16 : a->C);
}

/* Layer norm backward: din by rows and dw, db by columns, in one pass of the pool. */
static void
cpu_layernorm_backward(dl_backend *be, float *din, float *dw, float *db, const float *dout,
					   const float *in, const float *mean, const float *rstd, const float *w,
					   int T, int C)
{
	int			blocks = (C + 15) / 16;
	int			nt = threadpool_size(pool_of(be));
	lnb_args	a = {din, dw, db, dout, in, mean, rstd, w, T, C, row_tasks(be, T, C),
	blocks < nt ? blocks : nt};

	threadpool_run(pool_of(be), lnb_task, &a, a.row_tasks + a.col_tasks);
}

/* --- matrix product --- */

/*
 * Small M (decode: one row per sequence) does not go to sgemm, which packs its operands
 * on every call: with a few rows of in, packing W costs more than multiplying by it,
 * and the product is bound by reading W once anyway. Instead each task streams its
 * slice of W's rows once and computes, per tile of MMV_NB rows of W and up to MMV_MB
 * rows of in, all the dot products in vector registers (W's rows are contiguous
 * operands since W is [N, K]). Up to MMV_MAX_M rows; sgemm from there on, where its
 * packing pays for itself.
 *
 * With AVX-512, a 4 x 8 tile needs 37 of the 32 vector registers and gcc spills a few
 * accumulators to L1, yet it beats the spill-free 4 x 4 and 3 x 8 on decode products:
 * 8 rows of in (a decode batch of 8) take one pass over each tile of W instead of two,
 * and that tile does not fit in L1 beside all of in.
 */
#if defined(__AVX512F__)
#define MMV_NB 4
#else
#define MMV_NB 2
#endif
#define MMV_MB 8
#define MMV_MAX_M 64
/* rows of W per task, about (slices are cut at multiples of 16, out's cache lines) */
#define MMV_ROWS 64
/*
 * tiles ahead that are prefetched into L2: far enough to cover the memory's latency (twice
 * as many tiles of bfloat16, half the bytes each)
 */
#define MMV_PREFETCH_TILES 2
#define MMV_AHEAD(bf16) ((bf16) ? 2 * MMV_PREFETCH_TILES : MMV_PREFETCH_TILES)

typedef struct mm_args
{
	float	   *out;
	const float *in;
	const void *W;				/* float32, or bfloat16 when bf16 */
	const float *bias;
	int			M;
	int			K;
	int			N;
	int			accumulate;
	int			ntasks;
	int			bf16;
	float	  **widen;			/* bf16: per thread, WIDEN_FLOATS */
} mm_args;

/*
 * out[m .. m + mb, n .. n + nb] (+)= in rows times W rows (+ bias): nb x mb dot products
 * over all of K in registers. Always inlined with constant nb and mb, so that the
 * accumulators are registers and the loops unroll. Row i of the tile MMV_AHEAD tiles
 * ahead is prefetched into L2 where bit i of prefetch is set, a step's elements per step, so
 * that memory works while the FMAs do instead of the tile stalling on every new line.
 * W's rows are float32, or bfloat16 (bf16, also constant) widened as they are loaded:
 * half the bytes from memory for the same FMAs.
 */
static inline __attribute__((always_inline)) void
mmv_tile(const mm_args *a, int n, int m, const int nb, const int mb, int prefetch, const int bf16)
{
	const int	K = a->K;
	const size_t es = bf16 ? sizeof(uint16_t) : sizeof(float);
	const char *w = (const char *) a->W + (size_t) n * K * es;
	const float *x = a->in + (size_t) m * K;
	vfloat		acc[MMV_NB][MMV_MB];
	int			k = 0;

	for (int i = 0; i < nb; i++)
		for (int j = 0; j < mb; j++)
			acc[i][j] = (vfloat) {0};
	for (; k + VEC_LANES <= K; k += VEC_LANES)
	{
		vfloat		wv[MMV_NB];

		/*
		 * Operands into registers, each loaded once: otherwise gcc folds the loads into
		 * the FMAs and loads every operand again for each of its uses.
		 */
		for (int i = 0; i < nb; i++)
		{
			wv[i] = bf16 ? vload_bf16((const uint16_t *) w + (size_t) i * K + k)
				: vload((const float *) w + (size_t) i * K + k);
			__asm__("" : "+x"(wv[i]));
			if (prefetch >> i & 1)
				__builtin_prefetch(w + ((size_t) (MMV_AHEAD(bf16) * nb + i) * K + k) * es, 0, 2);
		}
		for (int j = 0; j < mb; j++)
		{
			vfloat		xv = vload(x + (size_t) j * K + k);

			__asm__("" : "+x"(xv));
			for (int i = 0; i < nb; i++)
				acc[i][j] += wv[i] * xv;
		}
	}
	for (int j = 0; j < mb; j++)
	{
		float	   *o = a->out + (size_t) (m + j) * a->N + n;

		for (int i = 0; i < nb; i++)
		{
			float		s = vhsum(acc[i][j]);

			for (int kk = k; kk < K; kk++)
				s += weight_at(w, (size_t) i * K + kk, bf16) * x[(size_t) j * K + kk];
			if (a->bias)
				s += a->bias[n + i];
			o[i] = a->accumulate ? o[i] + s : s;
		}
	}
}

/* The cases of mmv_tile_any for tiles of nb rows of W. */
#define MMV_CASES(nb, prefetch, bf16) \
	case 1: mmv_tile(a, n, m, nb, 1, prefetch, bf16); break; \
	case 2: mmv_tile(a, n, m, nb, 2, prefetch, bf16); break; \
	case 3: mmv_tile(a, n, m, nb, 3, prefetch, bf16); break; \
	case 4: mmv_tile(a, n, m, nb, 4, prefetch, bf16); break; \
	case 5: mmv_tile(a, n, m, nb, 5, prefetch, bf16); break; \
	case 6: mmv_tile(a, n, m, nb, 6, prefetch, bf16); break; \
	case 7: mmv_tile(a, n, m, nb, 7, prefetch, bf16); break; \
	default: mmv_tile(a, n, m, nb, MMV_MB, prefetch, bf16); break

/*
 * mmv_tile with nb = MMV_NB (full) or 1 (the rows left over), for mb = 1 .. MMV_MB and
 * both weight formats; full tiles prefetch as asked.
 */
static void
mmv_tile_any(const mm_args *a, int n, int m, int full, int mb, int prefetch)
{
	if (full && a->bf16)
		switch (mb)
		{
				MMV_CASES(MMV_NB, prefetch, 1);
		}
	else if (full)
		switch (mb)
		{
				MMV_CASES(MMV_NB, prefetch, 0);
		}
	else if (a->bf16)
		switch (mb)
		{
				MMV_CASES(1, 0, 1);
		}
	else
		switch (mb)
		{
				MMV_CASES(1, 0, 0);
		}
}

/*
 * Rows [n0, n1) of W against every row of in: per tile of W's rows, the rows of in in
 * nearly equal blocks of at most MMV_MB (12 rows are two blocks of 6, not 8 + 4), so
 * the tile of W is read from memory once and from cache after. The blocks
 * share the prefetching of a later tile: block b fetches its rows i with i % blocks == b.
 */
static void
mmv_rows(const mm_args *a, int n0, int n1)
{
	int			nmb = (a->M + MMV_MB - 1) / MMV_MB;

	for (int n = n0; n < n1;)
	{
		int			full = n1 - n >= MMV_NB;

		for (int b = 0; b < nmb; b++)
		{
			int			m0,
						m1,
						prefetch = 0;

			task_range(a->M, nmb, b, &m0, &m1);
			if (n + (MMV_AHEAD(a->bf16) + 1) * MMV_NB <= a->N)
				for (int i = 0; i < MMV_NB; i++)
					prefetch |= (i % nmb == b) << i;
			mmv_tile_any(a, n, m0, full, m1 - m0, prefetch);
		}
		n += full ? MMV_NB : 1;
	}
}

/*
 * Columns [n0, n1) of out, i.e. rows [n0, n1) of W, with a single-threaded BLAS call; a
 * bfloat16 W by chunks of rows widened into the thread's buffer, a call each.
 */
static void
mm_sgemm(const mm_args *a, int n0, int n1, int thread)
{
	float		beta = a->accumulate ? 1.0f : 0.0f;
	int			chunk;

	if (a->bias)
	{
		/* out = bias (or out += bias), then the product is added on top */
		for (int m = 0; m < a->M; m++)
		{
			float	   *o = a->out + (size_t) m * a->N;

			if (a->accumulate)
				for (int n = n0; n < n1; n++)
					o[n] += a->bias[n];
			else
				memcpy(o + n0, a->bias + n0, (n1 - n0) * sizeof(float));
		}
		beta = 1.0f;
	}
	if (!a->bf16)
	{
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a->M, n1 - n0, a->K, 1.0f,
					a->in, a->K, (const float *) a->W + (size_t) n0 * a->K, a->K, beta, a->out + n0, a->N);
		return;
	}
	/* K is a width, at most MAX_WIDTH = WIDEN_FLOATS (config.c): a chunk has a row at least */
	chunk = (int) (WIDEN_FLOATS / a->K);
	for (int c0 = n0; c0 < n1; c0 += chunk)
	{
		int			c1 = c0 + chunk < n1 ? c0 + chunk : n1;
		float	   *wf = a->widen[thread];
		const uint16_t *wh = (const uint16_t *) a->W + (size_t) c0 * a->K;

		for (size_t i = 0; i < (size_t) (c1 - c0) * a->K; i++)
			wf[i] = bf16_to_float(wh[i]);
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a->M, c1 - c0, a->K, 1.0f,
					a->in, a->K, wf, a->K, beta, a->out + c0, a->N);
	}
}

/* One slice of W's rows, 16-aligned so that rows of W and of out stay cache-line aligned. */
static void
mm_task(void *p, int task, int thread)
{
	mm_args    *a = p;
	int			n0,
				n1;

	task_range((a->N + 15) / 16, a->ntasks, task, &n0, &n1);
	n0 *= 16;
	n1 = n1 * 16 < a->N ? n1 * 16 : a->N;
	if (n1 <= n0)
		return;
	if (a->M <= MMV_MAX_M)
		mmv_rows(a, n0, n1);
	else
		mm_sgemm(a, n0, n1, thread);
}

/*
 * out[M,N] (+)= in[M,K] @ W[N,K]^T + bias. sgemm: one slice of W per thread (each call
 * packs in again). Small M: slices of MMV_ROWS rows, handed out as they are done, so
 * that a thread slowed by the rest of the machine does not hold up the others.
 */
static void
cpu_matmul_forward(dl_backend *be, float *out, const float *in, const void *W,
				   const float *bias, int M, int K, int N, int accumulate)
{
	cpu_backend *cb = (cpu_backend *) be;
	int			slices = (N + 15) / 16;
	int			nt = threadpool_size(pool_of(be));
	mm_args		a = {out, in, W, bias, M, K, N, accumulate, 0, cb->bf16, cb->widen};

	if (M <= MMV_MAX_M)
		nt = (N + MMV_ROWS - 1) / MMV_ROWS;
	a.ntasks = slices < nt ? slices : nt;
	threadpool_run(pool_of(be), mm_task, &a, a.ntasks);
}

typedef struct mmb_args
{
	float	   *din;
	float	   *dW;
	float	   *dbias;
	const float *dout;
	const float *in;
	const float *W;
	int			M;
	int			K;
	int			N;
	int			din_tasks;		/* tasks below: din by rows; the others: dW, dbias by rows of W */
	int			dw_tasks;
} mmb_args;

/*
 * One task of the matrix product backward: rows [m0, m1) of din += dout W, or rows
 * [n0, n1) of dW += dout^T in (and the column sums of dout into dbias). Each is one
 * single-threaded BLAS call with beta 1, which is the accumulation.
 */
static void
mmb_task(void *p, int task, int thread)
{
	mmb_args   *a = p;
	int			lo,
				hi;

	(void) thread;
	if (task < a->din_tasks)
	{
		task_range(a->M, a->din_tasks, task, &lo, &hi);
		if (hi > lo)
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, hi - lo, a->K, a->N, 1.0f,
						a->dout + (size_t) lo * a->N, a->N, a->W, a->K, 1.0f,
						a->din + (size_t) lo * a->K, a->K);
		return;
	}
	/* multiples of 16 rows of W keep slices cache-line aligned, as in the forward */
	task_range((a->N + 15) / 16, a->dw_tasks, task - a->din_tasks, &lo, &hi);
	lo *= 16;
	hi = hi * 16 < a->N ? hi * 16 : a->N;
	if (hi <= lo)
		return;
	cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, hi - lo, a->K, a->M, 1.0f,
				a->dout + lo, a->N, a->in, a->K, 1.0f, a->dW + (size_t) lo * a->K, a->K);
	if (a->dbias == NULL)
		return;
	for (int nb = lo; nb < hi; nb += COLSUM_BLOCK)
	{
		int			n = hi - nb < COLSUM_BLOCK ? hi - nb : COLSUM_BLOCK;
		double		sb[COLSUM_BLOCK] = {0};

		for (int m = 0; m < a->M; m++)
		{
			const float *g = a->dout + (size_t) m * a->N + nb;

			for (int j = 0; j < n; j++)
				sb[j] += g[j];
		}
		for (int j = 0; j < n; j++)
			a->dbias[nb + j] += (float) sb[j];
	}
}

/* Matrix product backward: din slices and dW slices as tasks of one pool pass. */
static void
cpu_matmul_backward(dl_backend *be, float *din, float *dW, float *dbias, const float *dout,
					const float *in, const void *W, int M, int K, int N)
{
	int			nt = threadpool_size(pool_of(be));
	int			slices = (N + 15) / 16;
	mmb_args	a = {din, dW, dbias, dout, in, W, M, K, N,
		din ? (M < nt ? M : nt) : 0, slices < nt ? slices : nt};

	threadpool_run(pool_of(be), mmb_task, &a, a.din_tasks + a.dw_tasks);
}

/* --- rotary --- */

typedef struct rope_args
{
	float	   *x;
	int			stride;
	int			T;
	int			n_head;
	int			head_dim;
	int			rot_dim;
	int			interleaved;
	const int32_t *pos;
	const float *cos_sin;
	float		sign;			/* 1: rotate by +angle (forward), -1: by -angle (backward) */
	int			ntasks;
} rope_args;

/* Rotate rows [lo, hi). */
static void
rope_task(void *p, int task, int thread)
{
	rope_args  *a = p;
	int			half = a->rot_dim / 2;
	int			lo,
				hi;

	(void) thread;
	task_range(a->T, a->ntasks, task, &lo, &hi);
	for (int t = lo; t < hi; t++)
	{
		const float *c = a->cos_sin + (size_t) a->pos[t] * a->rot_dim;
		const float *s = c + half;
		float		sg = a->sign;

		for (int h = 0; h < a->n_head; h++)
		{
			float	   *x = a->x + (size_t) t * a->stride + (size_t) h * a->head_dim;

			if (a->interleaved)
				for (int j = 0; j < half; j++)
				{
					float		x0 = x[2 * j],
								x1 = x[2 * j + 1];

					x[2 * j] = x0 * c[j] - x1 * sg * s[j];
					x[2 * j + 1] = x1 * c[j] + x0 * sg * s[j];
				}
			else
				for (int j = 0; j < half; j++)
				{
					float		x0 = x[j],
								x1 = x[j + half];

					x[j] = x0 * c[j] - x1 * sg * s[j];
					x[j + half] = x1 * c[j] + x0 * sg * s[j];
				}
		}
	}
}

/* Rotary embedding in place, rows over the pool. */
static void
cpu_rotary_forward(dl_backend *be, float *x, int stride, int T, int n_head, int head_dim,
				   int rot_dim, int interleaved, const int32_t *pos, const float *cos_sin)
{
	rope_args	a = {x, stride, T, n_head, head_dim, rot_dim, interleaved, pos, cos_sin, 1.0f,
	row_tasks(be, T, (size_t) n_head * rot_dim)};

	threadpool_run(pool_of(be), rope_task, &a, a.ntasks);
}

/* The gradient through the rotation: the same rotation by the opposite angle. */
static void
cpu_rotary_backward(dl_backend *be, float *dx, int stride, int T, int n_head, int head_dim,
					int rot_dim, int interleaved, const int32_t *pos, const float *cos_sin)
{
	rope_args	a = {dx, stride, T, n_head, head_dim, rot_dim, interleaved, pos, cos_sin, -1.0f,
	row_tasks(be, T, (size_t) n_head * rot_dim)};

	threadpool_run(pool_of(be), rope_task, &a, a.ntasks);
}

/* --- attention --- */

typedef struct attn_args
{
	float	   *out;
	const float *qkv;
	void	   *k_cache;		/* float32, or bfloat16 when bf16 */
	void	   *v_cache;
	int			bf16;
	float	  **widen;			/* bf16: per thread, for attend_block */
	int			max_ctx;
	const dl_spans *spans;
	int			n_head;
	int			head_dim;
	float		scale;
	float	   *scratch;		/* the workspace: ATTN_QBLOCK * max_ctx floats per thread */
	int			groups;			/* decode: tasks per span, each a group of heads */
} attn_args;

/* cache[at .. at + n) = x, rounded to bfloat16 for a bfloat16 cache. */
static inline void
kv_put(void *cache, size_t at, const float *x, int n, int bf16)
{
	if (bf16)
		for (int i = 0; i < n; i++)
			((uint16_t *) cache)[at + i] = float_to_bf16(x[i]);
	else
		memcpy((float *) cache + at, x, n * sizeof(float));
}

/* Element `at` of a cache (or of any float32 / bfloat16 array) as an address. */
static inline void *
kv_at(void *cache, size_t at, int bf16)
{
	return (char *) cache + at * (bf16 ? sizeof(uint16_t) : sizeof(float));
}

/* Store the k and v rows of span `task` in its cache slot (decode spans store their own). */
static void
kv_store_task(void *p, int task, int thread)
{
	attn_args  *a = p;
	const dl_span *sp = &a->spans->host[task];
	int			C = a->n_head * a->head_dim;

	(void) thread;
	if (sp->len == 1)
		return;
	for (int i = 0; i < sp->len; i++)
	{
		const float *row = a->qkv + (size_t) (sp->first + i) * 3 * C;
		size_t		at = ((size_t) sp->slot * a->max_ctx + sp->pos + i) * C;

		kv_put(a->k_cache, at, row + C, C, a->bf16);
		kv_put(a->v_cache, at, row + 2 * C, C, a->bf16);
	}
}

/* Number of attention tasks of span sp: blocks of query tokens times heads. */
static inline int
span_tasks(const dl_span *sp, int n_head)
{
	return (sp->len + ATTN_QBLOCK - 1) / ATTN_QBLOCK * n_head;
}

/* keys of a bfloat16 cache widened for one product of attend_block */
#define ATTN_WIDEN_KEYS 128

/*
 * Keys (or values) [c0, c0 + n) of a bfloat16 cache, rows kvs apart, widened into wbuf as
 * n rows of D floats: the operand of one product.
 */
static const float *
widen_keys(float *wbuf, const void *k, int kvs, int c0, int n, int D)
{
	for (int j = 0; j < n; j++)
		for (int d = 0; d < D; d++)
			wbuf[(size_t) j * D + d] = bf16_to_float(((const uint16_t *) k)[(size_t) (c0 + j) * kvs + d]);
	return wbuf;
}

/*
 * One head of a block of nq query rows whose positions are the last nq of nk keys:
 * S = scale * Q K^T (one product), the causal softmax of each row in place (row i sees
 * keys 0 .. nk - nq + i), then O = P V (one product). q, k and v rows are qs, kvs elements
 * apart, o rows os apart; with lse, the log-sum-exp of row i's scores goes to
 * lse[i * lses]. Single-threaded BLAS on the caller's scratch S [nq, nk]. A bfloat16
 * cache (wbuf given: WIDEN_FLOATS) is widened ATTN_WIDEN_KEYS keys at a time, a product
 * each.
 */
static void
attend_block(const float *q, int qs, const void *k, const void *v, int kvs, float *o,
			 int os, float *lse, int lses, int nq, int nk, int D, float scale, float *S,
			 float *wbuf)
{
	/* D is at most MAX_WIDTH = WIDEN_FLOATS (config.c): a chunk has a key at least */
	int			chunk = WIDEN_FLOATS / D < ATTN_WIDEN_KEYS ? (int) (WIDEN_FLOATS / D) : ATTN_WIDEN_KEYS;

	if (wbuf)
		for (int c0 = 0; c0 < nk; c0 += chunk)
		{
			int			n = nk - c0 < chunk ? nk - c0 : chunk;

			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, n, D, scale, q, qs,
						widen_keys(wbuf, k, kvs, c0, n, D), D, 0.0f, S + c0, nk);
		}
	else if (nq == 1)
		cblas_sgemv(CblasRowMajor, CblasNoTrans, nk, D, scale, k, kvs, q, 1, 0.0f, S, 1);
	else
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, D, scale,
					q, qs, k, kvs, 0.0f, S, nk);
	for (int i = 0; i < nq; i++)
	{
		float	   *s = S + (size_t) i * nk;
		int			n = nk - nq + i + 1;	/* causal: keys 0 .. own position */
		float		m = -INFINITY,
					sum,
					inv;

		for (int j = 0; j < n; j++)
			m = s[j] > m ? s[j] : m;
		for (int j = 0; j < n; j++)
			s[j] = fast_expf(s[j] - m);
		sum = vsum(s, n);
		inv = 1.0f / sum;
		for (int j = 0; j < n; j++)
			s[j] *= inv;
		memset(s + n, 0, (nk - n) * sizeof(float));
		if (lse)
			lse[(size_t) i * lses] = m + logf(sum);
	}
	if (wbuf)
		for (int c0 = 0; c0 < nk; c0 += chunk)
		{
			int			n = nk - c0 < chunk ? nk - c0 : chunk;

			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, D, n, 1.0f, S + c0, nk,
						widen_keys(wbuf, v, kvs, c0, n, D), D, c0 ? 1.0f : 0.0f, o, os);
		}
	else if (nq == 1)
		cblas_sgemv(CblasRowMajor, CblasTrans, nk, D, 1.0f, v, kvs, S, 1, 0.0f, o, 1);
	else
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, D, nk, 1.0f,
					S, nk, v, kvs, 0.0f, o, os);
}

/*
 * Decode (a span of one new token): group `group` of the span's heads, [h0, h1), which
 * also stores the token's k and v for those heads. A cache row holds every head of one
 * position, so the group reads its heads' slices of consecutive rows, key by key: one
 * plain stream when the group is all heads (up to ATTN_QBLOCK heads), instead of a piece
 * of every row per head. The scores of the group's heads ([h1 - h0, n]) fill the
 * thread's scratch; the softmax is normalised on the output, once per head.
 */
static void
attend_decode(const attn_args *a, const dl_span *sp, int group, int thread)
{
	int			D = a->head_dim,
				C = a->n_head * D,
				n = sp->pos + 1;	/* keys: every position up to the new one */
	int			h0,
				h1;
	const float *q = a->qkv + (size_t) sp->first * 3 * C;
	size_t		c0 = (size_t) sp->slot * a->max_ctx * C;	/* the slot's first element */
	void	   *kc = kv_at(a->k_cache, c0, a->bf16),
			   *vc = kv_at(a->v_cache, c0, a->bf16);
	float	   *o = a->out + (size_t) sp->first * C,
			   *S = a->scratch + (size_t) thread * ATTN_QBLOCK * a->max_ctx;
	float		inv[ATTN_QBLOCK];

	task_range(a->n_head, a->groups, group, &h0, &h1);
	kv_put(kc, (size_t) sp->pos * C + h0 * D, q + C + h0 * D, (h1 - h0) * D, a->bf16);
	kv_put(vc, (size_t) sp->pos * C + h0 * D, q + 2 * C + h0 * D, (h1 - h0) * D, a->bf16);
	for (int j = 0; j < n; j++)
		for (int h = h0; h < h1; h++)
			S[(size_t) (h - h0) * n + j] =
				a->scale * vdot(q + h * D, kv_at(kc, (size_t) j * C + h * D, a->bf16), D, a->bf16);
	for (int h = h0; h < h1; h++)
	{
		float	   *s = S + (size_t) (h - h0) * n;
		float		m = vmax(s, n);

		for (int j = 0; j < n; j++)
			s[j] = fast_expf(s[j] - m);
		inv[h - h0] = 1.0f / vsum(s, n);
	}
	memset(o + h0 * D, 0, (h1 - h0) * D * sizeof(float));
	for (int j = 0; j < n; j++)
		for (int h = h0; h < h1; h++)
			vaxpy(o + h * D, kv_at(vc, (size_t) j * C + h * D, a->bf16), S[(size_t) (h - h0) * n + j], D,
				  a->bf16);
	for (int h = h0; h < h1; h++)
		for (int d = 0; d < D; d++)
			o[h * D + d] *= inv[h - h0];
}

/* Tasks of span sp in a pass over the cache: head groups of a decode, else blocks x heads. */
static inline int
cache_span_tasks(const attn_args *a, const dl_span *sp)
{
	return sp->len == 1 ? a->groups : span_tasks(sp, a->n_head);
}

/*
 * One task of attention over the cache: a group of heads of a decode span, or one head
 * of one block of query tokens of a longer span, over the span's cache slot.
 */
static void
attn_task(void *p, int task, int thread)
{
	attn_args  *a = p;
	const dl_span *sp = a->spans->host;
	int			C = a->n_head * a->head_dim;
	int			D = a->head_dim;
	int			h,
				t0,
				nq;
	size_t		kv0;

	while (task >= cache_span_tasks(a, sp))
		task -= cache_span_tasks(a, sp++);
	if (sp->len == 1)
	{
		attend_decode(a, sp, task, thread);
		return;
	}
	h = task % a->n_head;
	t0 = task / a->n_head * ATTN_QBLOCK;
	nq = sp->len - t0 < ATTN_QBLOCK ? sp->len - t0 : ATTN_QBLOCK;
	kv0 = (size_t) sp->slot * a->max_ctx * C + (size_t) h * D;
	/* keys 0 .. the block's last position */
	attend_block(a->qkv + (size_t) (sp->first + t0) * 3 * C + (size_t) h * D, 3 * C,
				 kv_at(a->k_cache, kv0, a->bf16), kv_at(a->v_cache, kv0, a->bf16), C,
				 a->out + (size_t) (sp->first + t0) * C + (size_t) h * D, C, NULL, 0,
				 nq, sp->pos + t0 + nq, D, a->scale,
				 a->scratch + (size_t) thread * ATTN_QBLOCK * a->max_ctx,
				 a->bf16 ? a->widen[thread] : NULL);
}

/* Scores of one block of queries per thread. */
static size_t
cpu_attention_workspace(dl_backend *be, int max_ctx)
{
	return (size_t) threadpool_size(pool_of(be)) * ATTN_QBLOCK * max_ctx * sizeof(float);
}

/*
 * Store k, v of the new tokens, then attend. Spans of more than one token are stored in
 * a first pass (a block's keys include the tokens of the blocks before it); decode spans
 * store their own in the attention pass, so that a pure decode step is one pass.
 */
static void
cpu_attention_forward(dl_backend *be, float *out, const float *qkv, void *k_cache,
					  void *v_cache, int max_ctx, const dl_spans *spans, int n_head,
					  int head_dim, float scale, void *workspace)
{
	/*
	 * A decode task takes all heads of its sequence (as many as its scratch holds): split
	 * into groups of heads, a sequence's cache is read as pieces of rows, and in a test
	 * of 1 to 4 sequences on 2 threads that took 1.5 to 2.5 times as long as whole rows
	 * on one thread, even with the other thread idle.
	 */
	cpu_backend *cb = (cpu_backend *) be;
	attn_args	a = {out, qkv, k_cache, v_cache, cb->bf16, cb->widen, max_ctx, spans, n_head, head_dim,
		scale, workspace, (n_head + ATTN_QBLOCK - 1) / ATTN_QBLOCK};
	int			ntasks = 0,
				ndecode = 0;

	for (int s = 0; s < spans->n; s++)
		ndecode += spans->host[s].len == 1;
	if (ndecode < spans->n)
		threadpool_run(pool_of(be), kv_store_task, &a, spans->n);
	for (int s = 0; s < spans->n; s++)
		ntasks += cache_span_tasks(&a, &spans->host[s]);
	threadpool_run(pool_of(be), attn_task, &a, ntasks);
}

/* --- attention for training: whole sequences, no cache --- */

typedef struct attn_train_args
{
	float	   *out;			/* forward: written */
	float	   *lse;
	const float *saved_out;		/* backward: the forward's out and lse */
	const float *saved_lse;
	float	   *dqkv;
	const float *dout;
	const float *qkv;
	const dl_spans *spans;
	int			n_head;
	int			head_dim;
	float		scale;
	float	   *scratch;
	size_t		per_thread;		/* scratch floats of one thread */
} attn_train_args;

/* Workspace floats per thread: a block of scores and one of their gradients. */
static size_t
attn_train_per_thread(int max_len)
{
	return (size_t) 2 * ATTN_QBLOCK * max_len;
}

/* Scratch for spans of up to max_len tokens, one share per thread (a task is one head). */
static size_t
cpu_attention_train_workspace(dl_backend *be, int max_len, int n_head)
{
	(void) n_head;
	return (size_t) threadpool_size(pool_of(be)) * attn_train_per_thread(max_len) * sizeof(float);
}

/* Set up the arguments of a training attention pass; the scratch stride fits its spans. */
static attn_train_args
attn_train_setup(dl_backend *be, const dl_spans *spans, int n_head, int head_dim, float scale,
				 void *workspace)
{
	attn_train_args a = {.spans = spans, .n_head = n_head, .head_dim = head_dim,
	.scale = scale, .scratch = workspace};
	int			longest = 1;

	(void) be;
	for (int s = 0; s < spans->n; s++)
		longest = spans->host[s].len > longest ? spans->host[s].len : longest;
	a.per_thread = attn_train_per_thread(longest);
	return a;
}

/* One head of one block of query tokens of one span, keys and values from qkv itself. */
static void
attn_train_task(void *p, int task, int thread)
{
	attn_train_args *a = p;
	const dl_span *sp = a->spans->host;
	int			C = a->n_head * a->head_dim;
	int			D = a->head_dim;
	int			h,
				t0,
				nq;
	const float *base;

	while (task >= span_tasks(sp, a->n_head))
		task -= span_tasks(sp++, a->n_head);
	h = task % a->n_head;
	t0 = task / a->n_head * ATTN_QBLOCK;
	nq = sp->len - t0 < ATTN_QBLOCK ? sp->len - t0 : ATTN_QBLOCK;
	base = a->qkv + (size_t) sp->first * 3 * C + (size_t) h * D;
	attend_block(base + (size_t) t0 * 3 * C, 3 * C, base + C, base + 2 * C, 3 * C,
				 a->out + (size_t) (sp->first + t0) * C + (size_t) h * D, C,
				 a->lse + (size_t) (sp->first + t0) * a->n_head + h, a->n_head,
				 nq, t0 + nq, D, a->scale, a->scratch + (size_t) thread * a->per_thread, NULL);
}

/* Causal attention within each span, keeping the log-sum-exp of every row and head. */
static void
cpu_attention_train_forward(dl_backend *be, float *out, float *lse, const float *qkv,
							const dl_spans *spans, int n_head, int head_dim, float scale,
							void *workspace)
{
	attn_train_args a = attn_train_setup(be, spans, n_head, head_dim, scale, workspace);
	int			ntasks = 0;

	a.out = out;
	a.lse = lse;
	a.qkv = qkv;
	for (int s = 0; s < spans->n; s++)
		ntasks += span_tasks(&spans->host[s], n_head);
	threadpool_run(pool_of(be), attn_train_task, &a, ntasks);
}

/*
 * The backward of one head of one span (a task owns its span's dK and dV, which every
 * query block adds to). Per block of queries, with P rebuilt from the saved lse:
 * P = exp(scale Q K^T - lse), dP = dO V^T, dS = P (dP - rowsum(dO O)),
 * dQ += scale dS K, dK += scale dS^T Q, dV += P^T dO (FlashAttention-2's backward).
 */
static void
attn_back_task(void *p, int task, int thread)
{
	attn_train_args *a = p;
	const dl_span *sp = &a->spans->host[task / a->n_head];
	int			H = a->n_head,
				D = a->head_dim,
				C = H * D;
	int			h = task % H;
	size_t		q0 = (size_t) sp->first * 3 * C + (size_t) h * D,
				o0 = (size_t) sp->first * C + (size_t) h * D;
	const float *Q = a->qkv + q0,
			   *K = Q + C,
			   *V = Q + 2 * C,
			   *O = a->saved_out + o0,
			   *dO = a->dout + o0,
			   *lse = a->saved_lse + (size_t) sp->first * H + h;
	float	   *dQ = a->dqkv + q0,
			   *dK = dQ + C,
			   *dV = dQ + 2 * C;
	float	   *P = a->scratch + (size_t) thread * a->per_thread,
			   *dP = P + a->per_thread / 2;

	for (int t0 = 0; t0 < sp->len; t0 += ATTN_QBLOCK)
	{
		int			nq = sp->len - t0 < ATTN_QBLOCK ? sp->len - t0 : ATTN_QBLOCK;
		int			nk = t0 + nq;

		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, D, a->scale,
					Q + (size_t) t0 * 3 * C, 3 * C, K, 3 * C, 0.0f, P, nk);
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, D, 1.0f,
					dO + (size_t) t0 * C, C, V, 3 * C, 0.0f, dP, nk);
		for (int i = 0; i < nq; i++)
		{
			float	   *pr = P + (size_t) i * nk,
					   *dpr = dP + (size_t) i * nk;
			const float *o = O + (size_t) (t0 + i) * C,
					   *g = dO + (size_t) (t0 + i) * C;
			float		l = lse[(size_t) (t0 + i) * H],
						di = 0.0f;
			int			n = t0 + i + 1;

			for (int d = 0; d < D; d++)
				di += o[d] * g[d];
			for (int j = 0; j < n; j++)
			{
				float		pj = fast_expf(pr[j] - l);

				pr[j] = pj;
				dpr[j] = pj * (dpr[j] - di);
			}
			memset(pr + n, 0, (nk - n) * sizeof(float));
			memset(dpr + n, 0, (nk - n) * sizeof(float));
		}
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, D, nk, a->scale,
					dP, nk, K, 3 * C, 1.0f, dQ + (size_t) t0 * 3 * C, 3 * C);
		cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, D, nq, a->scale,
					dP, nk, Q + (size_t) t0 * 3 * C, 3 * C, 1.0f, dK, 3 * C);
		cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, D, nq, 1.0f,
					P, nk, dO + (size_t) t0 * C, C, 1.0f, dV, 3 * C);
	}
}

/* Attention backward: one task per span and head. */
static void
cpu_attention_backward(dl_backend *be, float *dqkv, const float *dout, const float *qkv,
					   const float *out, const float *lse, const dl_spans *spans, int n_head,
					   int head_dim, float scale, void *workspace)
{
	attn_train_args a = attn_train_setup(be, spans, n_head, head_dim, scale, workspace);

	a.saved_out = out;
	a.saved_lse = lse;
	a.dqkv = dqkv;
	a.dout = dout;
	a.qkv = qkv;
	threadpool_run(pool_of(be), attn_back_task, &a, spans->n * n_head);
}

/* --- GELU --- */

typedef struct gelu_args
{
	float	   *out;
	const float *in;
	size_t		n;
	dl_gelu		form;
	int			ntasks;
} gelu_args;

/* GELU over one chunk. */
static void
gelu_task(void *p, int task, int thread)
{
	gelu_args  *a = p;
	size_t		lo = a->n * task / a->ntasks;
	size_t		hi = a->n * (task + 1) / a->ntasks;
	float	   *out = a->out;
	const float *in = a->in;

	(void) thread;
	/* plain locals, so that the loops vectorise */
	if (a->form == DL_GELU_TANH)
		for (size_t i = lo; i < hi; i++)
			out[i] = gelu_tanh(in[i]);
	else
		for (size_t i = lo; i < hi; i++)
			out[i] = gelu_erf(in[i]);
}

/* Elementwise GELU, chunks over the pool. */
static void
cpu_gelu_forward(dl_backend *be, float *out, const float *in, size_t n, dl_gelu form)
{
	int			nt = threadpool_size(pool_of(be));
	gelu_args	a = {out, in, n, form, n < 4096 ? 1 : nt};

	threadpool_run(pool_of(be), gelu_task, &a, a.ntasks);
}

/* --- sampling --- */

typedef struct sample_args
{
	int32_t    *tokens;
	const float *logits;
	const dl_sample_row *rows;
	int			V;
	char	   *workspace;
} sample_args;

/* The sampler's scratch for one row: 2V floats, then V ints. */
static size_t
sample_scratch_bytes(int V)
{
	return (size_t) 3 * V * sizeof(float);
}

/* One row through the sampler, in the calling thread's scratch. */
static void
sample_task(void *p, int task, int thread)
{
	sample_args *a = p;
	float	   *scratch = (float *) (a->workspace + thread * sample_scratch_bytes(a->V));

	a->tokens[task] = sample_draw(a->logits + (size_t) task * a->V, a->V, &a->rows[task],
								  scratch, (int32_t *) (scratch + 2 * (size_t) a->V));
}

/* sample_draw per row, rows over the pool. */
static void
cpu_sample_forward(dl_backend *be, int32_t *tokens, const float *logits,
				   const dl_sample_row *rows, int R, int V, void *workspace)
{
	sample_args a = {tokens, logits, rows, V, workspace};

	threadpool_run(pool_of(be), sample_task, &a, R);
}

/* Scratch for every thread of the pool, whatever R. */
static size_t
cpu_sample_workspace(dl_backend *be, int R, int V)
{
	(void) R;
	return threadpool_size(pool_of(be)) * sample_scratch_bytes(V);
}

typedef struct gelub_args
{
	float	   *din;
	const float *in;
	const float *dout;
	size_t		n;
	dl_gelu		form;
	int			ntasks;
} gelub_args;

/* GELU backward over one chunk. */
static void
gelub_task(void *p, int task, int thread)
{
	gelub_args *a = p;
	size_t		lo = a->n * task / a->ntasks;
	size_t		hi = a->n * (task + 1) / a->ntasks;
	float	   *din = a->din;
	const float *in = a->in,
			   *dout = a->dout;

	(void) thread;
	if (a->form == DL_GELU_TANH)
		for (size_t i = lo; i < hi; i++)
			din[i] += gelu_tanh_grad(in[i]) * dout[i];
	else
		for (size_t i = lo; i < hi; i++)
			din[i] += gelu_erf_grad(in[i]) * dout[i];
}

/* Elementwise GELU backward, chunks over the pool. */
static void
cpu_gelu_backward(dl_backend *be, float *din, const float *in, const float *dout, size_t n,
				  dl_gelu form)
{
	int			nt = threadpool_size(pool_of(be));
	gelub_args	a = {din, in, dout, n, form, n < 4096 ? 1 : nt};

	threadpool_run(pool_of(be), gelub_task, &a, a.ntasks);
}

/* --- cross-entropy --- */

typedef struct xent_args
{
	float	   *losses;
	float	   *dlogits;
	const float *logits;
	const int32_t *labels;
	int			T;
	int			V;
	int			ntasks;
} xent_args;

/* Sum of exp(a[i] - m). */
static inline float
vsum_exp(const float *a, int n, float m)
{
	float		acc[16] = {0};
	float		s = 0.0f;
	int			i = 0;

	for (; i + 16 <= n; i += 16)
		for (int j = 0; j < 16; j++)
			acc[j] += fast_expf(a[i + j] - m);
	for (; i < n; i++)
		s += fast_expf(a[i] - m);
	for (int j = 0; j < 16; j++)
		s += acc[j];
	return s;
}

/* Loss (and gradient) of rows [lo, hi); the label's logit is read before d overwrites it. */
static void
xent_task(void *p, int task, int thread)
{
	xent_args  *a = p;
	int			lo,
				hi,
				V = a->V;

	(void) thread;
	task_range(a->T, a->ntasks, task, &lo, &hi);
	for (int t = lo; t < hi; t++)
	{
		const float *x = a->logits + (size_t) t * V;
		float	   *d = a->dlogits ? a->dlogits + (size_t) t * V : NULL;
		int			y = a->labels[t];
		float		m,
					lse,
					xy;

		if (y < 0)
		{
			a->losses[t] = 0.0f;
			if (d)
				memset(d, 0, V * sizeof(float));
			continue;
		}
		xy = x[y];
		m = vmax(x, V);
		lse = m + logf(vsum_exp(x, V, m));
		a->losses[t] = lse - xy;
		if (d == NULL)
			continue;
		for (int j = 0; j < V; j++)
			d[j] = fast_expf(x[j] - lse);
		d[y] -= 1.0f;
	}
}

/* Softmax cross-entropy per row, rows over the pool. */
static void
cpu_crossentropy_forward(dl_backend *be, float *losses, float *dlogits, const float *logits,
						 const int32_t *labels, int T, int V)
{
	xent_args	a = {losses, dlogits, logits, labels, T, V, row_tasks(be, T, V)};

	threadpool_run(pool_of(be), xent_task, &a, a.ntasks);
}

/* --- the optimizer --- */

/*
 * Tasks of a sum of squares: a fixed number for large inputs, whatever the threads, so
 * that the same gradients give the same bits on every rank.
 */
#define SUMSQ_TASKS 64

typedef struct sumsq_args
{
	const float *x;
	size_t		n;
	int			ntasks;
	double		part[SUMSQ_TASKS];
} sumsq_args;

/* The squares of one chunk, in double (8 lanes, so that the loop vectorises). */
static void
sumsq_task(void *p, int task, int thread)
{
	sumsq_args *a = p;
	size_t		lo = a->n * task / a->ntasks;
	size_t		hi = a->n * (task + 1) / a->ntasks;
	double		acc[8] = {0};
	double		s = 0.0;
	size_t		i = lo;

	(void) thread;
	for (; i + 8 <= hi; i += 8)
		for (int j = 0; j < 8; j++)
			acc[j] += (double) a->x[i + j] * a->x[i + j];
	for (; i < hi; i++)
		s += (double) a->x[i] * a->x[i];
	for (int j = 0; j < 8; j++)
		s += acc[j];
	a->part[task] = s;
}

/* Sum of squares: chunk sums over the pool, added in task order. */
static dl_status
cpu_sum_squares(dl_backend *be, const float *x, size_t n, double *out, dl_error *err)
{
	sumsq_args	a = {x, n, n < 65536 ? 1 : SUMSQ_TASKS, {0}};

	(void) err;
	threadpool_run(pool_of(be), sumsq_task, &a, a.ntasks);
	*out = 0.0;
	for (int i = 0; i < a.ntasks; i++)
		*out += a.part[i];
	return DL_OK;
}

typedef struct adamw_args
{
	float	   *param;
	const float *grad;
	float	   *m;
	float	   *v;
	size_t		n;
	float		decay;			/* 1 - lr wd */
	float		beta1;
	float		one_minus_beta1;
	float		beta2;
	float		one_minus_beta2;
	float		neg_step_size;	/* -lr / (1 - beta1^step) */
	float		bc2_sqrt;		/* sqrt(1 - beta2^step) */
	float		eps;
	float		grad_scale;
	int			ntasks;
} adamw_args;

/*
 * AdamW over one chunk, in the order and roundings of torch's single-tensor AdamW:
 * decay, m.lerp_(g, 1 - beta1), v.mul_(beta2).addcmul_(g, g, 1 - beta2),
 * denom = sqrt(v) / bc2_sqrt + eps, p.addcdiv_(m, denom, -step_size).
 */
static void
adamw_task(void *p, int task, int thread)
{
	adamw_args *a = p;
	size_t		lo = a->n * task / a->ntasks;
	size_t		hi = a->n * (task + 1) / a->ntasks;

	(void) thread;
	for (size_t i = lo; i < hi; i++)
	{
		float		g = a->grad[i] * a->grad_scale;
		float		m = a->m[i] + a->one_minus_beta1 * (g - a->m[i]);
		float		v = a->v[i] * a->beta2 + a->one_minus_beta2 * g * g;
		float		denom = sqrtf(v) / a->bc2_sqrt + a->eps;

		a->m[i] = m;
		a->v[i] = v;
		a->param[i] = a->param[i] * a->decay + a->neg_step_size * m / denom;
	}
}

/* One AdamW step; the bias corrections are computed in double as torch does in Python. */
static void
cpu_adamw_update(dl_backend *be, float *param, const float *grad, float *m, float *v, size_t n,
				 const dl_adamw *h)
{
	int			nt = threadpool_size(pool_of(be));
	adamw_args	a = {param, grad, m, v, n,
		(float) (1.0 - (double) h->lr * h->weight_decay),
		h->beta1, (float) (1.0 - (double) h->beta1),
		h->beta2, (float) (1.0 - (double) h->beta2),
		(float) (-(double) h->lr / (1.0 - pow(h->beta1, h->step))),
		(float) sqrt(1.0 - pow(h->beta2, h->step)),
		h->eps, h->grad_scale, n < 16384 ? 1 : nt};

	threadpool_run(pool_of(be), adamw_task, &a, a.ntasks);
}

/* Join the threads and free the backend. */
static void
cpu_destroy(dl_backend *be)
{
	cpu_backend *cb = (cpu_backend *) be;

	threadpool_free(cb->pool);
	for (int i = 0; cb->widen && i < be->threads; i++)
		free(cb->widen[i]);
	free(cb->widen);
	free(cb);
}

dl_status
backend_cpu_create(int threads, int bf16, dl_backend **out, dl_error *err)
{
	cpu_backend *cb;
	dl_status	st;

	cb = calloc(1, sizeof(*cb));
	if (cb == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating the CPU backend");
	st = threadpool_create(threads, &cb->pool, err);
	if (st != DL_OK)
	{
		free(cb);
		return st;
	}
	cb->be.threads = threads;
	cb->bf16 = bf16;
	if (bf16)
	{
		int			ok = (cb->widen = calloc(threads, sizeof(float *))) != NULL;

		for (int i = 0; ok && i < threads; i++)
			ok = (cb->widen[i] = malloc(WIDEN_FLOATS * sizeof(float))) != NULL;
		if (!ok)
		{
			cpu_destroy(&cb->be);
			return dl_fail(err, DL_ENOMEM, "out of memory creating the CPU backend");
		}
	}
	/* the pool parallelises every product itself; OpenBLAS must not add threads */
	openblas_set_num_threads(1);
	sys_blas_tune();

	cb->be.name = "cpu";
	cb->be.weight_elem_size = bf16 ? sizeof(uint16_t) : sizeof(float);
	cb->be.kv_elem_size = bf16 ? sizeof(uint16_t) : sizeof(float);
	cb->be.alignment = CPU_ALIGN;
	cb->be.host_memory = 1;
	cb->be.alloc = cpu_alloc;
	cb->be.free = cpu_free;
	cb->be.zero = cpu_zero;
	cb->be.copy = cpu_copy;
	cb->be.upload = cpu_upload;
	cb->be.download = cpu_download;
	cb->be.synchronize = cpu_synchronize;
	cb->be.upload_tensor = cpu_upload_tensor;
	cb->be.embedding_forward = cpu_embedding_forward;
	cb->be.gather_rows_forward = cpu_gather_rows_forward;
	cb->be.layernorm_forward = cpu_layernorm_forward;
	cb->be.matmul_forward = cpu_matmul_forward;
	cb->be.rotary_forward = cpu_rotary_forward;
	cb->be.attention_workspace = cpu_attention_workspace;
	cb->be.attention_forward = cpu_attention_forward;
	cb->be.gelu_forward = cpu_gelu_forward;
	cb->be.sample_forward = cpu_sample_forward;
	cb->be.sample_workspace = cpu_sample_workspace;
	cb->be.attention_train_forward = cpu_attention_train_forward;
	cb->be.attention_train_workspace = cpu_attention_train_workspace;
	cb->be.crossentropy_forward = cpu_crossentropy_forward;
	cb->be.embedding_backward = cpu_embedding_backward;
	cb->be.layernorm_backward = cpu_layernorm_backward;
	cb->be.matmul_backward = cpu_matmul_backward;
	cb->be.rotary_backward = cpu_rotary_backward;
	cb->be.attention_backward = cpu_attention_backward;
	cb->be.gelu_backward = cpu_gelu_backward;
	cb->be.sum_squares = cpu_sum_squares;
	cb->be.adamw_update = cpu_adamw_update;
	cb->be.destroy = cpu_destroy;
	*out = &cb->be;
	return DL_OK;
}
