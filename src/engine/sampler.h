/*
 * sampler.h: choosing the next token from a row of logits, as transformers' generate does.
 *
 * Greedy decoding is torch.argmax (the first maximum). Sampling applies transformers'
 * logits processors in their order (temperature, top-k, top-p), then draws from the
 * renormalised softmax with our own seeded RNG (xoshiro256**), so that the same seed
 * gives the same tokens. The RNG is not torch's: the same seed gives different draws
 * than transformers, the same distribution. A draw is a function of one uniform taken
 * from the RNG on the host, so a backend can draw on the device (sample_forward).
 */
#ifndef DOLLY_SAMPLER_H
#define DOLLY_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

/* xoshiro256** state (Blackman and Vigna); seed it with rng_seed. */
typedef struct dl_rng
{
	uint64_t	s[4];
} dl_rng;

/* Seed the state from one 64-bit value through splitmix64, as the xoshiro authors advise. */
void		rng_seed(dl_rng *rng, uint64_t seed);

/* The next 64 random bits. */
uint64_t	rng_next(dl_rng *rng);

/* A uniform double in [0, 1) with 53 random bits. */
double		rng_uniform(dl_rng *rng);

/* A uniform float in [0, 1) with 24 random bits. */
float		rng_uniformf(dl_rng *rng);

/* Shuffle n elements of size bytes at base in place (Fisher-Yates, from the last). */
void		rng_shuffle(void *base, size_t n, size_t size, dl_rng *rng);

/*
 * Generation parameters with transformers' meanings: do_sample 0 is greedy and ignores
 * the rest; temperature 1 (no change), top_k 0 and top_p 1 switch the warpers off.
 */
typedef struct dl_sampling
{
	int			do_sample;
	float		temperature;
	int			top_k;
	float		top_p;
} dl_sampling;

/*
 * DL_EINVAL, naming the parameter and its range, when a parameter is out of range or
 * NaN: temperature in (0, 100] (checked only when sampling), top_k >= 0, top_p in (0, 1].
 */
dl_status	sampling_check(const dl_sampling *p, dl_error *err);

/*
 * The kept set and its weights (what transformers' warpers leave finite, and the
 * softmax over it). Returns n >= 1 and leaves the kept token ids in iscratch[0, n) and
 * the unnormalised probability of token id at scratch[vocab + id]. scratch holds
 * 2 * vocab floats, iscratch vocab ints; p must have passed sampling_check. Greedy
 * parameters, NaN or infinite logits give the single argmax.
 *
 * The definition, followed exactly: x = logits / temperature (float); top-k drops
 * x < the k-th largest x; p = fl32(e / S), e = expf(x - max x), S the double sum of e
 * in index order; top-p sorts ascending by x (ties by index, as a stable sort), drops
 * the tokens whose cumulative p, rounded to float, is <= fl32(1 - top_p), and keeps
 * the most likely token always. The cumulative sums are exact rather than torch's
 * double ones (the two differ only if the double error crosses a float rounding
 * boundary), which lets the kept set be found without sorting the whole vocabulary.
 */
int			sampling_filter(const float *logits, int vocab, const dl_sampling *p,
							float *scratch, int32_t *iscratch);

/* One row's draw: its parameters and the uniform in [0, 1) that sample_uniform gave it. */
typedef struct dl_sample_row
{
	dl_sampling p;
	double		u;
} dl_sample_row;

/*
 * The uniform a row's draw consumes from its sequence's RNG: one rng_uniform when
 * sampling, nothing (0) when greedy.
 */
double		sample_uniform(const dl_sampling *p, dl_rng *rng);

/*
 * The next token for one row of vocab logits: the argmax when greedy, else the kept token
 * (sampling_filter) at which the cumulative weight, in token id order, first exceeds
 * u times the kept weight (double sums; the last token with any weight if rounding
 * leaves none). Returns -1 only when vocab < 1. Scratch as for sampling_filter.
 */
int32_t		sample_draw(const float *logits, int vocab, const dl_sample_row *row,
						float *scratch, int32_t *iscratch);

/* sample_draw with row u = sample_uniform(p, rng). */
int32_t		sample_token(const float *logits, int vocab, const dl_sampling *p, dl_rng *rng,
						 float *scratch, int32_t *iscratch);

#endif
