/*
 * cpu_optimizer.c: the optimizer's two operations: the sum of squares of a gradient (its
 * norm, for clipping), added in a fixed order so that every rank gets the same bits; and
 * one AdamW step over float32 parameters in torch's order and roundings.
 */
#include "backend_cpu.h"

#include <math.h>

/*
 * Chunks of a sum of squares: a fixed number for large inputs, whatever the threads, so
 * that the same gradients give the same bits on every rank.
 */
#define SUMSQ_CHUNKS 64

typedef struct sumsq_args
{
	const float *x;
	size_t		n;
	int			nchunks;
	double	   *part;			/* [nchunks]: the sum of each chunk */
} sumsq_args;

/* The squares of chunks [lo, hi), each in double (8 lanes, so that the loop vectorises). */
static void
sumsq_chunks(const void *ctx, size_t lo, size_t hi, int thread)
{
	const sumsq_args *a = ctx;

	(void) thread;
	for (size_t c = lo; c < hi; c++)
	{
		size_t		i = a->n * c / a->nchunks,
					end = a->n * (c + 1) / a->nchunks;
		double		acc[8] = {0};
		double		s = 0.0;

		for (; i + 8 <= end; i += 8)
			for (int j = 0; j < 8; j++)
				acc[j] += (double) a->x[i + j] * a->x[i + j];
		for (; i < end; i++)
			s += (double) a->x[i] * a->x[i];
		for (int j = 0; j < 8; j++)
			s += acc[j];
		a->part[c] = s;
	}
}

/* Sum of squares: chunk sums over the pool (a task each), added in chunk order. */
dl_status
cpu_sum_squares(dl_backend *be, const float *x, size_t n, double *out, dl_error *err)
{
	double		part[SUMSQ_CHUNKS];
	sumsq_args	a = {x, n, n < 65536 ? 1 : SUMSQ_CHUNKS, part};

	(void) err;
	cpu_for_rows(be, a.nchunks, a.nchunks, sumsq_chunks, &a);
	*out = 0.0;
	for (int i = 0; i < a.nchunks; i++)
		*out += part[i];
	return DL_OK;
}

/* elements below which an AdamW step runs on the calling thread alone */
#define ADAMW_MIN_SPLIT 16384

typedef struct adamw_args
{
	float	   *param;
	const float *grad;
	float	   *m;
	float	   *v;
	float		decay;			/* 1 - lr wd */
	float		beta1;
	float		one_minus_beta1;
	float		beta2;
	float		one_minus_beta2;
	float		neg_step_size;	/* -lr / (1 - beta1^step) */
	float		bc2_sqrt;		/* sqrt(1 - beta2^step) */
	float		eps;
	float		grad_scale;
} adamw_args;

/*
 * AdamW over elements [lo, hi), in the order and roundings of torch's single-tensor AdamW:
 * decay, m.lerp_(g, 1 - beta1), v.mul_(beta2).addcmul_(g, g, 1 - beta2),
 * denom = sqrt(v) / bc2_sqrt + eps, p.addcdiv_(m, denom, -step_size).
 */
static void
adamw_elems(const void *ctx, size_t lo, size_t hi, int thread)
{
	const adamw_args *a = ctx;

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
void
cpu_adamw_update(dl_backend *be, float *param, const float *grad, float *m, float *v, size_t n,
				 const dl_adamw *h)
{
	adamw_args	a = {param, grad, m, v,
		(float) (1.0 - (double) h->lr * h->weight_decay),
		h->beta1, (float) (1.0 - (double) h->beta1),
		h->beta2, (float) (1.0 - (double) h->beta2),
		(float) (-(double) h->lr / (1.0 - pow(h->beta1, h->step))),
		(float) sqrt(1.0 - pow(h->beta2, h->step)),
	h->eps, h->grad_scale};

	cpu_for_rows(be, n, n < ADAMW_MIN_SPLIT ? 1 : cpu_threads(be), adamw_elems, &a);
}
