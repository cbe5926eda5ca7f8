/*
 * sampler.c: greedy choice, and transformers' temperature / top-k / top-p sampling.
 *
 * Top-p without sorting the vocabulary: probabilities are bucketed by their float bits
 * (exponent and three mantissa bits, so a bucket spans a factor of at most 1.125) and
 * each bucket's mass is summed exactly. Walking the buckets from the top finds the one
 * where the cumulative mass crosses top_p: every token above it is kept, every token
 * below it dropped. That bucket is split again by the next eight bits, and only the
 * sub-bucket that straddles the cut (a handful of tokens) is sorted. Masses are exact
 * fixed-point sums, so the summation order, which differs from a sorted cumulative
 * sum, cannot change the kept set.
 */
#define _GNU_SOURCE				/* qsort_r */
#include "sampler.h"
#include "sampler_fx.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/*
 * Bucket keys of a probability: the coarse key is its float bits >> KEY_SHIFT (p <= 1
 * gives keys <= 0x3F8), the fine key the next SUBKEY_BITS bits, used inside the one
 * coarse bucket that straddles the cut.
 */
#define KEY_SHIFT	20
#define NKEYS		1024
#define SUBKEY_BITS	8

/* splitmix64, the seeding generator recommended for xoshiro. */
static uint64_t
splitmix64(uint64_t *x)
{
	uint64_t	z = (*x += UINT64_C(0x9e3779b97f4a7c15));

	z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
	return z ^ (z >> 31);
}

/* Seed xoshiro256** through splitmix64. */
void
rng_seed(dl_rng *rng, uint64_t seed)
{
	for (int i = 0; i < 4; i++)
		rng->s[i] = splitmix64(&seed);
}

/* Rotate left; k in [1, 63]. */
static inline uint64_t
rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

/* xoshiro256** (Blackman and Vigna, prng.di.unimi.it): the next 64 bits. */
uint64_t
rng_next(dl_rng *rng)
{
	uint64_t   *s = rng->s;
	uint64_t	result = rotl(s[1] * 5, 7) * 9;
	uint64_t	t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return result;
}

/* The top 53 bits as a double in [0, 1). */
double
rng_uniform(dl_rng *rng)
{
	return (double) (rng_next(rng) >> 11) * 0x1.0p-53;
}

/* The top 24 bits as a float in [0, 1). */
float
rng_uniformf(dl_rng *rng)
{
	return (float) (rng_next(rng) >> 40) * 0x1.0p-24f;
}

/* Fisher-Yates from the last element; swaps through a small buffer, element by element. */
void
rng_shuffle(void *base, size_t n, size_t size, dl_rng *rng)
{
	unsigned char *a = base;

	for (size_t i = n; i-- > 1;)
	{
		size_t		j = (size_t) (rng_uniform(rng) * (i + 1));

		for (size_t b = 0; b < size; b++)
		{
			unsigned char t = a[i * size + b];

			a[i * size + b] = a[j * size + b];
			a[j * size + b] = t;
		}
	}
}

/* Reject out-of-range or NaN parameters, naming the parameter and its range. */
dl_status
sampling_check(const dl_sampling *p, dl_error *err)
{
	if (p->do_sample && !(p->temperature > 0.0f && p->temperature <= 100.0f))
	{
		dl_fail(err, DL_EINVAL, "temperature must be > 0 and <= 100, got %g",
				(double) p->temperature);
		return dl_hint(err, "For greedy decoding, turn sampling off instead of setting "
					   "the temperature to 0.");
	}
	if (p->top_k < 0)
		return dl_fail(err, DL_EINVAL, "top_k must be >= 0 (0 turns it off), got %d", p->top_k);
	if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
		return dl_fail(err, DL_EINVAL, "top_p must be > 0 and <= 1 (1 turns it off), got %g",
					   (double) p->top_p);
	return DL_OK;
}

/* The index of the first maximum, NaN counting as the largest value (torch.argmax). */
static int32_t
argmax(const float *x, int n)
{
	int32_t		best = 0;
	float		bestv = x[0];

	for (int j = 1; j < n && !isnan(bestv); j++)
	{
		if (x[j] > bestv || isnan(x[j]))
		{
			best = j;
			bestv = x[j];
		}
	}
	return best;
}

/* Restore the min-heap property of h[0, n) below position i. */
static void
heap_sift_down(float *h, int n, int i)
{
	float		v = h[i];

	for (;;)
	{
		int			c = 2 * i + 1;

		if (c >= n)
			break;
		if (c + 1 < n && h[c + 1] < h[c])
			c++;
		if (h[c] >= v)
			break;
		h[i] = h[c];
		i = c;
	}
	h[i] = v;
}

