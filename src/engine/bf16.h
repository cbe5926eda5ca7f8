/*
 * bf16.h: bfloat16 on the host, for the CPU backend, the safetensors reader and the tests.
 * A bfloat16 is the upper half of a float32; rounding to it is to nearest even, as torch
 * does, and keeps a NaN a NaN.
 */
#ifndef DOLLY_BF16_H
#define DOLLY_BF16_H

#include <stdint.h>
#include <string.h>

/* One bfloat16 (its bits) as float32. */
static inline float
bf16_to_float(uint16_t h)
{
	uint32_t	u = (uint32_t) h << 16;
	float		f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

/* float32 to bfloat16 bits, rounded to nearest even. */
static inline uint16_t
float_to_bf16(float f)
{
	uint32_t	u;

	memcpy(&u, &f, sizeof(u));
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t) (u >> 16 | 0x40);
	return (uint16_t) ((u + 0x7fffu + (u >> 16 & 1)) >> 16);
}

#endif
