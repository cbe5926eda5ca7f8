/*
 * bf16.h: the bits of a float32 and the 16-bit floats made of them (bfloat16, IEEE half),
 * one set for every engine file, the tests and sampler_fx.h's CUDA users (kernels/ keeps
 * CUDA's own intrinsics for device arrays, common.cuh).
 *
 * A bfloat16 is the upper half of a float32; rounding to it is to nearest even, as torch
 * does, and keeps a NaN a NaN. Bits move through memcpy, which compilers turn into a
 * register move, where a union or a pointer cast would break strict aliasing.
 */
#ifndef DOLLY_BF16_H
#define DOLLY_BF16_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define BITS_FN static inline __host__ __device__
#else
#define BITS_FN static inline
#endif

/* The IEEE-754 bits of f. */
BITS_FN uint32_t
float_bits(float f)
{
	uint32_t	u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

/* The float with these IEEE-754 bits. */
BITS_FN float
float_from_bits(uint32_t u)
{
	float		f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

/* One bfloat16 (its bits) as float32. */
BITS_FN float
bf16_to_float(uint16_t h)
{
	return float_from_bits((uint32_t) h << 16);
}

/* float32 to bfloat16 bits, rounded to nearest even. */
BITS_FN uint16_t
float_to_bf16(float f)
{
	uint32_t	u = float_bits(f);

	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t) (u >> 16 | 0x40);
	return (uint16_t) ((u + 0x7fffu + (u >> 16 & 1)) >> 16);
}

/*
 * One IEEE half (its bits) as float32, branch-free so that loops over arrays vectorise.
 * Zero and subnormals are m * 2^-24, exact in float and computed without float denormals
 * (so DAZ/FTZ modes cannot flush them); exponent 31 keeps the mantissa (NaN payload)
 * under an all-ones exponent.
 */
BITS_FN float
f16_to_float(uint16_t h)
{
	uint32_t	exp = (h >> 10) & 0x1f,
				man = h & 0x3ff,
				normal = ((exp + 112) << 23) | (man << 13),
				special = 0x7f800000u | (man << 13),
				tiny = float_bits((float) man * 0x1p-24f),
				is_tiny = -(uint32_t) (exp == 0),	/* all ones or zero: selects without branches */
				is_special = -(uint32_t) (exp == 31);

	return float_from_bits(((uint32_t) (h & 0x8000) << 16) | (tiny & is_tiny) |
						   (special & is_special) | (normal & ~(is_tiny | is_special)));
}

/*
 * float32 to IEEE half bits, rounded to nearest even as torch does: 65520 and above
 * become infinity, a NaN stays a NaN (quiet), and below 2^-14 the half is subnormal.
 */
BITS_FN uint16_t
float_to_f16(float f)
{
	uint32_t	u = float_bits(f),
				sign = u >> 16 & 0x8000,
				a = u & 0x7fffffffu;

	if (a > 0x7f800000u)
		return (uint16_t) (sign | 0x7e00 | (a >> 13 & 0x3ff));
	if (a >= 0x477ff000u)
		return (uint16_t) (sign | 0x7c00);
	if (a < 0x38800000u)
	{
		/* |f| + 0.5 rounds |f| to a multiple of 2^-24 (0.5's ulp), a subnormal's step */
		return (uint16_t) (sign | (float_bits(float_from_bits(a) + 0.5f) - 0x3f000000u));
	}
	/* the exponent rebiased from 127 to 15, the 13 dropped bits rounded to even */
	a -= 0x38000000u;
	return (uint16_t) (sign | (a + 0xfffu + (a >> 13 & 1)) >> 13);
}

#endif
