/*
 * sampling.cu: sample_forward, one block per row of logits, so that generation moves
 * token ids off the device instead of rows of logits.
 *
 * The kept set is sampler.h's, found without sorting: the k-th largest logit and the
 * top-p cut are bisections over order-preserving integer keys, each step one pass over
 * the row and a block reduction. Top-p masses are sampler_fx.h's exact sums, so the cut
 * is the CPU's whatever order the threads add in. The draw walks the kept weights in id
 * order as sample_draw does: each thread a contiguous chunk, placed by a block scan of
 * the chunk sums. A token can differ from the CPU's only through rounding, where the
 * uniform (or the top-p cut) falls at a boundary: the softmax's and the draw's double
 * sums are added in another order, and exp may differ from libm's expf in the last bit
 * for a result next to a rounding midpoint.
 */
#include "common.cuh"

extern "C" {
#include "sampler_fx.h"
}

/* Threads per row: a power of two (the reductions' second stage assumes it). */
#define SAMPLE_BLOCK 512
#define SAMPLE_WARPS (SAMPLE_BLOCK / 32)
#define NO_TOKEN INT32_MAX

/* A candidate for the first argmax: its value and index (NO_TOKEN: none). */
typedef struct argmax_t
{
	float		v;
	int32_t		i;
} argmax_t;

/* The first argmax of two candidates, NaN counting as the largest value (torch.argmax). */
static __device__ __forceinline__ argmax_t
first_argmax(argmax_t a, argmax_t b)
{
	bool		an = isnan(a.v),
				bn = isnan(b.v);

	if (a.i == NO_TOKEN || b.i == NO_TOKEN)
		return a.i == NO_TOKEN ? b : a;
	if (an != bn)
		return an ? a : b;
	if (!an && a.v != b.v)
		return a.v > b.v ? a : b;
	return a.i < b.i ? a : b;
}

/* Float bits mapped so that unsigned order is float order, -0 tied with +0 as == has it. */
static __device__ __forceinline__ uint32_t
order_key(float f)
{
	uint32_t	b = __float_as_uint(f);

	if (b == 0x80000000u)
		b = 0;
	return b & 0x80000000u ? ~b : b | 0x80000000u;
}

/* The float of an order_key. */
static __device__ __forceinline__ float
key_float(uint32_t k)
{
	return __uint_as_float(k & 0x80000000u ? k & 0x7fffffffu : ~k);
}

/* A token's place in top-p's order: x, then its id (the ascending stable sort). */
static __device__ __forceinline__ uint64_t
topp_key(float x, int j)
{
	return (uint64_t) order_key(x) << 32 | (uint32_t) j;
}

static __device__ __forceinline__ fx192
add_fx(fx192 a, fx192 b)
{
	fx_add(&a, &b);
	return a;
}

/* Shared memory of the reductions, one type at a time. */
typedef union sample_red
{
	argmax_t	am[SAMPLE_WARPS];
	float		f[SAMPLE_WARPS];
	int			i[SAMPLE_WARPS];
	double		d[SAMPLE_WARPS];
	uint64_t	k[SAMPLE_WARPS];
	fx192		fx[SAMPLE_WARPS];
} sample_red;

/* The exact mass of the tokens that top-p's order puts above c. */
static __device__ fx192
mass_above(const float *x, const float *p, int V, uint64_t c, sample_red *red)
{
	fx192		m = {{0, 0, 0}};

	for (int j = threadIdx.x; j < V; j += blockDim.x)
		if (p[j] > 0.0f && topp_key(x[j], j) > c)
			fx_add_float(&m, p[j]);
	return block_reduce(m, red->fx, add_fx);
}

/*
 * The least key c whose tokens above survive the cut (every token from c up is kept),
 * built bit by bit from the top: bit b of c is 0 when the largest key with the bits
 * found so far and b clear still leaves a surviving mass. Index bits at and above
 * nbits (2^nbits >= V) are 0 for free: no index reaches them.
 */
static __device__ uint64_t
topp_threshold(const float *x, const float *p, int V, const topp_cut *cut, sample_red *red)
{
	uint64_t	c = 0;
	int			nbits = 0;

	while ((1u << nbits) < (unsigned) V)
		nbits++;
	for (int b = 63; b >= 0; b = b == 32 ? nbits - 1 : b - 1)
	{
		fx192		m = mass_above(x, p, V, c | ((UINT64_C(1) << b) - 1), red);

		if (!topp_keeps(cut, &m))
			c |= UINT64_C(1) << b;
	}
	return c;
}

/* The k-th largest of x[0, V) (k in [1, V)): the largest key that k values reach. */
static __device__ float
kth_largest(const float *x, int V, int k, sample_red *red)
{
	uint32_t	r = 0;

	for (int b = 31; b >= 0; b--)
	{
		uint32_t	t = r | 1u << b;
		int			n = 0;

		for (int j = threadIdx.x; j < V; j += blockDim.x)
			n += order_key(x[j]) >= t;
		if (block_reduce(n, red->i, add<int>) >= k)
			r = t;
	}
	return key_float(r);
}

/*
 * Where u * (kept mass) falls among the kept weights w(j) (0 for dropped tokens) in id
 * order, as sample_draw: each thread sums its chunk, a scan places the chunks, and the
 * chunk holding the target walks to it. scan: SAMPLE_BLOCK doubles of shared memory.
 */
