/*
 * test_backward.c: every backward operation of the CPU backend against central finite
 * differences of its forward, and the optimizer operations against double-precision
 * references of torch's formulas.
 *
 * Each check takes a scalar objective L = sum_i r_i out_i (r random, fixed; for the
 * cross-entropy L is the sum of the losses, as the op defines its gradient), runs the
 * backward with dout = r into gradient buffers that already hold random values (so that
 * accumulation is checked too), and compares what was added with
 * (L(x + h) - L(x - h)) / (2h), L summed in double from the float32 forward.
 *
 * Tolerance: the forward is float32, so L carries rounding noise of a few units of
 * 2^-24 of the outputs that x[i] moves, and the central difference a truncation error of
 * h^2/6 L'''. With h = 1e-2 on inputs and outputs of order 1 both are below 1e-4 of the
 * largest gradient (8e-5 is the worst seen); we require the error to be within 1e-3 of
 * it (normalised error, as ggml's test-backend-ops reports). A wrong formula (a missing
 * term, a factor, a sign, a wrong row or head) shows as an error of order 1 here.
 */
#include "harness.h"
#include "../../src/engine/backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FD_H 1e-2f
#define FD_TOL 1e-3

/* Deterministic uniform floats in [-1, 1). */
static float
frand(uint64_t *s)
{
	*s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
	return (float) ((*s >> 40) / (double) (1ULL << 24)) * 2.0f - 1.0f;
}

/* The buffers of one check, freed together. */
typedef struct bufs
{
	void	   *p[16];
	int			n;
} bufs;

/* A zeroed buffer of n floats owned by b. */
static float *
buf_zero(bufs *b, size_t n)
{
	return b->p[b->n++] = calloc(n ? n : 1, sizeof(float));
}

/* A buffer of n random floats in [-scale, scale). */
static float *
buf_rand(bufs *b, size_t n, float scale, uint64_t *s)
{
	float	   *v = buf_zero(b, n);

	for (size_t i = 0; i < n; i++)
		v[i] = scale * frand(s);
	return v;
}

/* A copy of n floats. */
static float *
buf_copy(bufs *b, const float *a, size_t n)
{
	float	   *v = buf_zero(b, n);

	memcpy(v, a, n * sizeof(float));
	return v;
}

/* Free every buffer of b. */
static void
bufs_free(bufs *b)
{
	while (b->n > 0)
		free(b->p[--b->n]);
}

/* sum r[i] out[i] in double. */
static double
dot(const float *r, const float *out, size_t n)
{
	double		s = 0;

	for (size_t i = 0; i < n; i++)
		s += (double) r[i] * out[i];
	return s;
}

typedef double (*objective_fn) (void *ctx);

/*
 * Normalised error of an accumulated gradient: max |(g - g0) - dL/dx| / max |dL/dx|
 * over the n elements of x, dL/dx by central differences.
 */
static double
fd_error(objective_fn f, void *ctx, float *x, size_t n, const float *g, const float *g0)
{
	double		maxd = 0,
				maxn = 0;

	for (size_t i = 0; i < n; i++)
	{
		float		x0 = x[i],
					xp = x0 + FD_H,
					xm = x0 - FD_H;
		double		lp,
					lm,
					num;

		x[i] = xp;
		lp = f(ctx);
		x[i] = xm;
		lm = f(ctx);
		x[i] = x0;
		num = (lp - lm) / ((double) xp - xm);
		maxd = fmax(maxd, fabs(((double) g[i] - g0[i]) - num));
		maxn = fmax(maxn, fabs(num));
	}
	return maxd / fmax(maxn, 1e-30);
}

/* --- embedding --- */

typedef struct emb_ctx
{
	dl_backend *be;
	float	   *table,
			   *out,
			   *r;
	const int32_t *ids;
	int			T,
				C;
} emb_ctx;

/* L of an embedding lookup. */
static double
emb_objective(void *p)
{
	emb_ctx    *c = p;

	c->be->embedding_forward(c->be, c->out, c->table, c->ids, c->T, c->C);
	return dot(c->r, c->out, (size_t) c->T * c->C);
}

