/*
 * dropout.h: which elements dropout keeps, as a hash of (seed, row, column) rather than
 * a stream of random numbers: every backend draws the same mask, and a backward pass (or
 * a recomputing checkpoint) draws it again instead of keeping it. One function for the
 * engine and kernels/ alike.
 */
#ifndef DOLLY_DROPOUT_H
#define DOLLY_DROPOUT_H

#include <stdint.h>

#ifdef __CUDACC__
#define DROPOUT_FN static inline __host__ __device__
#else
#define DROPOUT_FN static inline
#endif

/* The factor of element (row, col) of a dropout of probability p: 0, or 1 / (1 - p). */
DROPOUT_FN float
dropout_factor(uint64_t seed, uint32_t row, uint32_t col, float p)
{
	/* splitmix64's finaliser of the element's index under the seed */
	uint64_t	z = seed + (((uint64_t) row << 32 | col) + 1) * 0x9E3779B97F4A7C15ull;

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	z ^= z >> 31;
	/* the top 24 bits as a uniform in [0, 1) */
	return (float) (z >> 40) * (1.0f / 16777216.0f) < p ? 0.0f : 1.0f / (1.0f - p);
}

#endif
