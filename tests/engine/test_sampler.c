/*
 * test_sampler.c: the RNG against its reference vectors, greedy ties, parameter checks,
 * kept sets against a naive transcription of transformers' warpers and against sets that
 * transformers itself computed (fixtures/sampler/hf_warpers.json, made by
 * tests/make_sampler_fixtures.py), the drawn distribution, determinism per seed, and
 * the CPU backend's sample_forward against sample_token.
 */
#include "harness.h"
#include "../../src/engine/backend.h"
#include "../../src/engine/sampler.h"

#include <json-c/json.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* Buffers for one row of vocab logits: the sampler's scratch and a kept-set mask. */
typedef struct row
{
	int			vocab;
	float	   *logits;
	float	   *scratch;
	int32_t    *iscratch;
	bool	   *ref;
} row;

static row
row_alloc(int vocab)
{
	row			r = {vocab, malloc(vocab * sizeof(float)), malloc(2 * vocab * sizeof(float)),
	malloc(vocab * sizeof(int32_t)), malloc(vocab * sizeof(bool))};

	return r;
}

static void
row_free(row *r)
{
	free(r->logits);
	free(r->scratch);
	free(r->iscratch);
	free(r->ref);
}

/* A standard normal variate (Box-Muller). */
static double
normal(dl_rng *rng)
{
	double		u = 1.0 - rng_uniform(rng);

	return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * rng_uniform(rng));
}

static const float *sort_x;

/* qsort order for the reference: ascending x, ties by ascending index (a stable sort). */
static int
ref_ascending(const void *a, const void *b)
{
	int32_t		i = *(const int32_t *) a,
				j = *(const int32_t *) b;

	if (sort_x[i] != sort_x[j])
		return sort_x[i] < sort_x[j] ? -1 : 1;
	return i < j ? -1 : 1;
}

/* qsort order: descending floats. */
static int
float_descending(const void *a, const void *b)
{
	float		x = *(const float *) a,
				y = *(const float *) b;

	return x > y ? -1 : x < y ? 1 : 0;
}

/*
 * transformers' warpers transcribed naively: temperature, top-k by a full sort, top-p
 * by a full ascending sort and a double cumulative sum rounded to float, compared with
 * float(1 - top_p). Fills kept[] and, for kept ids, the softmax probability in prob[];
 * cums, if not NULL, receives the ascending cumulative sums (float-rounded) by rank.
 */
static void
reference_kept(const float *logits, int vocab, const dl_sampling *p, bool *kept, float *prob,
			   float *cums)
{
	float	   *x = malloc(vocab * sizeof(float));
	float	   *sorted = malloc(vocab * sizeof(float));
	int32_t    *order = malloc(vocab * sizeof(int32_t));
	float		maxv = -INFINITY,
				thr = (float) (1.0 - (double) p->top_p);
	double		sum = 0.0,
				cum = 0.0;

	for (int j = 0; j < vocab; j++)
	{
		x[j] = p->temperature != 1.0f ? logits[j] / p->temperature : logits[j];
		kept[j] = true;
		order[j] = j;
	}
	if (p->top_k > 0 && p->top_k < vocab)
	{
		memcpy(sorted, x, vocab * sizeof(float));
		qsort(sorted, vocab, sizeof(float), float_descending);
		for (int j = 0; j < vocab; j++)
			if (x[j] < sorted[p->top_k - 1])
			{
				x[j] = -INFINITY;
				kept[j] = false;
			}
	}
	for (int j = 0; j < vocab; j++)
		maxv = fmaxf(maxv, x[j]);
	for (int j = 0; j < vocab; j++)
		sum += expf(x[j] - maxv);
	for (int j = 0; j < vocab; j++)
		prob[j] = (float) (expf(x[j] - maxv) / sum);

	sort_x = x;
	qsort(order, vocab, sizeof(int32_t), ref_ascending);
	for (int i = 0; i < vocab; i++)
	{
		cum += prob[order[i]];
		if (cums)
			cums[i] = (float) cum;
		if (p->top_p < 1.0f && (float) cum <= thr && i < vocab - 1)
			kept[order[i]] = false;
	}
	free(x);
	free(sorted);
	free(order);
}

