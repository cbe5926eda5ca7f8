/*
 * cpu_sampling.c: sample_forward, sampler.c's sample_draw on each row of logits, rows
 * over the pool, so that generation takes token ids from the backend as CUDA's does.
 */
#include "backend_cpu.h"
#include "sampler.h"

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

/* Rows [lo, hi) through the sampler, in the calling thread's scratch. */
static void
sample_rows(const void *ctx, size_t lo, size_t hi, int thread)
{
	const sample_args *a = ctx;
	float	   *scratch = (float *) (a->workspace + thread * sample_scratch_bytes(a->V));

	for (size_t r = lo; r < hi; r++)
		a->tokens[r] = sample_draw(a->logits + r * a->V, a->V, &a->rows[r],
								   scratch, (int32_t *) (scratch + 2 * (size_t) a->V));
}

/* sample_draw per row, a task each (a row is a whole vocabulary's work). */
void
cpu_sample_forward(dl_backend *be, int32_t *tokens, const float *logits,
				   const dl_sample_row *rows, int R, int V, void *workspace)
{
	sample_args a = {tokens, logits, rows, V, workspace};

	cpu_for_rows(be, R, R, sample_rows, &a);
}

/* Scratch for every thread of the pool, whatever R. */
size_t
cpu_sample_workspace(dl_backend *be, int R, int V)
{
	(void) R;
	return cpu_threads(be) * sample_scratch_bytes(V);
}
