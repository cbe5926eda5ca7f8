/*
 * sampling.cu: sample_forward, one block per row of logits, so that generation moves
 * token ids off the device instead of rows of logits.
 *
 * The kept set is sampler.h's, found without sorting the row. The k-th largest logit is a
 * bisection over order-preserving integer keys. The top-p cut is a radix select, as
 * vLLM's and FlashInfer's samplers find theirs: each level buckets the tokens still in
 * play by the next RADIX_BITS bits of their rank, sums each bucket's mass, and keeps the
 * one bucket where the cumulative mass crosses the cut; once that bucket holds at most a
 * block's worth of tokens, they are compared directly. A row takes one pass per level
 * (at most 9, usually 1 or 2) and one for the candidates, where the bisection over 64-bit
 * keys took 48. Top-p masses are sampler_fx.h's exact sums, so the cut is the CPU's
 * whatever order the threads add in. The draw walks the kept weights in id order as
 * sample_draw does: each thread a contiguous chunk, placed by a block scan of the chunk
 * sums. A token can differ from the CPU's only through rounding, where the uniform (or
 * the top-p cut) falls at a boundary: the softmax's and the draw's double sums are added
 * in another order, and exp may differ from libm's expf in the last bit for a result
 * next to a rounding midpoint.
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

/* Shared memory of the block scans: the draw's chunk sums, the radix select's bucket masses. */
typedef union sample_scan
{
	double		d[SAMPLE_BLOCK];
	fx192		fx[SAMPLE_BLOCK];
} sample_scan;

/*
 * Whether a token with `before` mass ranked above it is kept: the cut's rule, and the
 * most likely token whatever the cut (min_tokens_to_keep = 1). Monotone: true up to some
 * mass, false beyond.
 */
static __device__ __forceinline__ bool
topp_survives(const topp_cut *cut, const fx192 *before)
{
	return topp_keeps(cut, before) || (before->w[0] | before->w[1] | before->w[2]) == 0;
}

/*
 * v's inclusive scan over the block (op associative), left in scan[0, blockDim.x):
 * scan[blockDim.x - 1] is the whole, scan[tid - 1] what comes before thread tid.
 */
template <typename T, typename Op>
static __device__ void
block_scan(T v, T *scan, Op op)
{
	int			tid = threadIdx.x;

	scan[tid] = v;
	for (int off = 1; off < (int) blockDim.x; off <<= 1)
	{
		T			prev = v;

		__syncthreads();
		if (tid >= off)
			prev = scan[tid - off];
		__syncthreads();
		if (tid >= off)
			scan[tid] = v = op(prev, v);
	}
	__syncthreads();
}

/* The radix select: digits of RADIX_BITS, one bucket per value, two buckets a thread. */
#define RADIX_BITS 10
#define RADIX_BUCKETS (1 << RADIX_BITS)
#define BUCKETS_PER_THREAD (RADIX_BUCKETS / SAMPLE_BLOCK)

/*
 * A token's rank in top-p's order, three words compared in turn: p's bits, x's
 * order_key, the id. p is nondecreasing in x, so this is topp_key's order; leading with
 * p's bits makes the first level's buckets one exponent each (p <= 1: bits 29..20 hold
 * the exponent and three mantissa bits), so that a bucket's mass is a 64-bit sum of
 * mantissas, and every later bucket lies inside one of them.
 */
typedef struct rank3
{
	uint32_t	w[3];
} rank3;

/* Token j's rank. */
static __device__ __forceinline__ rank3
token_rank(const float *x, const float *p, int j)
{
	return rank3 {{__float_as_uint(p[j]), order_key(x[j]), (uint32_t) j}};
}

/* Word w of rank r, chosen without indexing (which would put r in local memory). */
static __device__ __forceinline__ uint32_t
rank_word(rank3 r, int w)
{
	return w == 0 ? r.w[0] : w == 1 ? r.w[1] : r.w[2];
}

/* r's word w |= bits, likewise without indexing. */
static __device__ __forceinline__ void
rank_or(rank3 *r, int w, uint32_t bits)
{
	r->w[0] |= w == 0 ? bits : 0;
	r->w[1] |= w == 1 ? bits : 0;
	r->w[2] |= w == 2 ? bits : 0;
}

/* Whether rank r has the bits found so far. */
static __device__ __forceinline__ bool
rank_matches(rank3 r, const rank3 *prefix, const rank3 *mask)
{
	return (r.w[0] & mask->w[0]) == prefix->w[0] && (r.w[1] & mask->w[1]) == prefix->w[1] &&
		(r.w[2] & mask->w[2]) == prefix->w[2];
}

/* Shared memory of the select: a level's buckets or the last candidates, and what a level found. */
typedef struct radix_smem
{
	union
	{
		struct
		{
			unsigned long long mant[RADIX_BUCKETS];
			int			count[RADIX_BUCKETS];
		}			bucket;
		struct
		{
			unsigned long long key[SAMPLE_BLOCK];
			unsigned long long mant[SAMPLE_BLOCK];
		}			cand;
	};
	int			found,
				found_count,
				ncand;
	fx192		found_above;
} radix_smem;

/*
 * One level: the tokens still in play (rank_matches) bucketed by bits [shift, shift +
 * RADIX_BITS) of rank word w, each bucket's mantissa sum and count, then the bucket across
 * the cut: the mass ranked above it survives, with it added not. The first level also
 * makes the cut, from all buckets' mass. Narrows prefix and mask to that bucket, adds the
 * mass above it to *above, returns its count. A digit that reaches below the word's last
 * unresolved bits (the last level of a word) repeats bits already found, which is harmless.
 */
