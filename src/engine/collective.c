/*
 * collective.c: reduce-scatter, all-gather and scalars over a group's staging area, or
 * straight from the peers' memory, and the sharing of device memory between the ranks
 * (see collective.h). The staging area is two halves, each [nranks][chunk] floats followed
 * by [nranks][DL_GROUP_SCALARS] doubles; round k of the group uses half k % 2, and so does
 * a device staging area of bfloat16 (two halves of DEVICE_ROUNDS x chunk).
 */
#include "bf16.h"
#include "collective.h"
#include "sysinfo.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK_ALIGN 16			/* floats: parts of a round start on cache lines */
/*
 * A round through the device staging area is this many of the host's: a barrier costs the
 * same, device memory is plentiful (2 x 16M bfloat16 a rank with the jobs' chunk)
 */
#define DEVICE_ROUNDS 16

/*
 * Seconds a rank waits for the others to close their mappings of its device memory before
 * it frees that memory anyway: only a rank that died, or one stuck in a pass, takes that long
 */
#define CLOSE_WAIT_S 30.0

/* Bytes of one half of the staging area. */
static size_t
half_bytes(int nranks, size_t chunk)
{
	return (size_t) nranks * chunk * sizeof(float) + (size_t) nranks * DL_GROUP_SCALARS * sizeof(double);
}

