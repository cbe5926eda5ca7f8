/*
 * cpu_rotary.c: rotary position embedding in place on the first rot_dim dimensions of
 * every head of rows of x (GPT-J's interleaved pairs, or NeoX's two halves), and its
 * backward: the same rotation by the opposite angle.
 */
#include "backend_cpu.h"

typedef struct rope_args
{
	float	   *x;
	int			stride;
	int			n_head;
	int			head_dim;
	int			rot_dim;
	int			interleaved;
	const int32_t *pos;
	const float *cos_sin;		/* [positions, rot_dim]: cos, then sin, rot_dim / 2 each */
	float		sign;			/* 1: rotate by +angle (forward), -1: by -angle (backward) */
} rope_args;

/* Rotate rows [lo, hi). */
static void
rope_rows(const void *ctx, size_t lo, size_t hi, int thread)
{
	const rope_args *a = ctx;
	int			half = a->rot_dim / 2;

	(void) thread;
	for (size_t t = lo; t < hi; t++)
	{
		const float *c = a->cos_sin + (size_t) a->pos[t] * a->rot_dim;
		const float *s = c + half;
		float		sg = a->sign;

		for (int h = 0; h < a->n_head; h++)
		{
			float	   *x = a->x + t * a->stride + (size_t) h * a->head_dim;

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

/* Rotate T rows of x by sign times their positions' angles, rows over the pool. */
static void
rope(dl_backend *be, float *x, int stride, int T, int n_head, int head_dim, int rot_dim,
	 int interleaved, const int32_t *pos, const float *cos_sin, float sign)
{
	rope_args	a = {x, stride, n_head, head_dim, rot_dim, interleaved, pos, cos_sin, sign};

	cpu_for_rows(be, T, cpu_row_tasks(be, T, (size_t) n_head * rot_dim), rope_rows, &a);
}

/* Rotary embedding in place. */
void
cpu_rotary_forward(dl_backend *be, float *x, int stride, int T, int n_head, int head_dim,
				   int rot_dim, int interleaved, const int32_t *pos, const float *cos_sin)
{
	rope(be, x, stride, T, n_head, head_dim, rot_dim, interleaved, pos, cos_sin, 1.0f);
}

/* The gradient through the rotation: the same rotation by the opposite angle. */
void
cpu_rotary_backward(dl_backend *be, float *dx, int stride, int T, int n_head, int head_dim,
					int rot_dim, int interleaved, const int32_t *pos, const float *cos_sin)
{
	rope(be, dx, stride, T, n_head, head_dim, rot_dim, interleaved, pos, cos_sin, -1.0f);
}
