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
group_part(int nranks, size_t n, int rank, size_t *lo, size_t *hi)
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

/* The largest part of n over the ranks (the rounds every rank takes). */
static size_t
largest_part(int nranks, size_t n)
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

/* Floats [*at, *at + len) of a part [lo, hi) that round k covers, c a round (len 0: done). */
static size_t
part_len(size_t lo, size_t hi, size_t k, size_t c, size_t *at)
{
	*at = lo + k * c;
	return *at < hi ? (hi - *at < c ? hi - *at : c) : 0;
}

/*
 * Where buf (n floats) lies in this rank's peer buffer, its offset there; -1 when it does
 * not, or when the peers cannot be read directly (device memory, bfloat16 staging).
 */
static long long
peer_offset(const dl_group *g, const dl_backend *be, const float *buf, size_t n)
{
	uintptr_t	mine,
				at = (uintptr_t) buf;

	if (g->peers == NULL || !be->host_memory || g->bf16)
		return -1;
	mine = (uintptr_t) g->peers[g->rank];
	if (at < mine || at + n * sizeof(float) > mine + g->peer_n * sizeof(float))
		return -1;
	return (long long) ((at - mine) / sizeof(float));
}

/* sum[0 .. len) = part (the first rank's), or += part: sums in rank order, one rank a call. */
static void
add_part(float *sum, const float *part, size_t len, int first)
{
	for (size_t i = 0; i < len; i++)
		sum[i] = first ? part[i] : sum[i] + part[i];
}

#define PEER_BLOCK 4096			/* floats summed at a time: the sums stay in L1 */

/*
 * The reduce-scatter reading the peers' buffers: this rank's part summed in rank order
 * from every buffer at offset off, between barriers (the data is complete before; no
 * rank changes its buffer until every owner has read it).
 */
static dl_status
peer_reduce_scatter(dl_group *g, size_t off, size_t n, float *out, int accumulate, dl_error *err)
{
	size_t		block = g->chunk < PEER_BLOCK ? g->chunk : PEER_BLOCK,
				lo,
				hi;
	dl_status	st;

	if ((st = need_scratch(g, err)) != DL_OK || (st = round_end(g, err)) != DL_OK)
		return st;
	group_part(g->nranks, n, g->rank, &lo, &hi);
	for (size_t b = lo; b < hi; b += block)
	{
		size_t		len = hi - b < block ? hi - b : block;
		float	   *sum = g->scratch;	/* out may be this rank's own input */

		for (int r = 0; r < g->nranks; r++)
			add_part(sum, g->peers[r] + off + b, len, r == 0);
		if (accumulate)
			for (size_t i = 0; i < len; i++)
				out[b - lo + i] += sum[i];
		else
			memcpy(out + (b - lo), sum, len * sizeof(float));
	}
	return round_end(g, err);
}

/* The all-gather reading the owners' parts from their buffers, at offset off. */
static dl_status
peer_all_gather(dl_group *g, size_t off, size_t n, dl_error *err)
{
	float	   *buf = g->peers[g->rank] + off;
	dl_status	st;

	if ((st = round_end(g, err)) != DL_OK)
		return st;
	for (int r = 0; r < g->nranks; r++)
	{
		size_t		lo,
					hi;

		group_part(g->nranks, n, r, &lo, &hi);
		if (r != g->rank)
			memcpy(buf + lo, g->peers[r] + off + lo, (hi - lo) * sizeof(float));
	}
	return round_end(g, err);
}

/*
 * Round k of a reduce-scatter: every rank stages part k of every owner's part (c floats
 * each, side by side), then each owner sums its parts over the ranks in rank order.
 */
dl_status
group_reduce_scatter(dl_group *g, dl_backend *be, const float *in, size_t n, float *out,
					 int accumulate, dl_error *err)
{
	int			N = g->nranks;
	size_t		c = g->chunk / N / CHUNK_ALIGN * CHUNK_ALIGN,
				my_lo,
				my_hi;
	float	   *sum,
			   *acc;
	long long	off = peer_offset(g, be, in, n);
	dl_status	st;

	if (off >= 0)
		return peer_reduce_scatter(g, (size_t) off, n, out, accumulate, err);
	if ((st = need_scratch(g, err)) != DL_OK)
		return st;
	acc = g->scratch + g->chunk;
	group_part(N, n, g->rank, &my_lo, &my_hi);
	for (size_t k = 0; k * c < largest_part(N, n); k++)
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

			group_part(N, n, o, &lo, &hi);
			if ((part = part_len(lo, hi, k, c, &at)) == 0)
				continue;
			if ((st = be->download(be, slot, in + at, part * sizeof(float), err)) != DL_OK)
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
		at -= my_lo;
		sum = be->host_memory && !accumulate ? out + at : g->scratch;
		for (int r = 0; r < N; r++)
		{
			const float *part = stage_of(g, half, r) + (size_t) g->rank * c;
			const uint16_t *h = (const uint16_t *) part;

			if (g->bf16)
				for (size_t i = 0; i < len; i++)
					sum[i] = r ? sum[i] + bf16_to_float(h[i]) : bf16_to_float(h[i]);
			else
				add_part(sum, part, len, r == 0);
		}
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

/* Round k of an all-gather: every rank stages round k of its part; all copy every one. */
dl_status
group_all_gather(dl_group *g, dl_backend *be, float *buf, size_t n, dl_error *err)
{
	int			N = g->nranks;
	size_t		c = g->chunk / CHUNK_ALIGN * CHUNK_ALIGN;
	long long	off = peer_offset(g, be, buf, n);
	dl_status	st;

	if (off >= 0)
		return peer_all_gather(g, (size_t) off, n, err);
	for (size_t k = 0; k * c < largest_part(N, n); k++)
	{
		char	   *half = round_half(g);
		size_t		lo,
					hi,
					at,
					len;

		group_part(N, n, g->rank, &lo, &hi);
		if ((len = part_len(lo, hi, k, c, &at)) > 0 &&
			(st = be->download(be, stage_of(g, half, g->rank), buf + at, len * sizeof(float), err)) != DL_OK)
			return st;
		if ((st = round_end(g, err)) != DL_OK)
			return st;
		for (int r = 0; r < N; r++)
		{
			group_part(N, n, r, &lo, &hi);
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

	group_part(g->nranks, n, g->rank, &lo, &hi);
	st = group_reduce_scatter(g, be, buf, n, buf + lo, 0, err);
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