size_t
group_stage_bytes(int nranks, size_t chunk)
{
	return 2 * half_bytes(nranks, chunk) + (size_t) nranks * sizeof(uint64_t);
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
	return (char *) g->stage + (g->rounds & 1) * half_bytes(g->nranks, g->chunk);
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

/* Floats of each owner's part a round of `chunk` stages: parts start on cache lines. */
static size_t
round_part(const dl_group *g, size_t chunk)
{
	return chunk / g->nranks / CHUNK_ALIGN * CHUNK_ALIGN;
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
 * Every rank's copy of buf (n floats), where every rank maps it: the host peers' buffers
 * or a region group_share mapped; at[r] is rank r's. 0 when buf lies in neither, or for a
 * sum with bfloat16 staging, which rounds what it stages: the staging area then.
 */
static int
peer_copies(const dl_group *g, const dl_backend *be, const float *buf, size_t n, int sum,
			const char **at)
{
	uintptr_t	p = (uintptr_t) buf,
				end = p + n * sizeof(float);

	if (sum && g->bf16)
		return 0;
	if (g->peers != NULL && be->host_memory)
	{
		uintptr_t	mine = (uintptr_t) g->peers[g->rank];

		if (p >= mine && end <= mine + g->peer_n * sizeof(float))
		{
			for (int r = 0; r < g->nranks; r++)
				at[r] = (const char *) g->peers[r] + (p - mine);
			return 1;
		}
	}
	for (int i = 0; i < g->nshared; i++)
	{
		const dl_group_region *s = &g->shared[i];
		uintptr_t	mine = (uintptr_t) s->at[g->rank];

		if (p >= mine && end <= mine + s->bytes)
		{
			for (int r = 0; r < g->nranks; r++)
				at[r] = s->at[r] + (p - mine);
			return 1;
		}
	}
	return 0;
}

/*
 * End a round of work on the device: this rank's operations must be done (the peers read
 * its memory, or may write what it read) before it arrives at the barrier.
 */
static dl_status
device_round_end(dl_group *g, dl_backend *be, dl_error *err)
{
	dl_status	st = be->synchronize(be, err);

	return st != DL_OK ? st : round_end(g, err);
}

/* sum[0 .. len) = part (the first rank's), or += part: sums in rank order, one rank a call. */
static void
add_part(float *sum, const float *part, size_t len, int first)
{
	for (size_t i = 0; i < len; i++)
		sum[i] = first ? part[i] : sum[i] + part[i];
}

/*
 * The reduce-scatter reading the peers' copies at[r]: this rank's part summed in rank
 * order by the backend, between barriers (the data is complete before; no rank changes
 * its buffer until every owner has read it). aside: the sums run on the backend's second
 * queue, and the second barrier waits for group_finish.
 */
static dl_status
peer_reduce_scatter(dl_group *g, dl_backend *be, const char *const *at, size_t n, float *out,
					int accumulate, int aside, dl_error *err)
{
	const void *src[DL_GROUP_MAX_RANKS];
	size_t		lo,
				hi;
	dl_status	st;

	group_part(g->nranks, n, g->rank, &lo, &hi);
	for (int r = 0; r < g->nranks; r++)
		src[r] = at[r] + lo * sizeof(float);
	if ((st = device_round_end(g, be, err)) != DL_OK)
		return st;
	if (aside)
	{
		be->sum_ranks_aside(be, out, src, g->nranks, hi - lo, 0, accumulate);
		g->aside_be = be;
		return DL_OK;
	}
	be->sum_ranks(be, out, src, g->nranks, hi - lo, 0, accumulate);
	return device_round_end(g, be, err);
}

/* The all-gather reading the owners' parts from their copies at[r]. */
static dl_status
peer_all_gather(dl_group *g, dl_backend *be, const char *const *at, size_t n, dl_error *err)
{
	dl_status	st;

	if ((st = device_round_end(g, be, err)) != DL_OK)
		return st;
	for (int r = 0; r < g->nranks; r++)
	{
		size_t		lo,
					hi;

		group_part(g->nranks, n, r, &lo, &hi);
		if (r != g->rank)
			be->copy(be, (char *) at[g->rank] + lo * sizeof(float), at[r] + lo * sizeof(float),
					 (hi - lo) * sizeof(float));
	}
	return device_round_end(g, be, err);
}

/*
 * The reduce-scatter with bfloat16 staging on a device: round k as through the staging
 * area, but each rank rounds its data into its own device staging area (two halves, used
 * alternately, DEVICE_ROUNDS x chunk bfloat16 each) and the owners sum from every rank's,
 * on the device.
 */
static dl_status
device_bf16_reduce_scatter(dl_group *g, dl_backend *be, const float *in, size_t n, float *out,
						   int accumulate, dl_error *err)
{
	const dl_group_region *s = &g->shared[g->nshared - 1];
	int			N = g->nranks;
	size_t		c = round_part(g, DEVICE_ROUNDS * g->chunk),
				my_lo,
				my_hi;
	dl_status	st;

	group_part(N, n, g->rank, &my_lo, &my_hi);
	for (size_t k = 0; k * c < largest_part(N, n); k++)
	{
		size_t		half = (g->rounds & 1) * DEVICE_ROUNDS * g->chunk,
					at,
					len;
		const void *src[DL_GROUP_MAX_RANKS];

		for (int o = 0; o < N; o++)
		{
			size_t		lo,
						hi,
						part;

			group_part(N, n, o, &lo, &hi);
			if ((part = part_len(lo, hi, k, c, &at)) > 0)
				be->to_bf16(be, g->dev_stage + half + (size_t) o * c, in + at, part);
		}
		/* this also waits for the last round's sums: their half is filled next */
		if ((st = device_round_end(g, be, err)) != DL_OK)
			return st;
		if ((len = part_len(my_lo, my_hi, k, c, &at)) == 0)
			continue;
		for (int r = 0; r < N; r++)
			src[r] = (const uint16_t *) s->at[r] + half + (size_t) g->rank * c;
		be->sum_ranks(be, out + (at - my_lo), src, N, len, 1, accumulate);
	}
	/* no rank may free or refill its staging area while another still reads it */
	return device_round_end(g, be, err);
}

/*
 * len floats of device memory at in, rounded to bfloat16 on the device and downloaded to
 * a staging slot: half the bytes of the float32 the host would round.
 */
static dl_status
download_bf16(dl_group *g, dl_backend *be, uint16_t *slot, const float *in, size_t len,
			  dl_error *err)
{
	if (g->dev_scratch == NULL &&
		(g->dev_scratch = be->alloc(be, g->chunk * sizeof(uint16_t), err)) == NULL)
		return err->code;
	g->dev_be = be;
	be->to_bf16(be, g->dev_scratch, in, len);
	return be->download(be, slot, g->dev_scratch, len * sizeof(uint16_t), err);
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
	size_t		c = round_part(g, g->chunk),
				my_lo,
				my_hi;
	float	   *sum,
			   *acc;
	const char *at_peer[DL_GROUP_MAX_RANKS];
	dl_status	st;

	if ((st = group_finish(g, err)) != DL_OK)
		return st;
	if (g->bf16 && g->dev_stage != NULL)
		return device_bf16_reduce_scatter(g, be, in, n, out, accumulate, err);
	if (peer_copies(g, be, in, n, 1, at_peer))
		return peer_reduce_scatter(g, be, at_peer, n, out, accumulate, 0, err);
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
			if (g->bf16 && !be->host_memory)
				st = download_bf16(g, be, (uint16_t *) slot, in + at, part, err);
			else if ((st = be->download(be, slot, in + at, part * sizeof(float), err)) == DL_OK && g->bf16)
			{
				/* in place: bfloat16 i lands at or below float i, already read */
				uint16_t   *h = (uint16_t *) slot;

				for (size_t i = 0; i < part; i++)
					h[i] = float_to_bf16(slot[i]);
			}
			if (st != DL_OK)
				return st;
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
	const char *at_peer[DL_GROUP_MAX_RANKS];
	dl_status	st;

	if ((st = group_finish(g, err)) != DL_OK)
		return st;
	if (peer_copies(g, be, buf, n, 0, at_peer))
		return peer_all_gather(g, be, at_peer, n, err);
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
group_reduce_scatter_start(dl_group *g, dl_backend *be, const float *in, size_t n, float *out,
						   int accumulate, dl_error *err)
{
	const char *at_peer[DL_GROUP_MAX_RANKS];
	dl_status	st;

	if (be->sum_ranks_aside == NULL || g->bf16 || !peer_copies(g, be, in, n, 1, at_peer))
		return group_reduce_scatter(g, be, in, n, out, accumulate, err);
	if ((st = group_finish(g, err)) != DL_OK)
		return st;
	return peer_reduce_scatter(g, be, at_peer, n, out, accumulate, 1, err);
}

dl_status
group_finish(dl_group *g, dl_error *err)
{
	dl_backend *be = g->aside_be;
	dl_status	st;

	if (be == NULL)
		return DL_OK;
	g->aside_be = NULL;
	st = be->sum_ranks_wait(be, err);
	return st != DL_OK ? st : round_end(g, err);
}

dl_status
group_scalars(dl_group *g, const double *mine, int k, double *all, dl_error *err)
{
	char	   *half;
	dl_status	st;

	if (k < 0 || k > DL_GROUP_SCALARS)
		return dl_fail(err, DL_EINVAL, "%d scalars in one exchange (at most %d)", k, DL_GROUP_SCALARS);
	if ((st = group_finish(g, err)) != DL_OK)
		return st;
	half = round_half(g);

	memcpy(scalars_of(g, half, g->rank), mine, k * sizeof(double));
	if ((st = round_end(g, err)) != DL_OK)
		return st;
	for (int r = 0; r < g->nranks; r++)
		memcpy(all + (size_t) r * k, scalars_of(g, half, r), k * sizeof(double));
	return DL_OK;
}

/* Every rank's yes (nonzero) or no into *all_yes: 1 when every rank said yes. */
static dl_status
vote(dl_group *g, int yes, int *all_yes, dl_error *err)
{
	double		mine = yes,
				all[DL_GROUP_MAX_RANKS];
	dl_status	st = group_scalars(g, &mine, 1, all, err);

	*all_yes = st == DL_OK;
	for (int r = 0; st == DL_OK && r < g->nranks; r++)
		*all_yes &= all[r] != 0;
	return st;
}

/* Every rank's handles, n of them, into all[r * n + i]: DL_GROUP_SCALARS doubles a round. */
static dl_status
exchange_handles(dl_group *g, const dl_peer_handle *mine, int n, dl_peer_handle *all, dl_error *err)
{
	double		piece[DL_GROUP_SCALARS],
				got[DL_GROUP_MAX_RANKS * DL_GROUP_SCALARS];
	size_t		bytes = n * sizeof(dl_peer_handle);
	dl_status	st;

	for (size_t at = 0; at < bytes; at += sizeof(piece))
	{
		size_t		len = bytes - at < sizeof(piece) ? bytes - at : sizeof(piece);

		memcpy(piece, (const char *) mine + at, len);
		if ((st = group_scalars(g, piece, DL_GROUP_SCALARS, got, err)) != DL_OK)
			return st;
		for (int r = 0; r < g->nranks; r++)
			memcpy((char *) (all + (size_t) r * n) + at, got + (size_t) r * DL_GROUP_SCALARS, len);
	}
	return DL_OK;
}

/* Tell the caller, if it listens. */
static void
note(const dl_group *g, const char *msg)
{
	if (g->note)
		g->note(g->barrier_arg, msg);
}

/*
 * This rank's part of group_share: its allocations (and bfloat16 staging area) exported,
 * the vote, the peers' handles opened into g->shared, the vote again. *why: this rank's
 * reason when it could not (empty when it could, or when another rank could not).
 */
static dl_status
share_regions(dl_group *g, dl_backend *be, void *const *mem, const size_t *bytes, int n,
			  char *why, size_t why_len, dl_error *err)
{
	dl_peer_handle mine[DL_GROUP_SHARED],
			   *all;
	dl_error	e = {0};
	int			m = n + (g->bf16 != 0),
				ok = be->peer_export != NULL && n > 0 && m <= DL_GROUP_SHARED,
				all_ok = 0;
	dl_status	st;

	if (!ok)
		snprintf(e.msg, sizeof(e.msg), "the %s backend cannot share its memory", be->name);
	g->dev_be = be;
	g->nshared = ok ? m : 0;
	for (int i = 0; i < g->nshared; i++)
	{
		g->shared[i].bytes = i < n ? bytes[i] : 2 * DEVICE_ROUNDS * g->chunk * sizeof(uint16_t);
		g->shared[i].at[g->rank] = i < n ? mem[i] : NULL;
	}
	/* bf16: the staging area the peers read this rank's rounded data from */
	if (ok && g->bf16)
	{
		ok = (g->dev_stage = be->alloc(be, g->shared[n].bytes, &e)) != NULL;
		g->shared[n].at[g->rank] = (char *) g->dev_stage;
	}
	for (int i = 0; ok && i < m; i++)
		ok = be->peer_export(be, g->shared[i].at[g->rank], &mine[i], &e) == DL_OK;
	if ((st = vote(g, ok, &all_ok, err)) != DL_OK || !all_ok)
		goto out;
	/* from here the peers may map this rank's memory: see group_unshare */
	g->exported = 1;
	if ((all = malloc(sizeof(dl_peer_handle) * m * g->nranks)) == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory sharing device memory between ranks");
	st = exchange_handles(g, mine, m, all, err);
	for (int r = 0; st == DL_OK && ok && r < g->nranks; r++)
		for (int i = 0; ok && i < m && r != g->rank; i++)
		{
			void	   *at = NULL;

			ok = be->peer_open(be, &all[(size_t) r * m + i], &at, &e) == DL_OK;
			g->shared[i].at[r] = ok ? at : NULL;
		}
	free(all);
	if (st == DL_OK)
		st = vote(g, ok, &all_ok, err);
out:
	if (!ok)
		snprintf(why, why_len, "%s", e.msg);
	if (st == DL_OK && !all_ok)
		group_unshare(g);
	return st;
}

dl_status
group_share(dl_group *g, dl_backend *be, void *const *mem, const size_t *bytes, int n,
			dl_error *err)
{
	char		why[DL_ERRMSG_LEN] = "",
				msg[DL_ERRMSG_LEN + 64];
	dl_status	st = share_regions(g, be, mem, bytes, n, why, sizeof(why), err);

	if (st != DL_OK)
	{
		group_unshare(g);
		return st;
	}
	if (why[0])
	{
		snprintf(msg, sizeof(msg), "rank %d cannot map the other ranks' device memory: %s", g->rank, why);
		note(g, msg);
	}
	if (g->rank == 0)
		note(g, g->nshared > 0
			 ? "the ranks sum on the devices, each reading the others' memory directly (IPC)"
			 : "the ranks sum through host memory: not every rank can map the others' device memory");
	return DL_OK;
}

/*
 * Every rank's count of unshares, after the staging area's halves: freeing memory that
 * another process still maps is undefined behaviour in CUDA, so a rank that exported some
 * counts its unshare once it has closed its own mappings, and waits until every rank has.
 * Not a barrier: it must work while the group stops too, when the barriers do not wait.
 */
static void
wait_for_closes(dl_group *g)
{
	_Atomic uint64_t *closed = (_Atomic uint64_t *) ((char *) g->stage + 2 * half_bytes(g->nranks, g->chunk));
	uint64_t	mine = ++g->unshares;
	double		until = sys_now_s() + CLOSE_WAIT_S;

	atomic_store(&closed[g->rank], mine);
	for (int r = 0; r < g->nranks; r++)
	{
		while (atomic_load(&closed[r]) < mine && sys_now_s() < until)
			usleep(1000);
		if (atomic_load(&closed[r]) < mine)
		{
			char		msg[128];

			snprintf(msg, sizeof(msg), "rank %d frees its device memory after %.0f s without rank %d closing its mapping of it",
					 g->rank, CLOSE_WAIT_S, r);
			note(g, msg);
		}
	}
}

void
group_unshare(dl_group *g)
{
	dl_error	ignored;

	/* the group may be stopping: no barrier, but no sum may read what is unmapped next */
	if (g->aside_be != NULL)
		(void) g->aside_be->sum_ranks_wait(g->aside_be, &ignored);
	g->aside_be = NULL;
	for (int i = 0; i < g->nshared; i++)
		for (int r = 0; r < g->nranks; r++)
			if (r != g->rank && g->shared[i].at[r] != NULL)
			{
				g->dev_be->peer_close(g->dev_be, g->shared[i].at[r]);
				g->shared[i].at[r] = NULL;
			}
	if (g->exported)
		wait_for_closes(g);
	g->exported = 0;
	if (g->dev_stage != NULL)
		g->dev_be->free(g->dev_be, g->dev_stage);
	if (g->dev_scratch != NULL)
		g->dev_be->free(g->dev_be, g->dev_scratch);
	g->dev_stage = NULL;
	g->dev_scratch = NULL;
	g->nshared = 0;
}

void
group_release(dl_group *g)
{
	free(g->scratch);
	g->scratch = NULL;
	group_unshare(g);
}
