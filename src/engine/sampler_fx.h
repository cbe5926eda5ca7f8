/*
 * sampler_fx.h: exact sums of float probabilities and the top-p cut on them, shared by
 * the CPU sampler (sampler.c) and the CUDA one (kernels/sampling.cu) so that both find
 * the same kept set whatever order they add in.
 *
 * A mass is an unsigned 192-bit fixed-point number in units of 2^-149, the smallest
 * float denormal: every float probability, and any sum of 2^31 of them, is exact.
 */
#ifndef DOLLY_SAMPLER_FX_H
#define DOLLY_SAMPLER_FX_H

#include <stdint.h>

#include "bf16.h"				/* float_bits */

#ifdef __CUDACC__
#define FX_FN static inline __host__ __device__
#else
#define FX_FN static inline
#endif

typedef struct fx192
{
	uint64_t	w[3];
} fx192;

/* a += b. */
FX_FN void
fx_add(fx192 *a, const fx192 *b)
{
	uint64_t	carry = 0;

	for (int i = 0; i < 3; i++)
	{
		uint64_t	s = a->w[i] + b->w[i];
		uint64_t	t = s + carry;

		carry = (s < b->w[i]) | (t < s);
		a->w[i] = t;
	}
}

/* a += v * 2^shift, for v < 2^56 and shift < 128. */
FX_FN void
fx_add_shifted(fx192 *a, uint64_t v, int shift)
{
	fx192		b = {{0, 0, 0}};
	int			word = shift >> 6,
				bit = shift & 63;

	b.w[word] = v << bit;
	if (bit)
		b.w[word + 1] = v >> (64 - bit);
	fx_add(a, &b);
}

/* -1, 0 or 1 as a <, == or > b. */
FX_FN int
fx_cmp(const fx192 *a, const fx192 *b)
{
	for (int i = 2; i >= 0; i--)
		if (a->w[i] != b->w[i])
			return a->w[i] < b->w[i] ? -1 : 1;
	return 0;
}

/*
 * The mantissa (implicit bit included) of non-negative float bits b; with fx_shift,
 * value = mantissa * 2^shift * 2^-149, the float in fx192 units.
 */
FX_FN uint64_t
fx_mantissa(uint32_t b)
{
	return (b & 0x7FFFFF) | (b >= 0x800000 ? 0x800000 : 0);
}

/* The shift that goes with fx_mantissa (denormals share the smallest normal's). */
FX_FN int
fx_shift(uint32_t b)
{
	int			e = b >> 23;

	return e ? e - 1 : 0;
}

/* a += the non-negative float f. */
FX_FN void
fx_add_float(fx192 *a, float f)
{
	uint32_t	b = float_bits(f);

	fx_add_shifted(a, fx_mantissa(b), fx_shift(b));
}

/*
 * The top-p cut, precomputed: a token is dropped when fl32(its ascending cumulative
 * mass) <= thr, i.e. when that exact mass is below the midpoint between thr and the
 * next float (or equal to it when round-to-even goes down to thr). With mass = total -
 * before (before: the mass of the tokens sorted above it), the token is kept iff
 * before + mid < total, or <= when thr's mantissa is odd.
 */
typedef struct topp_cut
{
	fx192		total;
	fx192		mid;
	int			inclusive;
} topp_cut;

/* The cut of top_p in (0, 1) over probabilities of mass total. */
FX_FN topp_cut
topp_cut_make(const fx192 *total, float top_p)
{
	topp_cut	cut = {*total, {{0, 0, 0}}, 0};
	uint32_t	tb = float_bits((float) (1.0 - (double) top_p));
	uint64_t	tm = fx_mantissa(tb);

	/* thr >= 2^-24 is a normal float: its midpoint (2m + 1) 2^(e - 151) is exact */
	fx_add_shifted(&cut.mid, 2 * tm + 1, fx_shift(tb) - 1);
	cut.inclusive = (int) (tm & 1);
	return cut;
}

/* Whether a token with `before` mass sorted above it survives the cut. */
FX_FN int
topp_keeps(const topp_cut *cut, const fx192 *before)
{
	fx192		s = *before;
	int			c;

	fx_add(&s, &cut->mid);
	c = fx_cmp(&s, &cut->total);
	return c < 0 || (c == 0 && cut->inclusive);
}

#endif
