/*
 * cpu_layernorm.c: torch.nn.LayerNorm over the rows of a float32 matrix [T, C], in two
 * passes (mean, then the centred variance) for accuracy; and its backward, din by rows
 * and the weight and bias gradients by columns, in one pass of the pool.
 */
#include "backend_cpu.h"
#include "cpu_vec.h"

#include <math.h>

typedef struct layernorm_args
{
	float	   *out;
	float	   *mean;
	float	   *rstd;
	const float *in;
	const float *w;
	const float *b;
	int			C;
	float		eps;
} layernorm_args;

/* Normalise rows [lo, hi), keeping each row's mean and 1 / std if asked. */
static void
layernorm_rows(const void *ctx, size_t lo, size_t hi, int thread)
{
	const layernorm_args *a = ctx;

	(void) thread;
	for (size_t t = lo; t < hi; t++)
	{
		const float *x = a->in + t * a->C;
		float	   *y = a->out + t * a->C;
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

/* out[T, C] = layernorm(in) * w + b, rows over the pool. */
void
cpu_layernorm_forward(dl_backend *be, float *out, float *mean, float *rstd, const float *in,
					  const float *w, const float *b, int T, int C, float eps)
{
	layernorm_args a = {out, mean, rstd, in, w, b, C, eps};

	cpu_for_rows(be, T, cpu_row_tasks(be, T, C), layernorm_rows, &a);
}

typedef struct layernorm_back_args
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
} layernorm_back_args;

/* din of rows [lo, hi) += rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)). */
static void
layernorm_back_rows(const void *ctx, size_t lo, size_t hi, int thread)
{
	const layernorm_back_args *a = ctx;
	int			C = a->C;

	(void) thread;
	for (size_t t = lo; t < hi; t++)
	{
		const float *x = a->in + t * C;
		const float *g = a->dout + t * C;
		float	   *d = a->din + t * C;
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

/* dw and db of columns [c0, c1) += sums over every row, in double. */
static void
layernorm_back_cols(const void *ctx, size_t c0, size_t c1, int thread)
{
	const layernorm_back_args *a = ctx;

	(void) thread;
	for (size_t cb = c0; cb < c1; cb += COLSUM_BLOCK)
	{
		int			n = c1 - cb < COLSUM_BLOCK ? (int) (c1 - cb) : COLSUM_BLOCK;
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

/* Layer norm backward: din by rows and dw, db by columns, in one pass of the pool. */
void
cpu_layernorm_backward(dl_backend *be, float *din, float *dw, float *db, const float *dout,
					   const float *in, const float *mean, const float *rstd, const float *w,
					   int T, int C)
{
	layernorm_back_args a = {din, dw, db, dout, in, mean, rstd, w, T, C};
	cpu_loop	loops[] = {
		{layernorm_back_rows, T, cpu_row_tasks(be, T, C), 1},
		{layernorm_back_cols, C, dw ? cpu_threads(be) : 0, CPU_COL_GRAIN},
	};

	cpu_for_loops(be, &a, loops, 2);
}
