/*
 * cpu_loss.c: softmax cross-entropy of rows of logits [T, V] against labels, with the
 * gradient of the summed loss written over (or beside) the logits: where the backward
 * pass starts. A masked row (label < 0) has loss 0 and gradient 0.
 */
#include "backend_cpu.h"
#include "cpu_vec.h"

#include <math.h>
#include <string.h>

typedef struct xent_args
{
	float	   *losses;
	float	   *dlogits;		/* NULL: losses only; may be logits itself */
	const float *logits;
	const int32_t *labels;
	int			V;
} xent_args;

/*
 * Rows [lo, hi): losses[t] = logsumexp(x) - x[y], d = softmax(x) - onehot(y); the label's
 * logit is read before d overwrites it.
 */
static void
xent_rows(const void *ctx, size_t lo, size_t hi, int thread)
{
	const xent_args *a = ctx;
	int			V = a->V;

	(void) thread;
	for (size_t t = lo; t < hi; t++)
	{
		const float *x = a->logits + t * V;
		float	   *d = a->dlogits ? a->dlogits + t * V : NULL;
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
void
cpu_crossentropy_forward(dl_backend *be, float *losses, float *dlogits, const float *logits,
						 const int32_t *labels, int T, int V)
{
	xent_args	a = {losses, dlogits, logits, labels, V};

	cpu_for_rows(be, T, cpu_row_tasks(be, T, V), xent_rows, &a);
}