TEST(backward_embedding_repeated_ids)
{
	static const int32_t ids[] = {3, 0, 3, 5, 3, 1, 0};
	dl_error	err;
	uint64_t	seed = 11;
	int			V = 6,
				T = 7;

	for (int threads = 1; threads <= 2; threads++)
		for (int C = 5; C <= 40; C += 35)
		{
			dl_backend *be;
			bufs		b = {0};
			emb_ctx		c;
			float	   *g0,
					   *g;
			double		e;

			CHECK_OK(backend_cpu_create(threads, 0, &be, &err), &err);
			c = (emb_ctx) {be, buf_rand(&b, (size_t) V * C, 1, &seed), buf_zero(&b, (size_t) T * C),
			buf_rand(&b, (size_t) T * C, 1, &seed), ids, T, C};
			g0 = buf_rand(&b, (size_t) V * C, 1, &seed);
			g = buf_copy(&b, g0, (size_t) V * C);
			be->embedding_backward(be, g, c.r, ids, T, C);
			e = fd_error(emb_objective, &c, c.table, (size_t) V * C, g, g0);
			bufs_free(&b);
			be->destroy(be);
			CHECKF(e < FD_TOL, "threads %d C %d: normalised error %g", threads, C, e);
		}
}

/* --- layer norm --- */

typedef struct ln_ctx
{
	dl_backend *be;
	float	   *in,
			   *w,
			   *b,
			   *out,
			   *mean,
			   *rstd,
			   *r;
	int			T,
				C;
} ln_ctx;

/* L of a layer norm. */
static double
ln_objective(void *p)
{
	ln_ctx	   *c = p;

	c->be->layernorm_forward(c->be, c->out, c->mean, c->rstd, c->in, c->w, c->b, c->T, c->C, 1e-5f);
	return dot(c->r, c->out, (size_t) c->T * c->C);
}

TEST(backward_layernorm)
{
	static const int shapes[][2] = {{1, 7}, {5, 37}, {9, 80}};
	dl_error	err;
	uint64_t	seed = 12;

	for (int threads = 1; threads <= 2; threads++)
		for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
		{
			dl_backend *be;
			bufs		b = {0};
			int			T = shapes[s][0],
						C = shapes[s][1];
			size_t		n = (size_t) T * C;
			ln_ctx		c;
			float	   *gin0,
					   *gw0,
					   *gb0,
					   *gin,
					   *gw,
					   *gb;
			double		ein,
						ew,
						eb;

			CHECK_OK(backend_cpu_create(threads, 0, &be, &err), &err);
			c = (ln_ctx) {be, buf_rand(&b, n, 2, &seed), buf_rand(&b, C, 1.5, &seed),
				buf_rand(&b, C, 1, &seed), buf_zero(&b, n), buf_zero(&b, T), buf_zero(&b, T),
			buf_rand(&b, n, 1, &seed), T, C};
			gin0 = buf_rand(&b, n, 1, &seed);
			gw0 = buf_rand(&b, C, 1, &seed);
			gb0 = buf_rand(&b, C, 1, &seed);
			gin = buf_copy(&b, gin0, n);
			gw = buf_copy(&b, gw0, C);
			gb = buf_copy(&b, gb0, C);
			ln_objective(&c);	/* mean and rstd as the training forward keeps them */
			be->layernorm_backward(be, gin, gw, gb, c.r, c.in, c.mean, c.rstd, c.w, T, C);
			ein = fd_error(ln_objective, &c, c.in, n, gin, gin0);
			ew = fd_error(ln_objective, &c, c.w, C, gw, gw0);
			eb = fd_error(ln_objective, &c, c.b, C, gb, gb0);
			bufs_free(&b);
			be->destroy(be);
			CHECKF(ein < FD_TOL && ew < FD_TOL && eb < FD_TOL,
				   "threads %d T %d C %d: din %g dw %g db %g", threads, T, C, ein, ew, eb);
		}
}

/* --- matrix product --- */

typedef struct mm_ctx
{
	dl_backend *be;
	float	   *in,
			   *W,
			   *bias,
			   *out,
			   *r;
	int			M,
				K,
				N;
} mm_ctx;

