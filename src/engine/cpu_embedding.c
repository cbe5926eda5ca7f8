/*
 * cpu_embedding.c: row gathers into float32, the token embedding (a table in weight
 * format) and the selection of the rows whose logits are wanted; and the embedding's
 * backward, a scatter that adds rows of the gradient into the table's gradient.
 */
#include "backend_cpu.h"
#include "bf16.h"

#include <string.h>

/* A gather: out[i] = in[rows[i]], C floats a row. */
typedef struct gather_args
{
	float	   *out;
	const void *in;
	int			bf16;			/* in is bfloat16 */
	const int32_t *rows;
	int			C;
} gather_args;

/* Copy rows [lo, hi) of the selection, widened to float32 from bfloat16 if need be. */
static void
gather_rows(const void *ctx, size_t lo, size_t hi, int thread)
{
	const gather_args *a = ctx;

	(void) thread;
	for (size_t i = lo; i < hi; i++)
	{
		float	   *o = a->out + i * a->C;
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
gather(dl_backend *be, float *out, const void *in, int bf16, const int32_t *rows, int n, int C)
{
	gather_args a = {out, in, bf16, rows, C};

	cpu_for_rows(be, n, cpu_row_tasks(be, n, C), gather_rows, &a);
}

/* An embedding lookup is a gather of the table's rows. */
void
cpu_embedding_forward(dl_backend *be, float *out, const void *table, const int32_t *ids,
					  int T, int C)
{
	gather(be, out, table, cpu_of(be)->bf16, ids, T, C);
}

/* Rows whose logits are wanted. */
void
cpu_gather_rows_forward(dl_backend *be, float *out, const float *in, const int32_t *rows,
						int n, int C)
{
	gather(be, out, in, 0, rows, n, C);
}

/* The embedding's backward: dtable[ids[t]] += dout[t]. */
typedef struct scatter_args
{
	float	   *dtable;
	const float *dout;
	const int32_t *ids;
	int			T;
	int			C;
} scatter_args;

/*
 * Columns [c0, c1) of every row: tasks own columns, not rows, so that repeated ids
 * (the same token twice in a batch) never make two threads add to one element.
 */
static void
scatter_cols(const void *ctx, size_t c0, size_t c1, int thread)
{
	const scatter_args *a = ctx;

	(void) thread;
	for (int t = 0; t < a->T; t++)
	{
		float	   *d = a->dtable + (size_t) a->ids[t] * a->C;
		const float *g = a->dout + (size_t) t * a->C;

		for (size_t c = c0; c < c1; c++)
			d[c] += g[c];
	}
}

/* Scatter-add of rows into the table's gradient, column blocks over the pool. */
void
cpu_embedding_backward(dl_backend *be, float *dtable, const float *dout, const int32_t *ids,
					   int T, int C)
{
	scatter_args a = {dtable, dout, ids, T, C};

	cpu_for_cols(be, C, cpu_threads(be), scatter_cols, &a);
}