/*
 * Check sampling_filter's kept set and weights on r against the reference; returns a
 * description of the first difference, or NULL.
 */
static const char *
compare_kept(row *r, const dl_sampling *p)
{
	static char msg[256];
	float	   *refprob = malloc(r->vocab * sizeof(float));
	bool	   *seen = calloc(r->vocab, sizeof(bool));
	int			n,
				nref = 0;
	const char *fail = NULL;

	reference_kept(r->logits, r->vocab, p, r->ref, refprob, NULL);
	n = sampling_filter(r->logits, r->vocab, p, r->scratch, r->iscratch);
	for (int j = 0; j < r->vocab; j++)
		nref += r->ref[j];
	if (n != nref)
		snprintf(msg, sizeof(msg), "kept %d tokens, the reference %d", n, nref), fail = msg;
	for (int i = 0; i < n && !fail; i++)
	{
		int32_t		id = r->iscratch[i];

		if (id < 0 || id >= r->vocab || seen[id] || !r->ref[id])
			snprintf(msg, sizeof(msg), "kept id %d wrongly", id), fail = msg;
		else if (r->scratch[r->vocab + id] != refprob[id])
			snprintf(msg, sizeof(msg), "weight of id %d is %.9g, the reference %.9g", id,
					 r->scratch[r->vocab + id], refprob[id]), fail = msg;
		else
			seen[id] = true;
	}
	free(refprob);
	free(seen);
	return fail;
}

/* Sorted kept ids, for comparing with hand-derived sets. */
static int
kept_sorted(row *r, const dl_sampling *p, int32_t *out)
{
	int			n = sampling_filter(r->logits, r->vocab, p, r->scratch, r->iscratch);

	for (int i = 0; i < n; i++)
	{
		int			k = i;

		while (k > 0 && out[k - 1] > r->iscratch[i])
		{
			out[k] = out[k - 1];
			k--;
		}
		out[k] = r->iscratch[i];
	}
	return n;
}

TEST(sampler_rng_reference_vectors)
{
	dl_rng		rng = {{1, 2, 3, 4}};
	dl_rng		a,
				b;

	/* xoshiro256** from {1, 2, 3, 4}: the authors' reference outputs */
	CHECK(rng_next(&rng) == 11520);
	CHECK(rng_next(&rng) == 0);
	CHECK(rng_next(&rng) == 1509978240);
	CHECK(rng_next(&rng) == UINT64_C(1215971899390074240));

	/* seeding is splitmix64: its outputs from 0 start with 0xe220a8397b1dcdaf */
	rng_seed(&rng, 0);
	CHECK(rng.s[0] == UINT64_C(0xe220a8397b1dcdaf));
	CHECK(rng.s[1] == UINT64_C(0x6e789e6aa1b965f4));
	CHECK(rng.s[2] == UINT64_C(0x06c45d188009454f));
	CHECK(rng.s[3] == UINT64_C(0xf88bb8a8724c81ec));

	rng_seed(&a, 42);
	rng_seed(&b, 42);
	for (int i = 0; i < 100000; i++)
	{
		double		u = rng_uniform(&a);
		float		f = rng_uniformf(&b);

		CHECK(u >= 0.0 && u < 1.0);
		CHECK(f >= 0.0f && f < 1.0f);
		CHECK((float) u - f < 0x1.0p-23f && f - (float) u < 0x1.0p-23f);	/* same bits */
	}
}