/* L of a matrix product with bias. */
static double
mm_objective(void *p)
{
	mm_ctx	   *c = p;

	c->be->matmul_forward(c->be, c->out, c->in, c->W, c->bias, c->M, c->K, c->N, 0);
	return dot(c->r, c->out, (size_t) c->M * c->N);
}

TEST(backward_matmul)
{
	/* one row, odd sizes, more rows and columns than threads split evenly */
	static const int shapes[][3] = {{1, 9, 5}, {4, 17, 33}, {37, 12, 40}};
	dl_error	err;
	uint64_t	seed = 13;

	for (int threads = 1; threads <= 2; threads++)
		for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
		{
			dl_backend *be;
			bufs		b = {0};
			int			M = shapes[s][0],
						K = shapes[s][1],
						N = shapes[s][2];
			mm_ctx		c;
			float	   *gin0,
					   *gW0,
					   *gb0,
					   *gin,
					   *gW,
					   *gb,
					   *gW2,
					   *gb2;
			double		ein,
						eW,
						eb;
			int			same;

			CHECK_OK(backend_cpu_create(threads, 0, &be, &err), &err);
			c = (mm_ctx) {be, buf_rand(&b, (size_t) M * K, 1, &seed),
				buf_rand(&b, (size_t) N * K, 1, &seed), buf_rand(&b, N, 1, &seed),
			buf_zero(&b, (size_t) M * N), buf_rand(&b, (size_t) M * N, 1, &seed), M, K, N};
			gin0 = buf_rand(&b, (size_t) M * K, 1, &seed);
			gW0 = buf_rand(&b, (size_t) N * K, 1, &seed);
			gb0 = buf_rand(&b, N, 1, &seed);
			gin = buf_copy(&b, gin0, (size_t) M * K);
			gW = buf_copy(&b, gW0, (size_t) N * K);
			gb = buf_copy(&b, gb0, N);
			gW2 = buf_copy(&b, gW0, (size_t) N * K);
			gb2 = buf_copy(&b, gb0, N);
			be->matmul_backward(be, gin, gW, gb, c.r, c.in, c.W, M, K, N);
			/* without din: the same parameter gradients */
			be->matmul_backward(be, NULL, gW2, gb2, c.r, c.in, c.W, M, K, N);
			same = memcmp(gW, gW2, (size_t) N * K * sizeof(float)) == 0 &&
				memcmp(gb, gb2, N * sizeof(float)) == 0;
			ein = fd_error(mm_objective, &c, c.in, (size_t) M * K, gin, gin0);
			eW = fd_error(mm_objective, &c, c.W, (size_t) N * K, gW, gW0);
			eb = fd_error(mm_objective, &c, c.bias, N, gb, gb0);
			bufs_free(&b);
			be->destroy(be);
			CHECKF(ein < FD_TOL && eW < FD_TOL && eb < FD_TOL,
				   "threads %d M %d K %d N %d: din %g dW %g db %g", threads, M, K, N, ein, eW, eb);
			CHECKF(same, "threads %d M %d K %d N %d: dW, db differ without din", threads, M, K, N);
		}
}

/* --- rotary --- */

typedef struct rope_ctx
{
	dl_backend *be;
	float	   *x,
			   *out,
			   *r;
	const int32_t *pos;
	const float *cos_sin;
	int			stride,
				T,
				n_head,
				head_dim,
				rot_dim,
				interleaved;
} rope_ctx;

/* L of a rotary embedding (on a copy: the op works in place). */
static double
rope_objective(void *p)
{
	rope_ctx   *c = p;
	size_t		n = (size_t) c->T * c->stride;

	memcpy(c->out, c->x, n * sizeof(float));
	c->be->rotary_forward(c->be, c->out, c->stride, c->T, c->n_head, c->head_dim, c->rot_dim,
						  c->interleaved, c->pos, c->cos_sin);
	return dot(c->r, c->out, n);
}

