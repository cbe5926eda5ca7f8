/*
 * cpu_activation.c: GELU in both of its forms, elementwise on float32, and its backward.
 *
 * DL_GELU_TANH: gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-J's;
 * DL_GELU_ERF: x Phi(x) = 0.5 x (1 + erf(x / sqrt(2))), torch.nn.functional.gelu, NeoX's.
 * tanh and erf are written out over fast_expf so that the loops vectorise.
 */
#include "backend_cpu.h"
#include "cpu_vec.h"

#include <math.h>

/* elements below which GELU runs on the calling thread alone */
#define GELU_MIN_SPLIT 4096

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

typedef struct gelu_args
{
	float	   *out;			/* forward: out = gelu(in) */
	float	   *din;			/* backward: din += gelu'(in) dout */
	const float *in;
	const float *dout;
	dl_gelu		form;
} gelu_args;

/* GELU of elements [lo, hi). */
static void
gelu_elems(const void *ctx, size_t lo, size_t hi, int thread)
{
	const gelu_args *a = ctx;
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

/* GELU's backward over elements [lo, hi). */
static void
gelu_back_elems(const void *ctx, size_t lo, size_t hi, int thread)
{
	const gelu_args *a = ctx;
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

/* Tasks of n elements: one per thread, or the caller alone for a few. */
static int
gelu_tasks(dl_backend *be, size_t n)
{
	return n < GELU_MIN_SPLIT ? 1 : cpu_threads(be);
}

/* Elementwise GELU, chunks over the pool. */
void
cpu_gelu_forward(dl_backend *be, float *out, const float *in, size_t n, dl_gelu form)
{
	gelu_args	a = {.out = out, .in = in, .form = form};

	cpu_for_rows(be, n, gelu_tasks(be, n), gelu_elems, &a);
}

/* Elementwise GELU backward, chunks over the pool. */
void
cpu_gelu_backward(dl_backend *be, float *din, const float *in, const float *dout, size_t n,
				  dl_gelu form)
{
	gelu_args	a = {.din = din, .in = in, .dout = dout, .form = form};

	cpu_for_rows(be, n, gelu_tasks(be, n), gelu_back_elems, &a);
}
