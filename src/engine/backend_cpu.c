/*
 * backend_cpu.c: the CPU backend, the reference implementation of backend.h.
 *
 * Device memory is host memory; weights, activations and the KV cache are float32.
 * Matrix products go to OpenBLAS: each pool thread multiplies its own slice of the
 * weight's rows with a single-threaded cblas_sgemm (cblas_sgemv for one row), so one set
 * of threads does all the work and never competes with OpenBLAS's own threads for the
 * cores. Everything else runs as tasks over rows or heads on the same pool. exp, tanh and
 * erf are written out below so that the loops vectorise (libm's are scalar calls).
 */
#include "backend.h"
#include "threadpool.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define CPU_ALIGN 64
/* query tokens of one sequence per attention task (rows of its score block) */
#define ATTN_QBLOCK 32

typedef struct cpu_backend
{
	dl_backend	be;				/* first: a dl_backend * is a cpu_backend * */
	dl_threadpool *pool;
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

/* Tasks for n rows: a few per thread for balance, never more than rows. */
static int
row_tasks(dl_backend *be, int n)
{
	int			t = threadpool_size(pool_of(be)) * 4;

	return n < t ? n : t;
}

/* --- vectorisable helpers --- */

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

/* GELU, tanh form (transformers' gelu_new); tanh(u) = 1 - 2 / (exp(2u) + 1). */
static inline float
gelu_tanh(float x)
{
	float		u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
	float		t = 1.0f - 2.0f / (fast_expf(2.0f * u) + 1.0f);

	return 0.5f * x * (1.0f + t);
}

/*
 * GELU, erf form (torch.nn.functional.gelu). erf from Abramowitz and Stegun 7.1.26,
 * absolute error below 1.5e-7, well inside the float32 tolerance of the tests.
 */
static inline float
gelu_erf(float x)
{
	float		z = fabsf(x) * 0.7071067811865476f;
	float		t = 1.0f / (1.0f + 0.3275911f * z);
	float		p = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
									 t * (-1.453152027f + t * 1.061405429f))));
	float		e = 1.0f - p * fast_expf(-z * z);

	return 0.5f * x * (1.0f + copysignf(e, x));
}

/* --- memory --- */