TEST(backward_rotary_both_layouts)
{
	static const int32_t pos[] = {0, 1, 2, 7, 3, 0, 11};
	dl_error	err;
	uint64_t	seed = 14;
	int			T = 7,
				n_head = 3,
				D = 8,
				rd = 6,
				stride = 3 * D + 5,
				maxpos = 12;
	size_t		n = (size_t) T * stride;
	dl_backend *be;
	bufs		b = {0};
	float	   *cs = buf_zero(&b, (size_t) maxpos * rd),
			   *zero = buf_zero(&b, n);

	for (int p = 0; p < maxpos; p++)
		for (int j = 0; j < rd / 2; j++)
		{
			double		th = p * pow(100.0, -2.0 * j / rd);

			cs[p * rd + j] = (float) cos(th);
			cs[p * rd + rd / 2 + j] = (float) sin(th);
		}
	CHECK_OK(backend_cpu_create(2, 0, &be, &err), &err);
	for (int interleaved = 0; interleaved <= 1; interleaved++)
	{
		rope_ctx	c = {be, buf_rand(&b, n, 1, &seed), buf_zero(&b, n), buf_rand(&b, n, 1, &seed),
		pos, cs, stride, T, n_head, D, rd, interleaved};
		/* in place: the output's gradient becomes the input's (nothing to accumulate) */
		float	   *g = buf_copy(&b, c.r, n);
		double		e;

		be->rotary_backward(be, g, stride, T, n_head, D, rd, interleaved, pos, cs);
		e = fd_error(rope_objective, &c, c.x, n, g, zero);
		if (!(e < FD_TOL))
		{
			bufs_free(&b);
			be->destroy(be);
		}
		CHECKF(e < FD_TOL, "interleaved %d: normalised error %g", interleaved, e);
	}
	bufs_free(&b);
	be->destroy(be);
}

/* --- attention --- */

typedef struct attn_ctx
{
	dl_backend *be;
	float	   *qkv,
			   *out,
			   *lse,
			   *r;
	const dl_spans *spans;
	int			T,
				n_head,
				head_dim;
	float		scale;
	void	   *ws;
} attn_ctx;

/* L of training attention. */
static double
attn_objective(void *p)
{
	attn_ctx   *c = p;

	c->be->attention_train_forward(c->be, c->out, c->lse, c->qkv, c->spans, c->n_head,
								   c->head_dim, c->scale, c->ws);
	return dot(c->r, c->out, (size_t) c->T * c->n_head * c->head_dim);
}

/* Largest error of out and lse against a double reference of causal attention per span. */
static double
attn_reference_error(const attn_ctx *c)
{
	int			H = c->n_head,
				D = c->head_dim,
				C = H * D;
	double		e = 0;

	for (int s = 0; s < c->spans->n; s++)
	{
		const dl_span *sp = &c->spans->host[s];

		for (int i = 0; i < sp->len; i++)
			for (int h = 0; h < H; h++)
			{
				const float *q = c->qkv + (size_t) (sp->first + i) * 3 * C + h * D;
				double		sc[64],
							m = -INFINITY,
							sum = 0;

				for (int j = 0; j <= i; j++)
				{
					const float *k = c->qkv + (size_t) (sp->first + j) * 3 * C + C + h * D;

					sc[j] = 0;
					for (int d = 0; d < D; d++)
						sc[j] += (double) q[d] * k[d];
					sc[j] *= c->scale;
					m = fmax(m, sc[j]);
				}
				for (int j = 0; j <= i; j++)
					sum += exp(sc[j] - m);
				e = fmax(e, fabs(c->lse[(size_t) (sp->first + i) * H + h] - (m + log(sum))));
				for (int d = 0; d < D; d++)
				{
					double		o = 0;

					for (int j = 0; j <= i; j++)
						o += exp(sc[j] - m) / sum *
							c->qkv[(size_t) (sp->first + j) * 3 * C + 2 * C + h * D + d];
					e = fmax(e, fabs(c->out[(size_t) (sp->first + i) * C + h * D + d] - o));
				}
			}
	}
	return e;
}