TEST(sampler_greedy_is_first_argmax)
{
	row			r = row_alloc(6);
	dl_sampling greedy = {0, 0.0f, 0, 1.0f};
	dl_rng		rng;
	float		ties[6] = {1.0f, 7.0f, -2.0f, 7.0f, 7.0f, 0.5f};
	float		nan[6] = {1.0f, 9.0f, NAN, 3.0f, NAN, 0.5f};
	float		neg[6] = {-INFINITY, -5.0f, -3.0f, -3.0f, -INFINITY, -9.0f};

	rng_seed(&rng, 1);
	memcpy(r.logits, ties, sizeof(ties));
	CHECK(sample_token(r.logits, 6, &greedy, &rng, r.scratch, r.iscratch) == 1);
	memcpy(r.logits, nan, sizeof(nan));
	CHECK(sample_token(r.logits, 6, &greedy, &rng, r.scratch, r.iscratch) == 2);
	memcpy(r.logits, neg, sizeof(neg));
	CHECK(sample_token(r.logits, 6, &greedy, &rng, r.scratch, r.iscratch) == 2);
	CHECK(sample_token(r.logits, 1, &greedy, &rng, r.scratch, r.iscratch) == 0);
	CHECK(sample_token(r.logits, 0, &greedy, &rng, r.scratch, r.iscratch) == -1);

	/* sampling from logits with NaN or +inf has no distribution: the argmax */
	{
		dl_sampling s = {1, 1.0f, 0, 0.92f};

		memcpy(r.logits, nan, sizeof(nan));
		CHECK(sample_token(r.logits, 6, &s, &rng, r.scratch, r.iscratch) == 2);
		r.logits[2] = r.logits[4] = INFINITY;
		CHECK(sample_token(r.logits, 6, &s, &rng, r.scratch, r.iscratch) == 2);
	}
	row_free(&r);
}

TEST(sampler_check_ranges)
{
	dl_error	err;
	dl_sampling ok = {1, 0.7f, 50, 0.92f};
	dl_sampling s;

	CHECK_OK(sampling_check(&ok, &err), &err);
	s = ok, s.temperature = 100.0f;
	CHECK_OK(sampling_check(&s, &err), &err);
	s = ok, s.top_p = 1.0f, s.top_k = 0;
	CHECK_OK(sampling_check(&s, &err), &err);
	s = ok, s.do_sample = 0, s.temperature = 0.0f;	/* greedy ignores temperature */
	CHECK_OK(sampling_check(&s, &err), &err);

	s = ok, s.temperature = 0.0f;
	CHECK(sampling_check(&s, &err) == DL_EINVAL);
	CHECK(strstr(err.msg, "temperature must be > 0 and <= 100") != NULL);
	CHECK(err.hint[0] != '\0');
	s = ok, s.temperature = -1.0f;
	CHECK(sampling_check(&s, &err) == DL_EINVAL);
	s = ok, s.temperature = 100.5f;
	CHECK(sampling_check(&s, &err) == DL_EINVAL);
	s = ok, s.temperature = NAN;
	CHECK(sampling_check(&s, &err) == DL_EINVAL);
	CHECK(strstr(err.msg, "temperature") != NULL);

	s = ok, s.top_k = -1;
	CHECK(sampling_check(&s, &err) == DL_EINVAL);
	CHECK(strstr(err.msg, "top_k must be >= 0") != NULL);

	s = ok, s.top_p = 0.0f;
	CHECK(sampling_check(&s, &err) == DL_EINVAL);
	CHECK(strstr(err.msg, "top_p must be > 0 and <= 1") != NULL);
	s = ok, s.top_p = 1.0001f;
	CHECK(sampling_check(&s, &err) == DL_EINVAL);
	s = ok, s.top_p = -0.5f;
	CHECK(sampling_check(&s, &err) == DL_EINVAL);
	s = ok, s.top_p = NAN;
	CHECK(sampling_check(&s, &err) == DL_EINVAL);
	CHECK(strstr(err.msg, "top_p") != NULL);
}