/*
 * The k-th largest of x[0, n) (k in [1, n], no NaN), as torch.topk(x, k).values[-1]:
 * a min-heap of the k largest seen so far, in heap[0, k). Logits rarely beat the heap's
 * minimum, so this is one predictable pass when k is small, O(n log k) at worst.
 */
static float
kth_largest(const float *x, int n, int k, float *heap)
{
	memcpy(heap, x, k * sizeof(float));
	for (int i = k / 2 - 1; i >= 0; i--)
		heap_sift_down(heap, k, i);
	for (int j = k; j < n; j++)
		if (x[j] > heap[0])
		{
			heap[0] = x[j];
			heap_sift_down(heap, k, 0);
		}
	return heap[0];
}

/* qsort_r order: x descending, then index descending (the reverse of a stable ascending sort). */
static int
by_x_desc(const void *a, const void *b, void *arg)
{
	const float *x = arg;
	int32_t		i = *(const int32_t *) a,
				j = *(const int32_t *) b;

	if (x[i] != x[j])
		return x[i] > x[j] ? -1 : 1;
	return i > j ? -1 : 1;
}

/*
 * Walk buckets from the top: bucket k holds the probabilities whose float bits are
 * base | k << shift, mant[k] the sum of their mantissas. Returns the first bucket whose
 * end the cut drops (every token above it survives, every token below it goes) and
 * leaves in *above the mass of the buckets above it. The end of all buckets is always
 * dropped (cumulative mass <= total), so when no bucket above 0 is, bucket 0 is the one;
 * at the coarse level, where bucket 0 holds zeros and denormals, that cannot happen:
 * their mass is far below the cut's midpoint.
 */
static int
straddling_bucket(const uint64_t *mant, int nkeys, uint32_t base, int shift,
				  const topp_cut *cut, fx192 *above)
{
	int			k;

	for (k = nkeys - 1; k > 0; k--)
	{
		fx192		incl = *above;

		if (!mant[k])
			continue;
		fx_add_shifted(&incl, mant[k], fx_shift(base | (uint32_t) k << shift));
		if (!topp_keeps(cut, &incl))
			break;
		*above = incl;
	}
	return k;
}

/* Fine key of a probability within its coarse bucket. */
static inline int
subkey(float p)
{
	return (float_bits(p) >> (KEY_SHIFT - SUBKEY_BITS)) & ((1 << SUBKEY_BITS) - 1);
}

/*
 * Top-p over probabilities prob[0, vocab) (those of tokens dropped by top-k are 0; x is
 * the order); writes the kept ids to ids and returns their number.
 */
static int
top_p_filter(const float *x, const float *prob, int vocab, float top_p, int32_t *ids)
{
	uint64_t	mant[NKEYS] = {0};
	uint64_t	submant[1 << SUBKEY_BITS] = {0};
	fx192		total = {{0, 0, 0}};
	fx192		above = {{0, 0, 0}};
	fx192		before;
	topp_cut	cut;
	int			kc,
				kc2,
				nc = 0,
				nc2 = 0,
				kept = 0;

	for (int j = 0; j < vocab; j++)
	{
		uint32_t	b = float_bits(prob[j]);

		mant[b >> KEY_SHIFT] += fx_mantissa(b);
	}
	for (int k = 0; k < NKEYS; k++)
		if (mant[k])
			fx_add_shifted(&total, mant[k], fx_shift((uint32_t) k << KEY_SHIFT));
	cut = topp_cut_make(&total, top_p);

	/* the coarse bucket across the cut, then the fine bucket across it inside that */
	kc = straddling_bucket(mant, NKEYS, 0, KEY_SHIFT, &cut, &above);
	for (int j = 0; j < vocab; j++)
		if ((int) (float_bits(prob[j]) >> KEY_SHIFT) == kc)
		{
			ids[nc++] = j;
			submant[subkey(prob[j])] += fx_mantissa(float_bits(prob[j]));
		}
	kc2 = straddling_bucket(submant, 1 << SUBKEY_BITS, (uint32_t) kc << KEY_SHIFT,
							KEY_SHIFT - SUBKEY_BITS, &cut, &above);

	/* move the straddling fine bucket to the front */
	for (int i = 0; i < nc; i++)
		if (subkey(prob[ids[i]]) == kc2)
		{
			int32_t		t = ids[nc2];

			ids[nc2++] = ids[i];
			ids[i] = t;
		}

	/*
	 * p is nondecreasing in x, so buckets are runs of the x order: sort the straddling
	 * bucket and walk it; the most likely token is always kept (min_tokens_to_keep = 1).
	 */
	qsort_r(ids, nc2, sizeof(int32_t), by_x_desc, (void *) x);
	before = above;
	for (; kept < nc2; kept++)
	{
		bool		top = kept == 0 && fx_cmp(&above, &(fx192) {{0, 0, 0}}) == 0;

		if (!top && !topp_keeps(&cut, &before))
			break;
		fx_add_float(&before, prob[ids[kept]]);
	}
	for (int i = nc2; i < nc; i++)
		if (subkey(prob[ids[i]]) > kc2)
			ids[kept++] = ids[i];
	for (int j = 0; j < vocab; j++)
		if ((int) (float_bits(prob[j]) >> KEY_SHIFT) > kc)
			ids[kept++] = j;
	return kept;
}