TEST(backward_attention_several_sequences)
{
	/* one token, a few, and more than one block of 32 queries (at most 64: the reference) */
	static const dl_span sp[] = {{0, 5, 0, 0}, {5, 1, 0, 0}, {6, 37, 0, 0}, {43, 2, 0, 0}};
	dl_spans	spans = {4, sp, sp};
	dl_error	err;
	uint64_t	seed = 15;
	int			T = 45,
				H = 2,
				D = 8,
				C = H * D;
	size_t		n = (size_t) T * 3 * C;

	for (int threads = 1; threads <= 2; threads++)
	{
		dl_backend *be;
		bufs		b = {0};
		attn_ctx	c;
		float	   *g0,
				   *g;
		double		e,
					eref;

		CHECK_OK(backend_cpu_create(threads, 0, &be, &err), &err);
		c = (attn_ctx) {be, buf_rand(&b, n, 1.5, &seed), buf_zero(&b, (size_t) T * C),
			buf_zero(&b, (size_t) T * H), buf_rand(&b, (size_t) T * C, 1, &seed), &spans, T, H, D,
			1.0f / sqrtf((float) D),
		buf_zero(&b, be->attention_train_workspace(be, 37, H) / sizeof(float))};
		g0 = buf_rand(&b, n, 1, &seed);
		g = buf_copy(&b, g0, n);
		attn_objective(&c);
		eref = attn_reference_error(&c);
		be->attention_backward(be, g, c.r, c.qkv, c.out, c.lse, &spans, H, D, c.scale, c.ws);
		e = fd_error(attn_objective, &c, c.qkv, n, g, g0);
		bufs_free(&b);
		be->destroy(be);
		CHECKF(eref < 1e-5, "threads %d: forward differs from the reference by %g", threads, eref);
		CHECKF(e < FD_TOL, "threads %d: normalised error %g", threads, e);
	}
}

/* --- GELU --- */

TEST(backward_gelu_both_forms)
{
	dl_error	err;
	uint64_t	seed = 16;
	dl_backend *be;
	bufs		b = {0};
	double		worst = 0;

	CHECK_OK(backend_cpu_create(2, 0, &be, &err), &err);
	for (int form = DL_GELU_TANH; form <= DL_GELU_ERF; form++)
		/* below and above the size at which the op splits over threads */
		for (size_t n = 301; n <= 4501; n += 4200)
		{
			float	   *x = buf_rand(&b, n, 5, &seed),
					   *r = buf_rand(&b, n, 1, &seed),
					   *g0 = buf_rand(&b, n, 1, &seed),
					   *g = buf_copy(&b, g0, n),
					   *xp = buf_zero(&b, n),
					   *xm = buf_zero(&b, n),
					   *yp = buf_zero(&b, n),
					   *ym = buf_zero(&b, n);
			double		maxd = 0,
						maxn = 0;

			/* elementwise: every central difference from one pair of forward calls */
			for (size_t i = 0; i < n; i++)
			{
				xp[i] = x[i] + FD_H;
				xm[i] = x[i] - FD_H;
			}
			be->gelu_forward(be, yp, xp, n, form);
			be->gelu_forward(be, ym, xm, n, form);
			be->gelu_backward(be, g, x, r, n, form);
			for (size_t i = 0; i < n; i++)
			{
				double		num = r[i] * ((double) yp[i] - ym[i]) / ((double) xp[i] - xm[i]);

				maxd = fmax(maxd, fabs(((double) g[i] - g0[i]) - num));
				maxn = fmax(maxn, fabs(num));
			}
			worst = fmax(worst, maxd / maxn);
			bufs_free(&b);
		}
	be->destroy(be);
	CHECKF(worst < FD_TOL, "normalised error %g", worst);
}

/* --- cross-entropy --- */

typedef struct xent_ctx
{
	dl_backend *be;
	float	   *logits,
			   *losses;
	const int32_t *labels;
	int			T,
				V;
} xent_ctx;

/* L = the sum of the losses. */
static double
xent_objective(void *p)
{
	xent_ctx   *c = p;
	double		s = 0;

	c->be->crossentropy_forward(c->be, c->losses, NULL, c->logits, c->labels, c->T, c->V);
	for (int t = 0; t < c->T; t++)
		s += c->losses[t];
	return s;
}