template <typename W>
static __device__ int32_t
draw(W w, int V, double u, double *scan, sample_red *red)
{
	int			chunk = (V + blockDim.x - 1) / blockDim.x,
				lo = min(V, (int) threadIdx.x * chunk),
				hi = min(V, lo + chunk),
				tid = threadIdx.x;
	int32_t		hit = NO_TOKEN,
				last = -1;
	double		s = 0.0,
				acc,
				target;

	__syncthreads();			/* p was written in the strided layout, by other threads */
	for (int j = lo; j < hi; j++)
		s += w(j);
	scan[tid] = s;
	for (int off = 1; off < (int) blockDim.x; off <<= 1)
	{
		double		v;

		__syncthreads();
		v = tid >= off ? scan[tid - off] : 0.0;
		__syncthreads();
		scan[tid] += v;
	}
	__syncthreads();
	target = u * scan[blockDim.x - 1];
	acc = tid ? scan[tid - 1] : 0.0;
	for (int j = lo; j < hi; j++)
	{
		float		wj = w(j);

		if (wj > 0.0f)
		{
			last = j;
			acc += wj;
			if (target < acc)
			{
				hit = j;
				break;
			}
		}
	}
	hit = block_reduce(hit, red->i, [](int a, int b) { return a < b ? a : b; });
	if (hit != NO_TOKEN)
		return hit;
	/* rounding left the target at the very top: the last token that has any weight */
	return block_reduce(last, red->i, [](int a, int b) { return a > b ? a : b; });
}

/*
 * Row blockIdx.x: greedy or no distribution (NaN, infinite maximum) gives the first
 * argmax; else the tempered logits x and their probabilities p go to the workspace
 * ([2, V] per row), the cuts and the draw follow.
 */
__global__ static void __launch_bounds__(SAMPLE_BLOCK)
sample_kernel(int32_t *tokens, const float *logits, const dl_sample_row *rows, int V, float *ws)
{
	__shared__ sample_red red;
	__shared__ double scan[SAMPLE_BLOCK];
	const float *l = logits + (size_t) blockIdx.x * V;
	float	   *x = ws + (size_t) blockIdx.x * 2 * V,
			   *p = x + V;
	const dl_sample_row row = rows[blockIdx.x];
	const dl_sampling *sp = &row.p;
	argmax_t	best = {0.0f, NO_TOKEN};
	float		maxv = -INFINITY,
				kth = -INFINITY;
	double		sum = 0.0;
	int32_t		tok;

	for (int j = threadIdx.x; j < V; j += blockDim.x)
	{
		best = first_argmax(best, argmax_t {l[j], j});
		if (sp->do_sample)
		{
			x[j] = l[j] / sp->temperature;
			maxv = x[j] > maxv ? x[j] : maxv;
		}
	}
	best = block_reduce(best, red.am, first_argmax);
	maxv = block_reduce(maxv, red.f, [](float a, float b) { return a > b ? a : b; });
	if (!sp->do_sample || isnan(best.v) || !isfinite(maxv))
	{
		if (threadIdx.x == 0)
			tokens[blockIdx.x] = best.i;
		return;
	}

	if (sp->top_k > 0 && sp->top_k < V)
		kth = kth_largest(x, V, sp->top_k, &red);
	/*
	 * expf rounded correctly through double: CUDA's expf is off by up to 2 ulp, libm's
	 * (the CPU's) by at most 0.502, so the two agree but at a hair from a midpoint
	 */
	for (int j = threadIdx.x; j < V; j += blockDim.x)
	{
		p[j] = x[j] >= kth ? (float) exp((double) (x[j] - maxv)) : 0.0f;
		sum += p[j];
	}
	sum = block_reduce(sum, red.d, add<double>);
	for (int j = threadIdx.x; j < V; j += blockDim.x)
		p[j] = (float) (p[j] / sum);

	if (sp->top_p < 1.0f)
	{
		fx192		total = {{0, 0, 0}},
					none = {{0, 0, 0}};
		topp_cut	cut;

		for (int j = threadIdx.x; j < V; j += blockDim.x)
			fx_add_float(&total, p[j]);
		total = block_reduce(total, red.fx, add_fx);
		cut = topp_cut_make(&total, sp->top_p);
		if (!topp_keeps(&cut, &none))
		{
			/* not even the most likely token alone survives: it is kept anyway */
			uint64_t	top = 0;

			for (int j = threadIdx.x; j < V; j += blockDim.x)
				top = topp_key(x[j], j) > top ? topp_key(x[j], j) : top;
			top = block_reduce(top, red.k, [](uint64_t a, uint64_t b) { return a > b ? a : b; });
			tok = (int32_t) (uint32_t) top;
		}
		else
		{
			uint64_t	c = topp_threshold(x, p, V, &cut, &red);

			tok = draw([=](int j) { return topp_key(x[j], j) >= c ? p[j] : 0.0f; }, V, row.u,
					   scan, &red);
		}
	}
	else
		tok = draw([=](int j) { return x[j] >= kth ? p[j] : 0.0f; }, V, row.u, scan, &red);
	if (threadIdx.x == 0)
		tokens[blockIdx.x] = tok;
}

/* One block per row. */
void
cuda_sample_forward(dl_backend *be, int32_t *tokens, const float *logits,
					const dl_sample_row *rows, int R, int V, void *workspace)
{
	cuda_backend *cb = cuda_enter(be);

	if (R <= 0 || V <= 0)
		return;
	sample_kernel<<<R, SAMPLE_BLOCK, 0, cb->stream>>>(tokens, logits, rows, V, (float *) workspace);
	cuda_check_launch(cb, "sample_forward");
}

/* x and p of every row: [R, 2, V] floats. */
size_t
cuda_sample_workspace(dl_backend *be, int R, int V)
{
	(void) be;
	return (size_t) R * 2 * V * sizeof(float);
}