TEST(sampler_cut_boundaries)
{
	row			r = row_alloc(8);
	int32_t		kept[8];
	float		equal[8] = {3, 3, 3, 3, 3, 3, 3, 3};
	float		two[8] = {1, 5, 1, 5, 5, 1, 5, 1};
	dl_sampling s = {1, 1.0f, 0, 0.75f};
	int			n;

	/* eight equal tokens: p = 1/8 exactly; cum 1/8 and 2/8 are <= 1 - 0.75, stable order */
	memcpy(r.logits, equal, sizeof(equal));
	n = kept_sorted(&r, &s, kept);
	CHECK(n == 6 && kept[0] == 2 && kept[5] == 7);

	/* one float above 0.75 moves the cut below 2/8: one token fewer dropped */
	s.top_p = nextafterf(0.75f, 1.0f);
	n = kept_sorted(&r, &s, kept);
	CHECK(n == 7 && kept[0] == 1);
	s.top_p = nextafterf(0.75f, 0.0f);
	n = kept_sorted(&r, &s, kept);
	CHECK(n == 6 && kept[0] == 2);

	/*
	 * a tiny top_p keeps only the last of the tied maxima in ascending order, also when
	 * 1 - top_p rounds to 1 and every cumulative sum is under the cut
	 */
	s.top_p = 1e-6f;
	n = kept_sorted(&r, &s, kept);
	CHECK(n == 1 && kept[0] == 7);
	s.top_p = 1e-9f;
	n = kept_sorted(&r, &s, kept);
	CHECK(n == 1 && kept[0] == 7);

	/* top-k keeps every tie of the k-th value; then top-p cuts at exactly 0.5 */
	memcpy(r.logits, two, sizeof(two));
	s.top_k = 1, s.top_p = 1.0f;
	n = kept_sorted(&r, &s, kept);
	CHECK(n == 4 && kept[0] == 1 && kept[1] == 3 && kept[2] == 4 && kept[3] == 6);
	s.top_k = 4, s.top_p = 0.5f;
	n = kept_sorted(&r, &s, kept);
	CHECK(n == 2 && kept[0] == 4 && kept[1] == 6);
	s.top_p = 0.75f, s.temperature = 0.3f;
	n = kept_sorted(&r, &s, kept);
	CHECK(n == 3 && kept[0] == 3 && kept[1] == 4 && kept[2] == 6);
	CHECK(compare_kept(&r, &s) == NULL);
	row_free(&r);
}

TEST(sampler_cut_rounds_to_even)
{
	row			r = row_alloc(3);
	dl_rng		rng;
	int			found = 0;

	/*
	 * Rows of three where the two smaller probabilities sum exactly to the midpoint
	 * between two floats: fl32 rounds that cumulative sum to the even one, so with
	 * the cut on the odd float below it the token stays, on the even one it goes.
	 */
	rng_seed(&rng, 11);
	for (int t = 0; t < 10000 && found < 20; t++)
	{
		dl_sampling all = {1, 1.0f, 0, 1.0f};
		float		prob[3],
					lo,
					hi,
					sorted[3];
		double		x;

		for (int j = 0; j < 3; j++)
			r.logits[j] = (float) (0.3 * normal(&rng));
		reference_kept(r.logits, 3, &all, r.ref, prob, NULL);
		memcpy(sorted, prob, sizeof(sorted));
		qsort(sorted, 3, sizeof(float), float_descending);
		x = (double) sorted[2] + sorted[1];
		lo = nextafterf((float) x, 0.0f);
		if (x < 0.5 || x >= 1.0 || (float) x == x ||
			sorted[0] == sorted[1] || sorted[1] == sorted[2])
			continue;
		if ((float) x < x)
			lo = (float) x;
		hi = nextafterf(lo, 1.0f);
		if (x != ((double) lo + hi) / 2.0)
			continue;
		for (int side = 0; side < 2; side++)
		{
			float		thr = side ? hi : lo;
			dl_sampling s = {1, 1.0f, 0, (float) (1.0 - (double) thr)};
			int			n = sampling_filter(r.logits, 3, &s, r.scratch, r.iscratch);
			const char *fail = compare_kept(&r, &s);

			CHECK((float) (1.0 - (double) s.top_p) == thr);
			/* kept: the top token, and the middle one unless x rounds to <= thr */
			CHECKF(n == ((float) x <= thr ? 1 : 2), "n = %d, x = %.17g, thr = %.9g", n, x, thr);
			CHECKF(fail == NULL, "%s", fail);
		}
		found++;
	}
	CHECK(found == 20);
	row_free(&r);
}