static __device__ int
radix_level(const float *x, const float *p, int V, int w, int shift, rank3 *prefix, rank3 *mask,
			fx192 *above, topp_cut *cut, float top_p, radix_smem *sm, fx192 *scan)
{
	const rank3 pf = *prefix,
				mk = *mask;			/* in registers for the pass */
	bool		first = (mk.w[0] | mk.w[1] | mk.w[2]) == 0;
	fx192		m[BUCKETS_PER_THREAD],
				sum = {{0, 0, 0}},
				before;

	for (int d = threadIdx.x; d < RADIX_BUCKETS; d += blockDim.x)
	{
		sm->bucket.mant[d] = 0;
		sm->bucket.count[d] = 0;
	}
	__syncthreads();
	for (int j = threadIdx.x; j < V; j += blockDim.x)
	{
		rank3		r = token_rank(x, p, j);

		if (rank_matches(r, &pf, &mk))
		{
			int			d = (rank_word(r, w) >> shift) & (RADIX_BUCKETS - 1);

			atomicAdd(&sm->bucket.mant[d], (unsigned long long) fx_mantissa(r.w[0]));
			atomicAdd(&sm->bucket.count[d], 1);
		}
	}
	__syncthreads();

	/* thread t holds buckets from the top down, so the scan sums the mass above */
	for (int b = 0; b < BUCKETS_PER_THREAD; b++)
	{
		int			d = RADIX_BUCKETS - 1 - (int) threadIdx.x * BUCKETS_PER_THREAD - b;
		uint32_t	pbits = pf.w[0] | (w == 0 ? (uint32_t) d << shift : 0);

		m[b] = fx192 {{0, 0, 0}};
		fx_add_shifted(&m[b], sm->bucket.mant[d], fx_shift(pbits));
		fx_add(&sum, &m[b]);
	}
	block_scan(sum, scan, add_fx);
	if (first)
		*cut = topp_cut_make(&scan[blockDim.x - 1], top_p);
	before = threadIdx.x ? add_fx(*above, scan[threadIdx.x - 1]) : *above;
	for (int b = 0; b < BUCKETS_PER_THREAD; b++)
	{
		int			d = RADIX_BUCKETS - 1 - (int) threadIdx.x * BUCKETS_PER_THREAD - b;
		fx192		with = add_fx(before, m[b]);

		if (topp_survives(cut, &before) && !topp_survives(cut, &with))
		{
			sm->found = d;
			sm->found_count = sm->bucket.count[d];
			sm->found_above = before;
		}
		before = with;
	}
	__syncthreads();
	rank_or(prefix, w, (uint32_t) sm->found << shift);
	rank_or(mask, w, (uint32_t) (RADIX_BUCKETS - 1) << shift);
	*above = sm->found_above;
	return sm->found_count;
}

/*
 * The least topp_key that survives the cut of top_p: every token from it up is kept.
 * Levels narrow the tokens in play to the bucket across the cut until at most a block's
 * worth remain (the id's bits always get there); those are gathered, and each sums the
 * mass of the candidates above it (one exponent, so 64-bit mantissas).
 */
static __device__ uint64_t
topp_threshold(const float *x, const float *p, int V, float top_p, radix_smem *sm, fx192 *scan,
			   sample_red *red)
{
	rank3		prefix = {{0, 0, 0}},
				mask = {{0, 0, 0}};
	fx192		above = {{0, 0, 0}};
	topp_cut	cut;
	unsigned long long best = ~0ull;
	int			n = INT32_MAX,	/* the first level always runs: it makes the cut */
				id_bits = 0;

	while ((1u << id_bits) < (unsigned) V)
		id_bits++;
	/* the bits in use of each rank word: p <= 1 leaves the top two clear */
	for (int w = 0; w < 3 && n > SAMPLE_BLOCK; w++)
		for (int top = w == 0 ? 30 : w == 1 ? 32 : id_bits; top > 0 && n > SAMPLE_BLOCK;
			 top -= RADIX_BITS)
			n = radix_level(x, p, V, w, top > RADIX_BITS ? top - RADIX_BITS : 0, &prefix, &mask,
							&above, &cut, top_p, sm, scan);

	if (threadIdx.x == 0)
		sm->ncand = 0;
	__syncthreads();
	for (int j = threadIdx.x; j < V; j += blockDim.x)
		if (rank_matches(token_rank(x, p, j), &prefix, &mask))
		{
			int			k = atomicAdd(&sm->ncand, 1);

			sm->cand.key[k] = topp_key(x[j], j);
			sm->cand.mant[k] = fx_mantissa(__float_as_uint(p[j]));
		}
	__syncthreads();
	if ((int) threadIdx.x < sm->ncand)
	{
		unsigned long long key = sm->cand.key[threadIdx.x],
					s = 0;
		fx192		before = above;

		for (int k = 0; k < sm->ncand; k++)
			s += sm->cand.key[k] > key ? sm->cand.mant[k] : 0;
		fx_add_shifted(&before, s, fx_shift(prefix.w[0]));
		if (topp_survives(&cut, &before))
			best = key;
	}
	return block_reduce((uint64_t) best, red->k, [](uint64_t a, uint64_t b) { return a < b ? a : b; });
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
	block_scan(s, scan, add<double>);
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
	__shared__ sample_scan scan;
	__shared__ radix_smem radix;
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
		uint64_t	c = topp_threshold(x, p, V, sp->top_p, &radix, scan.fx, &red);

		tok = draw([=](int j) { return topp_key(x[j], j) >= c ? p[j] : 0.0f; }, V, row.u, scan.d,
				   &red);
	}
	else
		tok = draw([=](int j) { return x[j] >= kth ? p[j] : 0.0f; }, V, row.u, scan.d, &red);
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