/* Temperature, top-k and top-p as transformers chains them; see sampler.h. */
int
sampling_filter(const float *logits, int vocab, const dl_sampling *p,
				float *scratch, int32_t *iscratch)
{
	const float *x = logits;
	float	   *prob = scratch + vocab;
	float		maxv = -INFINITY,
				kth = -INFINITY;
	bool		nan = false;
	double		sum = 0.0;
	int			n = 0;

	if (p->do_sample && p->temperature != 1.0f)
	{
		for (int j = 0; j < vocab; j++)
			scratch[j] = logits[j] / p->temperature;
		x = scratch;
	}
	for (int j = 0; j < vocab; j++)
	{
		nan |= isnan(x[j]);
		maxv = x[j] > maxv ? x[j] : maxv;
	}

	/* greedy, or no distribution to sample from (transformers would fail): the argmax */
	if (!p->do_sample || nan || !isfinite(maxv))
	{
		iscratch[0] = argmax(logits, vocab);
		prob[iscratch[0]] = 1.0f;
		return 1;
	}

	if (p->top_k > 0 && p->top_k < vocab)
		kth = kth_largest(x, vocab, p->top_k, prob);
	for (int j = 0; j < vocab; j++)
	{
		prob[j] = x[j] >= kth ? expf(x[j] - maxv) : 0.0f;
		sum += prob[j];
	}
	for (int j = 0; j < vocab; j++)
		prob[j] = (float) (prob[j] / sum);

	if (p->top_p < 1.0f)
		return top_p_filter(x, prob, vocab, p->top_p, iscratch);
	for (int j = 0; j < vocab; j++)
		if (x[j] >= kth)
			iscratch[n++] = j;
	return n;
}

/* rng_uniform when sampling; greedy rows draw nothing. */
double
sample_uniform(const dl_sampling *p, dl_rng *rng)
{
	return p->do_sample ? rng_uniform(rng) : 0.0;
}

/* Greedy argmax, or the kept token where u * (kept mass) falls, in index order. */
int32_t
sample_draw(const float *logits, int vocab, const dl_sample_row *row, float *scratch,
			int32_t *iscratch)
{
	float	   *w = scratch;	/* the kept weights by token id, 0 elsewhere */
	double		total = 0.0,
				acc = 0.0,
				target;
	int			n,
				last = 0;

	if (vocab < 1)
		return -1;
	if (!row->p.do_sample)
		return argmax(logits, vocab);

	n = sampling_filter(logits, vocab, &row->p, scratch, iscratch);
	memset(w, 0, vocab * sizeof(float));
	for (int i = 0; i < n; i++)
		w[iscratch[i]] = scratch[vocab + iscratch[i]];
	for (int j = 0; j < vocab; j++)
		total += w[j];
	target = row->u * total;
	for (int j = 0; j < vocab; j++)
	{
		if (w[j] > 0.0f)
			last = j;
		acc += w[j];
		if (target < acc)
			return j;
	}
	/* rounding left the target at the very top: the last token that has any weight */
	return last;
}

/* sample_draw with the uniform the row's parameters take from rng. */
int32_t
sample_token(const float *logits, int vocab, const dl_sampling *p, dl_rng *rng,
			 float *scratch, int32_t *iscratch)
{
	dl_sample_row row = {*p, 0.0};

	if (vocab < 1)
		return -1;
	row.u = sample_uniform(p, rng);
	return sample_draw(logits, vocab, &row, scratch, iscratch);
}