/* Host memory, CPU_ALIGN-aligned. */
static void *
cpu_alloc(dl_backend *be, size_t bytes, dl_error *err)
{
	void	   *p;

	(void) be;
	bytes = (bytes + CPU_ALIGN - 1) / CPU_ALIGN * CPU_ALIGN;
	p = aligned_alloc(CPU_ALIGN, bytes ? bytes : CPU_ALIGN);
	if (p == NULL)
		dl_fail(err, DL_ENOMEM, "out of memory allocating %zu bytes", bytes);
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

/* Both formats are float32 here: convert, then permute rows if asked. */
static dl_status
cpu_upload_tensor(dl_backend *be, void *dst, dl_fmt fmt, const st_tensor *t,
				  const int32_t *rows, dl_error *err)
{
	int64_t		cols = t->ndim > 1 ? t->shape[t->ndim - 1] : 1;
	int64_t		nrows = cols ? t->numel / cols : 0;
	float	   *tmp;
	dl_status	st;

	(void) be;
	(void) fmt;
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

/* --- row copies: embedding and gather --- */

typedef struct rows_args
{
	float	   *out;
	const float *in;
	const int32_t *rows;
	int			n;
	int			C;
	int			ntasks;
} rows_args;

/* Copy rows [lo, hi) of the selection. */
static void
rows_task(void *p, int task, int thread)
{
	rows_args  *a = p;
	int			lo,
				hi;

	(void) thread;
	task_range(a->n, a->ntasks, task, &lo, &hi);
	for (int i = lo; i < hi; i++)
		memcpy(a->out + (size_t) i * a->C, a->in + (size_t) a->rows[i] * a->C,
			   a->C * sizeof(float));
}

/* out[i] = in[rows[i]] over the pool. */
static void
copy_rows(dl_backend *be, float *out, const float *in, const int32_t *rows, int n, int C)
{
	rows_args	a = {out, in, rows, n, C, row_tasks(be, n)};

	threadpool_run(pool_of(be), rows_task, &a, a.ntasks);
}

/* The table is float32 here, so an embedding lookup is a row gather. */
static void
cpu_embedding_forward(dl_backend *be, float *out, const void *table, const int32_t *ids,
					  int T, int C)
{
	copy_rows(be, out, table, ids, T, C);
}

/* Rows whose logits are wanted. */
static void
cpu_gather_rows_forward(dl_backend *be, float *out, const float *in, const int32_t *rows,
						int n, int C)
{
	copy_rows(be, out, in, rows, n, C);
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
	ln_args		a = {out, mean, rstd, in, w, b, T, C, eps, row_tasks(be, T)};

	threadpool_run(pool_of(be), ln_task, &a, a.ntasks);
}

/* --- matrix product --- */

typedef struct mm_args
{
	float	   *out;
	const float *in;
	const float *W;
	const float *bias;
	int			M;
	int			K;
	int			N;
	int			accumulate;
	int			ntasks;
} mm_args;

/* Columns [n0, n1) of out, i.e. rows [n0, n1) of W, with a single-threaded BLAS call. */
static void
mm_task(void *p, int task, int thread)
{
	mm_args    *a = p;
	int			n0,
				n1;
	float		beta = a->accumulate ? 1.0f : 0.0f;

	(void) thread;
	/* slice boundaries on multiples of 16 columns keep rows of W cache-line aligned */
	task_range((a->N + 15) / 16, a->ntasks, task, &n0, &n1);
	n0 *= 16;
	n1 = n1 * 16 < a->N ? n1 * 16 : a->N;
	if (n1 <= n0)
		return;
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
	if (a->M == 1)
		cblas_sgemv(CblasRowMajor, CblasNoTrans, n1 - n0, a->K, 1.0f,
					a->W + (size_t) n0 * a->K, a->K, a->in, 1, beta, a->out + n0, 1);
	else
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a->M, n1 - n0, a->K, 1.0f,
					a->in, a->K, a->W + (size_t) n0 * a->K, a->K, beta, a->out + n0, a->N);
}

/* out[M,N] (+)= in[M,K] @ W[N,K]^T + bias, one slice of W per thread. */
static void
cpu_matmul_forward(dl_backend *be, float *out, const float *in, const void *W,
				   const float *bias, int M, int K, int N, int accumulate)
{
	int			slices = (N + 15) / 16;
	int			nt = threadpool_size(pool_of(be));
	mm_args		a = {out, in, W, bias, M, K, N, accumulate, slices < nt ? slices : nt};

	threadpool_run(pool_of(be), mm_task, &a, a.ntasks);
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

		for (int h = 0; h < a->n_head; h++)
		{
			float	   *x = a->x + (size_t) t * a->stride + (size_t) h * a->head_dim;

			if (a->interleaved)
				for (int j = 0; j < half; j++)
				{
					float		x0 = x[2 * j],
								x1 = x[2 * j + 1];

					x[2 * j] = x0 * c[j] - x1 * s[j];
					x[2 * j + 1] = x1 * c[j] + x0 * s[j];
				}
			else
				for (int j = 0; j < half; j++)
				{
					float		x0 = x[j],
								x1 = x[j + half];

					x[j] = x0 * c[j] - x1 * s[j];
					x[j + half] = x1 * c[j] + x0 * s[j];
				}
		}
	}
}

/* Rotary embedding in place, rows over the pool. */
static void
cpu_rotary_forward(dl_backend *be, float *x, int stride, int T, int n_head, int head_dim,
				   int rot_dim, int interleaved, const int32_t *pos, const float *cos_sin)
{
	rope_args	a = {x, stride, T, n_head, head_dim, rot_dim, interleaved, pos, cos_sin,
	row_tasks(be, T)};

	threadpool_run(pool_of(be), rope_task, &a, a.ntasks);
}

/* --- attention --- */

typedef struct attn_args
{
	float	   *out;
	const float *qkv;
	float	   *k_cache;
	float	   *v_cache;
	int			max_ctx;
	const dl_spans *spans;
	int			n_head;
	int			head_dim;
	float		scale;
	float	   *scratch;		/* the workspace: ATTN_QBLOCK * max_ctx floats per thread */
} attn_args;

/* Store the k and v rows of span `task` in its cache slot. */
static void
kv_store_task(void *p, int task, int thread)
{
	attn_args  *a = p;
	const dl_span *sp = &a->spans->host[task];
	int			C = a->n_head * a->head_dim;

	(void) thread;
	for (int i = 0; i < sp->len; i++)
	{
		const float *row = a->qkv + (size_t) (sp->first + i) * 3 * C;
		size_t		at = ((size_t) sp->slot * a->max_ctx + sp->pos + i) * C;

		memcpy(a->k_cache + at, row + C, C * sizeof(float));
		memcpy(a->v_cache + at, row + 2 * C, C * sizeof(float));
	}
}

