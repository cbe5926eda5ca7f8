/*
 * collective.c: reduce-scatter, all-gather and scalars over a group's staging area (see
 * collective.h). The staging area is two halves, each [nranks][chunk] floats followed by
 * [nranks][DL_GROUP_SCALARS] doubles; round k of the group uses half k % 2.
 */
#include "bf16.h"
#include "collective.h"

#include <stdlib.h>
#include <string.h>

#define CHUNK_ALIGN 16			/* floats: parts of a round start on cache lines */

size_t
group_stage_bytes(int nranks, size_t chunk)
{
	return 2 * ((size_t) nranks * chunk * sizeof(float) + (size_t) nranks * DL_GROUP_SCALARS * sizeof(double));
}

void
group_slice(int nranks, size_t n, int rank, size_t *lo, size_t *hi)
{
	/* the product in 128 bits: n * rank overflows 64 for no real buffer, but costs nothing */
	*lo = (size_t) ((unsigned __int128) n * rank / nranks);
	*hi = (size_t) ((unsigned __int128) n * (rank + 1) / nranks);
}

/* The half of the staging area the current round uses. */
static char *
round_half(const dl_group *g)
{
	return (char *) g->stage + (g->rounds & 1) * (group_stage_bytes(g->nranks, g->chunk) / 2);
}

/* Rank r's floats in a half. */
static float *
stage_of(const dl_group *g, char *half, int r)
{
	return (float *) half + (size_t) r * g->chunk;
}

/* Rank r's scalars in a half. */
static double *
scalars_of(const dl_group *g, char *half, int r)
{
	return (double *) stage_of(g, half, g->nranks) + (size_t) r * DL_GROUP_SCALARS;
}

/* End a round: wait for every rank; the next round uses the other half. */
static dl_status
round_end(dl_group *g, dl_error *err)
{
	g->rounds++;
	if (g->barrier(g->barrier_arg))
		return dl_fail(err, DL_ECANCELLED, "the data-parallel group stopped");
	return DL_OK;
}

/* The largest slice of n over the ranks (the rounds every rank takes). */
static size_t
largest_slice(int nranks, size_t n)
{
	return n / nranks + (n % nranks != 0);
}

