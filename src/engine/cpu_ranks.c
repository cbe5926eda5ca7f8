/*
 * cpu_ranks.c: the CPU backend's part in the sums over data-parallel ranks (collective.c):
 * the rank-order sum of the ranks' buffers, which the ranks' processes share in host
 * memory, and the rounding to bfloat16. On the caller's thread: the ranks sum their parts
 * at once, each on its own core.
 */
#include "backend_cpu.h"
#include "bf16.h"

#define SUM_BLOCK 2048			/* floats summed at a time: the sums stay in L1 */

/* Element i of a rank's buffer, float32 or bfloat16 bits. */
static inline float
source_at(const void *src, size_t i, int bf16)
{
	return bf16 ? bf16_to_float(((const uint16_t *) src)[i]) : ((const float *) src)[i];
}

/*
 * A block at a time, rank after rank: each source is read as one stream, and out (which
 * may be a source) is written only once every rank's block is in the sums.
 */
void
cpu_sum_ranks(dl_backend *be, float *out, const void *const *src, int nsrc, size_t n, int bf16,
			  int accumulate)
{
	float		sum[SUM_BLOCK];
	size_t		es = bf16 ? sizeof(uint16_t) : sizeof(float);

	(void) be;
	for (size_t b = 0; b < n; b += SUM_BLOCK)
	{
		size_t		len = n - b < SUM_BLOCK ? n - b : SUM_BLOCK;

		for (int r = 0; r < nsrc; r++)
		{
			const char *at = (const char *) src[r] + b * es;

			for (size_t i = 0; i < len; i++)
				sum[i] = r ? sum[i] + source_at(at, i, bf16) : source_at(at, i, bf16);
		}
		for (size_t i = 0; i < len; i++)
			out[b + i] = accumulate ? out[b + i] + sum[i] : sum[i];
	}
}

/* bfloat16 bits of each float, rounded to nearest even. */
void
cpu_to_bf16(dl_backend *be, uint16_t *dst, const float *src, size_t n)
{
	(void) be;
	for (size_t i = 0; i < n; i++)
		dst[i] = float_to_bf16(src[i]);
}
