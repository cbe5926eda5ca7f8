/*
 * cpu_lora.c: LoRA's low-rank update of a product, forward and backward (backend.h's
 * lora_forward, lora_backward): sgemm calls on slices of rows or columns, as
 * cpu_matmul.c's, with dropout's factors drawn by dropout.h into the workspace.
 *
 * The backward is four passes because each reads what the one before wrote: dB from u
 * (and the dropped input into the workspace), then du over u, then dA from du (and din
 * from du when nothing was dropped), then, with dropout, du A into the workspace and its
 * dropped part into din.
 */
#include "backend_cpu.h"
#include "dropout.h"

#include <cblas.h>

typedef struct lora_args
{
	float	   *out;			/* forward: the product's output; backward: din */
	const float *dout;
	int			ldo;
	float	   *u;
	const float *in;
	const dl_lora_mats *w;
	int			M;
	int			K;
	int			N;
	float	   *ws;				/* M * K: drop(in), then (backward) du A */
} lora_args;

/* The input the low-rank product reads: in, or its dropped copy. */
static const float *
source(const lora_args *a)
{
	return a->w->dropout > 0.0f ? a->ws : a->in;
}

/* Rows [m0, m1) of ws = drop(in). */
static void
drop_rows(const lora_args *a, size_t m0, size_t m1)
{
	for (size_t m = m0; m < m1; m++)
		for (int k = 0; k < a->K; k++)
			a->ws[m * a->K + k] = a->in[m * a->K + k] *
				dropout_factor(a->w->seed, (uint32_t) m, (uint32_t) k, a->w->dropout);
}

/* Rows [m0, m1) of one segment: u = drop(in) A^T, out += scale u B^T. */
static void
forward_seg(const lora_args *a, size_t m0, size_t m1)
{
	const dl_lora_mats *w = a->w;

	if (w->dropout > 0.0f)
		drop_rows(a, m0, m1);
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m1 - m0, w->r, a->K, 1.0f,
				source(a) + m0 * a->K, a->K, w->A, a->K, 0.0f, a->u + m0 * w->r, w->r);
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m1 - m0, a->N, w->r, w->scale,
				a->u + m0 * w->r, w->r, w->B, w->r, 1.0f, a->out + m0 * a->ldo, a->ldo);
}

/* The segments of one pass, their rows numbered one after another. */
typedef struct seg_pass
{
	const lora_args *segs;
	int			nseg;
} seg_pass;

/* Rows [lo, hi) of the segments' rows: each segment's part of them. */
static void
forward_rows(const void *ctx, size_t lo, size_t hi, int thread)
{
	const seg_pass *p = ctx;
	size_t		base = 0;

	(void) thread;
	for (int s = 0; s < p->nseg && base < hi; base += p->segs[s++].M)
	{
		const lora_args *a = &p->segs[s];
		size_t		m0 = lo > base ? lo - base : 0,
					m1 = hi - base < (size_t) a->M ? hi - base : (size_t) a->M;

		if (m0 < m1)
			forward_seg(a, m0, m1);
	}
}

/* segments run in one pass of the pool; more take several */
#define SEGS_PER_PASS 32

void
cpu_lora_forward(dl_backend *be, float *out, int ldo, float *u, const float *in, int K,
				 const dl_lora_seg *segs, int nseg, float *workspace)
{
	lora_args	a[SEGS_PER_PASS];
	size_t		u_off = 0,
				row_off = 0;

	for (int s0 = 0; s0 < nseg; s0 += SEGS_PER_PASS)
	{
		seg_pass	p = {a, nseg - s0 < SEGS_PER_PASS ? nseg - s0 : SEGS_PER_PASS};
		size_t		rows = 0;

		for (int i = 0; i < p.nseg; i++)
		{
			const dl_lora_seg *g = &segs[s0 + i];

			a[i] = (lora_args) {out + (size_t) g->first * ldo + g->col0, NULL, ldo, u + u_off,
				in + (size_t) g->first * K, &g->w, g->M, K, g->N,
				workspace ? workspace + row_off * K : NULL};
			u_off += (size_t) g->M * g->w.r;
			row_off += g->M;
			rows += g->M;
		}
		cpu_for_rows(be, rows, cpu_row_tasks(be, rows, K), forward_rows, &p);
	}
}