TEST(sampler_kept_sets_match_reference)
{
	static const int vocabs[] = {1, 2, 3, 8, 50, 257, 1000, 5003};
	static const float temps[] = {1.0f, 0.5f, 0.9f, 2.5f};
	static const float top_ps[] = {1.0f, 0.999f, 0.95f, 0.92f, 0.5f, 0.1f, 1e-3f};
	static const double scales[] = {0.3, 1.0, 3.0, 10.0};
	dl_rng		rng;
	int			cases = 0;

	rng_seed(&rng, 7);
	for (int t = 0; t < 3000; t++)
	{
		int			vocab = vocabs[rng_next(&rng) % 8];
		int			k_choice = rng_next(&rng) % 6;
		double		scale = scales[rng_next(&rng) % 4];
		bool		quantise = rng_next(&rng) % 3 == 0;
		dl_sampling s = {1, temps[rng_next(&rng) % 4], 0, top_ps[rng_next(&rng) % 7]};
		row			r = row_alloc(vocab);
		const char *fail;

		s.top_k = (int[]) {0, 0, 1, 5, vocab, vocab + 3}[k_choice];
		for (int j = 0; j < vocab; j++)
		{
			double		v = normal(&rng) * scale;

			/* quantised rows are full of ties, in the top-k and top-p cuts too */
			r.logits[j] = quantise ? (float) (round(v * 2.0) / 2.0) : (float) v;
		}
		/*
		 * Every other row puts the cut on some token's cumulative sum, give or take a
		 * float: the comparison then turns on rounding, and small rows hit the exact
		 * midpoints between floats (rounded to even) often.
		 */
		if (t % 2 && vocab > 1)
		{
			dl_sampling all = s;
			float	   *cums = malloc(vocab * sizeof(float));
			float	   *prob = malloc(vocab * sizeof(float));
			float		thr;

			all.top_p = 1.0f;
			reference_kept(r.logits, vocab, &all, r.ref, prob, cums);
			thr = cums[rng_next(&rng) % (vocab - 1)];
			thr = (float[]) {thr, nextafterf(thr, 0.0f), nextafterf(thr, 1.0f)}[rng_next(&rng) % 3];
			s.top_p = (float) (1.0 - (double) thr);
			if (s.top_p >= 1.0f || s.top_p <= 0.0f)
				s.top_p = 0.5f;
			free(cums);
			free(prob);
		}
		fail = compare_kept(&r, &s);
		CHECKF(fail == NULL, "case %d (vocab %d, temperature %g, top_k %d, top_p %g): %s",
			   t, vocab, s.temperature, s.top_k, s.top_p, fail);
		row_free(&r);
		cases++;
	}
	CHECK(cases == 3000);
}

TEST(sampler_kept_sets_match_transformers)
{
	json_object *root = json_object_from_file(fixture_path("sampler/hf_warpers.json"));
	json_object *cases;

	CHECKF(root != NULL, "cannot read %s", fixture_path("sampler/hf_warpers.json"));
	CHECK(json_object_object_get_ex(root, "cases", &cases));
	CHECK(json_object_array_length(cases) > 0);
	for (size_t c = 0; c < json_object_array_length(cases); c++)
	{
		json_object *cs = json_object_array_get_idx(cases, c),
				   *logits,
				   *kept,
				   *v;
		dl_sampling s = {1, 1.0f, 0, 1.0f};
		row			r;
		int32_t    *got;
		int			n;
		bool		same;

		CHECK(json_object_object_get_ex(cs, "logits", &logits));
		CHECK(json_object_object_get_ex(cs, "kept", &kept));
		CHECK(json_object_object_get_ex(cs, "temperature", &v));
		s.temperature = (float) json_object_get_double(v);
		CHECK(json_object_object_get_ex(cs, "top_k", &v));
		s.top_k = json_object_get_int(v);
		CHECK(json_object_object_get_ex(cs, "top_p", &v));
		s.top_p = (float) json_object_get_double(v);

		r = row_alloc(json_object_array_length(logits));
		got = malloc(r.vocab * sizeof(int32_t));
		for (int j = 0; j < r.vocab; j++)
			r.logits[j] = (float) json_object_get_double(json_object_array_get_idx(logits, j));
		n = kept_sorted(&r, &s, got);
		same = n == (int) json_object_array_length(kept);
		for (int i = 0; same && i < n; i++)
			same = got[i] == json_object_get_int(json_object_array_get_idx(kept, i));
		free(got);
		row_free(&r);
		CHECKF(same, "case %zu: kept %d ids, transformers %zu", c, n,
			   json_object_array_length(kept));
	}
	json_object_put(root);
}