TEST(backward_crossentropy_masked)
{
	static const int32_t labels[] = {3, -100, 0, 36, -100, 17};
	dl_error	err;
	uint64_t	seed = 17;
	int			T = 6;

	for (int V = 37; V <= 300; V += 263)
	{
		dl_backend *be;
		bufs		b = {0};
		size_t		n = (size_t) T * V;
		xent_ctx	c;
		float	   *d,
				   *inplace;
		double		e,
					eloss = 0;
		int			masked_zero = 1,
					same;

		CHECK_OK(backend_cpu_create(2, 0, &be, &err), &err);
		c = (xent_ctx) {be, buf_rand(&b, n, 4, &seed), buf_zero(&b, T), labels, T, V};
		d = buf_rand(&b, n, 1, &seed);
		be->crossentropy_forward(be, c.losses, d, c.logits, labels, T, V);
		/* the losses against log-softmax in double */
		for (int t = 0; t < T; t++)
		{
			const float *x = c.logits + (size_t) t * V;
			double		m = -INFINITY,
						s = 0;

			for (int j = 0; j < V; j++)
				m = fmax(m, x[j]);
			for (int j = 0; j < V; j++)
				s += exp(x[j] - m);
			eloss = fmax(eloss, fabs(c.losses[t] - (labels[t] < 0 ? 0 : m + log(s) - x[labels[t]])));
			for (int j = 0; j < V && labels[t] < 0; j++)
				masked_zero &= d[(size_t) t * V + j] == 0.0f;
		}
		/* written, not accumulated: the starting value is zero whatever d held */
		e = fd_error(xent_objective, &c, c.logits, n, d, buf_zero(&b, n));
		inplace = buf_copy(&b, c.logits, n);
		be->crossentropy_forward(be, c.losses, inplace, inplace, labels, T, V);
		same = memcmp(inplace, d, n * sizeof(float)) == 0;
		bufs_free(&b);
		be->destroy(be);
		CHECKF(eloss < 1e-5, "V %d: loss differs from log-softmax by %g", V, eloss);
		CHECKF(masked_zero, "V %d: a masked row has a nonzero gradient", V);
		CHECKF(e < FD_TOL, "V %d: normalised error %g", V, e);
		CHECKF(same, "V %d: the in-place gradient differs", V);
	}
}

/* --- optimizer --- */

TEST(backward_sum_squares_and_adamw_match_torch_formulas)
{
	dl_error	err;
	uint64_t	seed = 18;
	size_t		n = 70001;		/* above the sizes at which both ops split into tasks */
	dl_backend *be;
	bufs		b = {0};
	float	   *p = buf_rand(&b, n, 1, &seed),
			   *m = buf_zero(&b, n),
			   *v = buf_zero(&b, n),
			   *g = buf_rand(&b, n, 0.01f, &seed);
	double	   *ref = calloc(3 * n, sizeof(double));
	double		ss = 0,
				got = 0,
				e = 0;
	dl_adamw	h = {1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 0.5f, 0};

	CHECK_OK(backend_cpu_create(2, 0, &be, &err), &err);
	for (size_t i = 0; i < n; i++)
	{
		ss += (double) g[i] * g[i];
		ref[i] = p[i];
	}
	if (be->sum_squares(be, g, n, &got, &err) == DL_OK)
		/* three steps with the same gradient; the reference in double: p | m | v */
		for (h.step = 1; h.step <= 3; h.step++)
		{
			be->adamw_update(be, p, g, m, v, n, &h);
			for (size_t i = 0; i < n; i++)
			{
				double		gi = (double) g[i] * h.grad_scale;
				double	   *rp = &ref[i],
						   *rm = &ref[n + i],
						   *rv = &ref[2 * n + i];

				*rp *= 1.0 - (double) h.lr * h.weight_decay;
				*rm = h.beta1 * *rm + (1 - (double) h.beta1) * gi;
				*rv = h.beta2 * *rv + (1 - (double) h.beta2) * gi * gi;
				*rp -= h.lr / (1 - pow(h.beta1, h.step)) * *rm /
					(sqrt(*rv) / sqrt(1 - pow(h.beta2, h.step)) + h.eps);
			}
		}
	for (size_t i = 0; i < n; i++)
		e = fmax(e, fabs(p[i] - ref[i]));
	bufs_free(&b);
	free(ref);
	be->destroy(be);
	CHECKF(fabs(got - ss) <= 1e-12 * ss, "sum of squares %.17g, expected %.17g", got, ss);
	/* each step moves a parameter by about lr: allow float32 rounding of that and of p */
	CHECKF(e < 1e-6, "AdamW differs from the double reference by %g", e);
}