/* Rows [n0, n1) of dB += scale dout^T u. */
static void
db_rows(const void *ctx, size_t n0, size_t n1, int thread)
{
	const lora_args *a = ctx;
	const dl_lora_mats *w = a->w;

	(void) thread;
	cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n1 - n0, w->r, a->M, w->scale,
				a->dout + n0, a->ldo, a->u, w->r, 1.0f, w->dB + n0 * w->r, w->r);
}

static void
drop_task(const void *ctx, size_t m0, size_t m1, int thread)
{
	(void) thread;
	drop_rows(ctx, m0, m1);
}

/* Rows [m0, m1) of u = du = scale dout B. */
static void
du_rows(const void *ctx, size_t m0, size_t m1, int thread)
{
	const lora_args *a = ctx;
	const dl_lora_mats *w = a->w;

	(void) thread;
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m1 - m0, w->r, a->N, w->scale,
				a->dout + m0 * a->ldo, a->ldo, w->B, w->r, 0.0f, a->u + m0 * w->r, w->r);
}

/* Columns [k0, k1) of dA += du^T drop(in). */
static void
da_cols(const void *ctx, size_t k0, size_t k1, int thread)
{
	const lora_args *a = ctx;
	const dl_lora_mats *w = a->w;

	(void) thread;
	cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, w->r, k1 - k0, a->M, 1.0f,
				a->u, w->r, source(a) + k0, a->K, 1.0f, w->dA + k0, a->K);
}

/*
 * Rows [m0, m1) of din += drop'(du A): straight into din when nothing was dropped, else
 * through the workspace and the mask.
 */
static void
din_rows(const void *ctx, size_t m0, size_t m1, int thread)
{
	const lora_args *a = ctx;
	const dl_lora_mats *w = a->w;
	int			dropped = w->dropout > 0.0f;
	float	   *dst = dropped ? a->ws : a->out;

	(void) thread;
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m1 - m0, a->K, w->r, 1.0f,
				a->u + m0 * w->r, w->r, w->A, a->K, dropped ? 0.0f : 1.0f, dst + m0 * a->K, a->K);
	for (size_t m = m0; dropped && m < m1; m++)
		for (int k = 0; k < a->K; k++)
			a->out[m * a->K + k] += a->ws[m * a->K + k] *
				dropout_factor(w->seed, (uint32_t) m, (uint32_t) k, w->dropout);
}

void
cpu_lora_backward(dl_backend *be, float *din, const float *dout, int ldo, float *u,
				  const float *in, const dl_lora_mats *w, int M, int K, int N, float *workspace)
{
	lora_args	a = {din, dout, ldo, u, in, w, M, K, N, workspace};
	int			dropped = w->dropout > 0.0f,
				rows = cpu_row_tasks(be, M, K);
	cpu_loop	first[] = {
		{db_rows, N, w->dB ? cpu_threads(be) : 0, 1},
		{drop_task, M, dropped && w->dA ? rows : 0, 1},
	};
	cpu_loop	third[] = {
		{da_cols, K, w->dA ? cpu_threads(be) : 0, CPU_COL_GRAIN},
		{din_rows, M, din && !dropped ? rows : 0, 1},
	};

	cpu_for_loops(be, &a, first, 2);
	cpu_for_rows(be, M, cpu_row_tasks(be, M, w->r), du_rows, &a);
	cpu_for_loops(be, &a, third, 2);
	/* with dropout, the workspace held drop(in) for dA until now */
	if (din && dropped)
		cpu_for_rows(be, M, rows, din_rows, &a);
}