/*
 * Pearson's chi-square of counts[] against probabilities q over the ids with q > 0
 * (counts elsewhere must be 0, else returns +inf).
 */
static double
chi_square(const int *counts, const double *q, int vocab, int draws)
{
	double		chi2 = 0.0;

	for (int j = 0; j < vocab; j++)
	{
		if (q[j] == 0.0)
		{
			if (counts[j])
				return INFINITY;
			continue;
		}
		chi2 += (counts[j] - draws * q[j]) * (counts[j] - draws * q[j]) / (draws * q[j]);
	}
	return chi2;
}

/* exp(logit / temperature) renormalised over the ids in mask (in double). */
static void
softmax_over(const float *logits, const bool *mask, int vocab, double temperature, double *q)
{
	double		sum = 0.0;

	for (int j = 0; j < vocab; j++)
		sum += q[j] = mask[j] ? exp(logits[j] / temperature) : 0.0;
	for (int j = 0; j < vocab; j++)
		q[j] /= sum;
}

TEST(sampler_draws_follow_distribution)
{
	enum
	{
		V = 12, DRAWS = 200000
	};
	float		logits[V] = {2.0f, 1.5f, 1.2f, 1.0f, 0.7f, 0.5f, 0.3f, 0.0f,
	-0.5f, -1.0f, -2.0f, -3.0f};
	dl_sampling s = {1, 0.8f, 10, 0.9f};
	row			r = row_alloc(V);
	bool		all[V];
	int			counts[V] = {0},
				nkept = 0;
	double		q[V],
				chi2,
				wrong;
	float		prob[V];
	dl_rng		rng;

	memcpy(r.logits, logits, sizeof(logits));
	rng_seed(&rng, 2024);
	for (int i = 0; i < DRAWS; i++)
	{
		int32_t		t = sample_token(r.logits, V, &s, &rng, r.scratch, r.iscratch);

		CHECK(t >= 0 && t < V);
		counts[t]++;
	}
	reference_kept(logits, V, &s, r.ref, prob, NULL);
	for (int j = 0; j < V; j++)
		nkept += r.ref[j];
	CHECK(nkept > 3 && nkept < 10);	/* both cuts matter here */
	softmax_over(logits, r.ref, V, s.temperature, q);
	chi2 = chi_square(counts, q, V, DRAWS);

	/*
	 * With nkept - 1 (about 7) degrees of freedom chi2 exceeds 40 with probability
	 * ~1e-6; forgetting the temperature or the renormalisation fails by far, as the
	 * same counts against the untempered distribution show.
	 */
	CHECKF(chi2 < 40.0, "chi-square %.1f over %d kept tokens", chi2, nkept);
	softmax_over(logits, r.ref, V, 1.0, q);
	wrong = chi_square(counts, q, V, DRAWS);
	CHECKF(wrong > 1000.0, "the test cannot tell temperature 1 (chi-square %.1f)", wrong);
	for (int j = 0; j < V; j++)
		all[j] = true;
	softmax_over(logits, all, V, s.temperature, q);
	wrong = chi_square(counts, q, V, DRAWS);
	CHECKF(wrong > 1000.0, "the test cannot tell a missing cut (chi-square %.1f)", wrong);
	row_free(&r);
}