/* Scratch for sums (chunk floats) and what they are added to (chunk more), on first use. */
static dl_status
need_scratch(dl_group *g, dl_error *err)
{
	if (g->scratch == NULL && (g->scratch = malloc(2 * g->chunk * sizeof(float))) == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory for the data-parallel sums");
	return DL_OK;
}

/* Floats [at, hi) of a slice that round k of parts of c floats covers (0 when done). */
static size_t
part_len(size_t lo, size_t hi, size_t k, size_t c, size_t *at)
{
	*at = lo + k * c;
	return *at < hi ? (hi - *at < c ? hi - *at : c) : 0;
}

/* Owner o's part of elements [first, end) of an array of n: [*lo, *hi), maybe empty. */
static void
owned_part(int nranks, size_t n, int o, size_t first, size_t end, size_t *lo, size_t *hi)
{
	group_slice(nranks, n, o, lo, hi);
	*lo = *lo > first ? *lo : first;
	*hi = *hi < end ? *hi : end;
	*hi = *hi > *lo ? *hi : *lo;
}

/*
 * Round k of a reduce-scatter: every rank stages part k of every owner's part of
 * [first, end) (c floats each, side by side), then each owner sums its parts over the
 * ranks in rank order.
 */
dl_status
group_reduce_scatter(dl_group *g, dl_backend *be, const float *in, size_t first, size_t count,
					 size_t n, float *out, int accumulate, dl_error *err)
{
	int			N = g->nranks;
	size_t		c = g->chunk / N / CHUNK_ALIGN * CHUNK_ALIGN,
				end = first + count,
				most = 0,
				slice_lo,
				slice_hi,
				my_lo,
				my_hi;
	float	   *sum,
			   *acc;
	dl_status	st;

	if ((st = need_scratch(g, err)) != DL_OK)
		return st;
	acc = g->scratch + g->chunk;
	for (int o = 0; o < N; o++)
	{
		owned_part(N, n, o, first, end, &my_lo, &my_hi);
		most = my_hi - my_lo > most ? my_hi - my_lo : most;
	}
	group_slice(N, n, g->rank, &slice_lo, &slice_hi);
	owned_part(N, n, g->rank, first, end, &my_lo, &my_hi);
	for (size_t k = 0; k * c < most; k++)
	{
		char	   *half = round_half(g);
		size_t		at,
					len;

		for (int o = 0; o < N; o++)
		{
			float	   *slot = stage_of(g, half, g->rank) + (size_t) o * c;
			size_t		lo,
						hi,
						part;

			owned_part(N, n, o, first, end, &lo, &hi);
			if ((part = part_len(lo, hi, k, c, &at)) == 0)
				continue;
			if ((st = be->download(be, slot, in + (at - first), part * sizeof(float), err)) != DL_OK)
				return st;
			if (g->bf16)
			{
				/* in place: bfloat16 i lands at or below float i, already read */
				uint16_t   *h = (uint16_t *) slot;

				for (size_t i = 0; i < part; i++)
					h[i] = float_to_bf16(slot[i]);
			}
		}
		if ((st = round_end(g, err)) != DL_OK)
			return st;
		if ((len = part_len(my_lo, my_hi, k, c, &at)) == 0)
			continue;
		/* host memory, not accumulating: the sums go straight to out */
		sum = be->host_memory && !accumulate ? out + (at - slice_lo) : g->scratch;
		for (int r = 0; r < N; r++)
		{
			const float *part = stage_of(g, half, r) + (size_t) g->rank * c;
			const uint16_t *h = (const uint16_t *) part;

			if (g->bf16)
				for (size_t i = 0; i < len; i++)
					sum[i] = r ? sum[i] + bf16_to_float(h[i]) : bf16_to_float(h[i]);
			else
				for (size_t i = 0; i < len; i++)
					sum[i] = r ? sum[i] + part[i] : part[i];
		}
		at -= slice_lo;
		if (accumulate)
		{
			if ((st = be->download(be, acc, out + at, len * sizeof(float), err)) != DL_OK)
				return st;
			for (size_t i = 0; i < len; i++)
				sum[i] += acc[i];
		}
		if (sum != out + at && (st = be->upload(be, out + at, sum, len * sizeof(float), err)) != DL_OK)
			return st;
	}
	return DL_OK;
}

/* Round k of an all-gather: every rank stages part k of its slice; all copy every part. */
dl_status
group_all_gather(dl_group *g, dl_backend *be, float *buf, size_t n, dl_error *err)
{
	int			N = g->nranks;
	size_t		c = g->chunk / CHUNK_ALIGN * CHUNK_ALIGN,
				rounds = (largest_slice(N, n) + c - 1) / c;
	dl_status	st;

	for (size_t k = 0; k < rounds; k++)
	{
		char	   *half = round_half(g);
		size_t		lo,
					hi,
					at,
					len;

		group_slice(N, n, g->rank, &lo, &hi);
		if ((len = part_len(lo, hi, k, c, &at)) > 0 &&
			(st = be->download(be, stage_of(g, half, g->rank), buf + at, len * sizeof(float), err)) != DL_OK)
			return st;
		if ((st = round_end(g, err)) != DL_OK)
			return st;
		for (int r = 0; r < N; r++)
		{
			group_slice(N, n, r, &lo, &hi);
			if (r != g->rank && (len = part_len(lo, hi, k, c, &at)) > 0 &&
				(st = be->upload(be, buf + at, stage_of(g, half, r), len * sizeof(float), err)) != DL_OK)
				return st;
		}
	}
	return DL_OK;
}

dl_status
group_all_reduce(dl_group *g, dl_backend *be, float *buf, size_t n, dl_error *err)
{
	size_t		lo,
				hi;
	dl_status	st;

	group_slice(g->nranks, n, g->rank, &lo, &hi);
	st = group_reduce_scatter(g, be, buf, 0, n, n, buf + lo, 0, err);
	return st == DL_OK ? group_all_gather(g, be, buf, n, err) : st;
}

dl_status
group_scalars(dl_group *g, const double *mine, int k, double *all, dl_error *err)
{
	char	   *half = round_half(g);
	dl_status	st;

	if (k < 0 || k > DL_GROUP_SCALARS)
		return dl_fail(err, DL_EINVAL, "%d scalars in one exchange (at most %d)", k, DL_GROUP_SCALARS);

	memcpy(scalars_of(g, half, g->rank), mine, k * sizeof(double));
	if ((st = round_end(g, err)) != DL_OK)
		return st;
	for (int r = 0; r < g->nranks; r++)
		memcpy(all + (size_t) r * k, scalars_of(g, half, r), k * sizeof(double));
	return DL_OK;
}

void
group_release(dl_group *g)
{
	free(g->scratch);
	g->scratch = NULL;
}
