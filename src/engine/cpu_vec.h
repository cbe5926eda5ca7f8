/*
 * cpu_vec.h: the CPU backend's inline vector math: loads of float32 and bfloat16 into the
 * widest vector the target has, dot products, sums and maxima, and exp written out.
 *
 * Loops are written so that gcc vectorises them without -ffast-math: fixed-width
 * accumulator arrays stand in for reassociation, and exp is written out below because
 * libm's is a scalar call.
 */
#ifndef DOLLY_CPU_VEC_H
#define DOLLY_CPU_VEC_H

#include "bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>

/* The widest float vector the target has: gcc's vector extension, so any ISA compiles. */
#if defined(__AVX512F__)
#define VEC_LANES 16
#elif defined(__AVX__)
#define VEC_LANES 8
#else
#define VEC_LANES 4
#endif

typedef float vfloat __attribute__((vector_size(VEC_LANES * sizeof(float))));
typedef uint16_t vbf16 __attribute__((vector_size(VEC_LANES * sizeof(uint16_t))));
typedef uint32_t vu32 __attribute__((vector_size(VEC_LANES * sizeof(uint32_t))));

/* VEC_LANES floats from p, any alignment. */
static inline vfloat
vload(const float *p)
{
	vfloat		v;

	memcpy(&v, p, sizeof(v));
	return v;
}

/* VEC_LANES bfloat16 from p widened to float32: bf16_to_float on every lane. */
static inline vfloat
vload_bf16(const uint16_t *p)
{
	vbf16		h;
	vu32		u;
	vfloat		v;

	memcpy(&h, p, sizeof(h));
	u = __builtin_convertvector(h, vu32) << 16;
	memcpy(&v, &u, sizeof(v));
	return v;
}

/* Element i of a matrix in weight format (bf16 or float32) as float32. */
static inline float
weight_at(const void *W, size_t i, int bf16)
{
	return bf16 ? bf16_to_float(((const uint16_t *) W)[i]) : ((const float *) W)[i];
}

/* Sum of the lanes of v. */
static inline float
vhsum(vfloat v)
{
#if defined(__AVX512F__)
	return _mm512_reduce_add_ps((__m512) v);
#else
	float		s = 0.0f;

	for (int i = 0; i < VEC_LANES; i++)
		s += v[i];
	return s;
#endif
}

/* Dot product of a (float32) and b (float32, or bfloat16 widened when bf16), n values. */
static inline float
vdot(const float *a, const void *b, int n, int bf16)
{
	vfloat		acc = {0};
	float		s;
	int			i = 0;

	if (bf16)
		for (; i + VEC_LANES <= n; i += VEC_LANES)
			acc += vload(a + i) * vload_bf16((const uint16_t *) b + i);
	else
		for (; i + VEC_LANES <= n; i += VEC_LANES)
			acc += vload(a + i) * vload((const float *) b + i);
	s = vhsum(acc);
	for (; i < n; i++)
		s += a[i] * weight_at(b, i, bf16);
	return s;
}

/* y[i] += alpha x[i], x float32 or (bf16) bfloat16, n values. */
static inline void
vaxpy(float *restrict y, const void *restrict x, float alpha, int n, int bf16)
{
	int			i = 0;

	for (; i + VEC_LANES <= n; i += VEC_LANES)
	{
		vfloat		yv = vload(y + i) + alpha * (bf16 ? vload_bf16((const uint16_t *) x + i)
											 : vload((const float *) x + i));

		memcpy(y + i, &yv, sizeof(yv));
	}
	for (; i < n; i++)
		y[i] += alpha * weight_at(x, i, bf16);
}

/* Sum of a[i]. */
static inline float
vsum(const float *a, int n)
{
	float		acc[16] = {0};
	float		s = 0.0f;
	int			i = 0;

	for (; i + 16 <= n; i += 16)
		for (int j = 0; j < 16; j++)
			acc[j] += a[i + j];
	for (; i < n; i++)
		s += a[i];
	for (int j = 0; j < 16; j++)
		s += acc[j];
	return s;
}

/* Largest a[i] (n >= 1). */
static inline float
vmax(const float *a, int n)
{
	float		acc[16];
	float		m = a[0];
	int			i = 0;

	for (int j = 0; j < 16; j++)
		acc[j] = a[0];
	for (; i + 16 <= n; i += 16)
		for (int j = 0; j < 16; j++)
			acc[j] = a[i + j] > acc[j] ? a[i + j] : acc[j];
	for (; i < n; i++)
		m = a[i] > m ? a[i] : m;
	for (int j = 0; j < 16; j++)
		m = acc[j] > m ? acc[j] : m;
	return m;
}

/*
 * exp(x) for float32 (Cephes expf: x = n ln2 + r, a degree-6 polynomial in r, 2^n put
 * into the exponent bits), within 2 ulp where the result is a normal float. Below
 * -87 it returns a value under 1e-29 rather than 0, above 88 a huge finite value or
 * infinity; non-finite inputs give unspecified values. The comparisons are 0/1 values,
 * not branches, and floor is done by hand, so that loops calling it vectorise without
 * -ffast-math (gcc will not if-convert float selects or vectorise floorf otherwise).
 */
static inline float
fast_expf(float x)
{
	float		t = x * 1.44269504088896341f + 0.5f;
	float		fx,
				y,
				r,
				r2;
	int32_t		n;

	t += (float) (t < -127.0f) * (-127.0f - t);
	t -= (float) (t > 128.0f) * (t - 128.0f);
	n = (int32_t) t;
	n -= (float) n > t;			/* floor */
	fx = (float) n;
	r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
	r2 = r * r;
	y = 1.9875691500e-4f;
	y = y * r + 1.3981999507e-3f;
	y = y * r + 8.3334519073e-3f;
	y = y * r + 4.1665795894e-2f;
	y = y * r + 1.6666665459e-1f;
	y = y * r + 5.0000001201e-1f;
	y = y * r2 + r + 1.0f;
	n = n < -126 ? -126 : n;
	n = n > 127 ? 127 : n;
	return y * float_from_bits((uint32_t) (n + 127) << 23);
}

/* Sum of exp(a[i] - m). */
static inline float
vsum_exp(const float *a, int n, float m)
{
	float		acc[16] = {0};
	float		s = 0.0f;
	int			i = 0;

	for (; i + 16 <= n; i += 16)
		for (int j = 0; j < 16; j++)
			acc[j] += fast_expf(a[i + j] - m);
	for (; i < n; i++)
		s += fast_expf(a[i] - m);
	for (int j = 0; j < 16; j++)
		s += acc[j];
	return s;
}

#endif