/* Number of attention tasks of span sp: blocks of query tokens times heads. */
static inline int
span_tasks(const dl_span *sp, int n_head)
{
	return (sp->len + ATTN_QBLOCK - 1) / ATTN_QBLOCK * n_head;
}

/*
 * One head of one block of nq query tokens of one span: S = scale * Q K^T over the keys
 * up to the block's last position (one product), the causal softmax of each row in
 * place, then O = P V (one product). Single-threaded BLAS on this thread's scratch.
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
				nq,
				nk;
	const float *q,
			   *k,
			   *v;
	float	   *o,
			   *S = a->scratch + (size_t) thread * ATTN_QBLOCK * a->max_ctx;

	while (task >= span_tasks(sp, a->n_head))
		task -= span_tasks(sp++, a->n_head);
	h = task % a->n_head;
	t0 = task / a->n_head * ATTN_QBLOCK;
	nq = sp->len - t0 < ATTN_QBLOCK ? sp->len - t0 : ATTN_QBLOCK;
	nk = sp->pos + t0 + nq;		/* keys 0 .. the block's last position */
	q = a->qkv + (size_t) (sp->first + t0) * 3 * C + (size_t) h * D;
	k = a->k_cache + (size_t) sp->slot * a->max_ctx * C + (size_t) h * D;
	v = a->v_cache + (size_t) sp->slot * a->max_ctx * C + (size_t) h * D;
	o = a->out + (size_t) (sp->first + t0) * C + (size_t) h * D;

	if (nq == 1)
		cblas_sgemv(CblasRowMajor, CblasNoTrans, nk, D, a->scale, k, C, q, 1, 0.0f, S, 1);
	else
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, D, a->scale,
					q, 3 * C, k, C, 0.0f, S, nk);
	for (int i = 0; i < nq; i++)
	{
		float	   *s = S + (size_t) i * nk;
		int			n = nk - nq + i + 1;	/* causal: keys 0 .. own position */
		float		m = -INFINITY,
					inv;

		for (int j = 0; j < n; j++)
			m = s[j] > m ? s[j] : m;
		for (int j = 0; j < n; j++)
			s[j] = fast_expf(s[j] - m);
		inv = 1.0f / vsum(s, n);
		for (int j = 0; j < n; j++)
			s[j] *= inv;
		memset(s + n, 0, (nk - n) * sizeof(float));
	}
	if (nq == 1)
		cblas_sgemv(CblasRowMajor, CblasTrans, nk, D, 1.0f, v, C, S, 1, 0.0f, o, 1);
	else
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, D, nk, 1.0f,
					S, nk, v, C, 0.0f, o, C);
}

/* Scores of one block of queries per thread. */
static size_t
cpu_attention_workspace(dl_backend *be, int max_ctx)
{
	return (size_t) threadpool_size(pool_of(be)) * ATTN_QBLOCK * max_ctx * sizeof(float);
}

/* Store k, v of the new tokens, then attend: two passes over the pool. */
static void
cpu_attention_forward(dl_backend *be, float *out, const float *qkv, void *k_cache,
					  void *v_cache, int max_ctx, const dl_spans *spans, int n_head,
					  int head_dim, float scale, void *workspace)
{
	attn_args	a = {out, qkv, k_cache, v_cache, max_ctx, spans, n_head, head_dim, scale, workspace};
	int			ntasks = 0;

	threadpool_run(pool_of(be), kv_store_task, &a, spans->n);
	for (int s = 0; s < spans->n; s++)
		ntasks += span_tasks(&spans->host[s], n_head);
	threadpool_run(pool_of(be), attn_task, &a, ntasks);
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

/* Join the threads and free the backend. */
static void
cpu_destroy(dl_backend *be)
{
	threadpool_free(pool_of(be));
	free(be);
}

dl_status
backend_cpu_create(int threads, dl_backend **out, dl_error *err)
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
	/* the pool parallelises every product itself; OpenBLAS must not add threads */
	openblas_set_num_threads(1);

	cb->be.name = "cpu";
	cb->be.weight_elem_size = sizeof(float);
	cb->be.kv_elem_size = sizeof(float);
	cb->be.alignment = CPU_ALIGN;
	cb->be.threads = threads;
	cb->be.alloc = cpu_alloc;
	cb->be.free = cpu_free;
	cb->be.zero = cpu_zero;
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
	cb->be.destroy = cpu_destroy;
	*out = &cb->be;
	return DL_OK;
}