TEST(sampler_same_seed_same_tokens)
{
	enum
	{
		V = 1000, STEPS = 300
	};
	row			r = row_alloc(V);
	dl_sampling s = {1, 1.0f, 0, 0.92f};
	dl_rng		a,
				b,
				c,
				gen;
	int			differ = 0,
				distinct = 0;
	bool		seen[V] = {false};

	rng_seed(&gen, 99);
	rng_seed(&a, 42);
	rng_seed(&b, 42);
	rng_seed(&c, 43);
	for (int i = 0; i < STEPS; i++)
	{
		int32_t		ta,
					tb,
					tc;

		for (int j = 0; j < V; j++)
			r.logits[j] = (float) normal(&gen);
		ta = sample_token(r.logits, V, &s, &a, r.scratch, r.iscratch);
		tb = sample_token(r.logits, V, &s, &b, r.scratch, r.iscratch);
		tc = sample_token(r.logits, V, &s, &c, r.scratch, r.iscratch);
		CHECK(ta == tb);
		differ += ta != tc;
		distinct += !seen[ta];
		seen[ta] = true;
	}
	CHECK(differ > STEPS / 2);
	CHECK(distinct > STEPS / 2);
	row_free(&r);
}

/*
 * The CPU backend's sample_forward against sample_token on the same rows: random
 * logits (some with ties, one with NaN, one with +inf) and parameter sets that switch
 * each warper on and off, with every row's uniform drawn as the generator draws it. The
 * tokens must agree and each RNG must have been advanced exactly as sample_token does.
 */
TEST(sampler_backend_op_equals_sample_token)
{
	enum
	{
		R = 48
	};
	static const int vocabs[] = {1, 2, 7, 1000, 50400};
	static const dl_sampling params[] = {
		{0, 1.0f, 0, 1.0f}, {1, 1.0f, 0, 1.0f}, {1, 0.7f, 0, 1.0f}, {1, 1.0f, 40, 1.0f},
		{1, 1.0f, 0, 0.9f}, {1, 1.3f, 50, 0.95f}, {1, 0.5f, 1, 0.5f}, {1, 2.0f, 0, 0.05f},
	};
	dl_backend *be;
	dl_error	err;
	dl_rng		gen;

	CHECK_OK(backend_cpu_create(3, 0, &be, &err), &err);
	rng_seed(&gen, 314);
	for (size_t vi = 0; vi < sizeof(vocabs) / sizeof(vocabs[0]); vi++)
	{
		int			V = vocabs[vi];
		row			r = row_alloc(V);
		float	   *logits = malloc((size_t) R * V * sizeof(float));
		dl_sample_row rows[R];
		dl_rng		ra[R],
					rb[R];
		int32_t		tokens[R];
		void	   *ws = be->alloc(be, be->sample_workspace(be, R, V), &err);

		CHECK(ws != NULL);
		for (int i = 0; i < R; i++)
		{
			float	   *x = logits + (size_t) i * V;
			float		scale = (float) (1 + i % 4) * 2.0f;

			for (int j = 0; j < V; j++)
				x[j] = (float) normal(&gen) * scale;
			/* ties: rounded logits */
			if (i % 5 == 1)
				for (int j = 0; j < V; j++)
					x[j] = roundf(x[j]);
			if (i == 7)
				x[V / 2] = NAN;
			if (i == 11)
				x[V / 3] = INFINITY;
			rows[i].p = params[i % (sizeof(params) / sizeof(params[0]))];
			rng_seed(&ra[i], 1000 + i);
			rng_seed(&rb[i], 1000 + i);
			rows[i].u = sample_uniform(&rows[i].p, &ra[i]);
		}
		be->sample_forward(be, tokens, logits, rows, R, V, ws);
		for (int i = 0; i < R; i++)
		{
			int32_t		want;

			memcpy(r.logits, logits + (size_t) i * V, V * sizeof(float));
			want = sample_token(r.logits, V, &rows[i].p, &rb[i], r.scratch, r.iscratch);
			CHECKF(tokens[i] == want, "V %d row %d: the op drew %d, sample_token %d", V, i,
				   tokens[i], want);
			CHECK(memcmp(&ra[i], &rb[i], sizeof(dl_rng)) == 0);
		}
		be->free(be, ws);
		free(logits);
		row_free(&r);
	}
	be->destroy(be);
}
