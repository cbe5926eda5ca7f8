/*
 * collective.h: the sums of data parallelism, without NCCL: reduce-scatter, all-gather and
 * all-reduce of float arrays, and scalars, over the ranks of a group, through a staging
 * area of memory every rank maps (PostgreSQL shared memory for the job's worker processes,
 * plain memory for threads in tests and benchmarks).
 *
 * Every element is summed in rank order, by one rank, whatever the size of the group's
 * rounds: every rank ends with bit-identical results, and the same run gives the same
 * parameters every time. A buffer of n floats is cut into nranks contiguous parts
 * (group_part); rank r owns part r: it sums it (ZeRO: the trainer calls these per span of
 * the parameters, so that a rank owns a part of every layer). Device buffers (a backend whose memory is not the host's) go
 * through the staging area by the backend's download and upload; nothing of the size of
 * the buffer is allocated on the host.
 *
 * A round stages at most `chunk` floats per rank and costs one barrier: the staging area
 * has two halves, used alternately, so a rank may fill one while a slower rank still
 * sums from the other.
 *
 * Where every rank's buffer is mapped by all, a reduce-scatter or all-gather of data in
 * it reads the peers' buffers directly instead, with no staging: about a third of the
 * memory traffic on the host, and on GPUs no trip through host memory at all. The buffers
 * are host memory the ranks' processes share (peers, from the caller), or device memory
 * that group_share maps into every rank (CUDA IPC: the backend's peer_export and
 * peer_open), where the sums are the backend's sum_ranks: a kernel reading the peers'
 * memory. With bfloat16 staging on a device, each rank rounds its data into a device
 * staging area every rank maps, and the owners sum from those (through host memory, the
 * device rounds what it downloads: half the bytes). The sums are the same, element by
 * element, on every path.
 */
#ifndef DOLLY_COLLECTIVE_H
#define DOLLY_COLLECTIVE_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "error.h"

#define DL_GROUP_SCALARS 8		/* scalars a rank contributes to one group_scalars */
#define DL_GROUP_MAX_RANKS DL_MAX_RANK_SOURCES	/* ranks of a group, at most */
#define DL_GROUP_SHARED 3		/* device allocations a group shares: two, and its staging area */

/* Wait until every rank of the group arrives; nonzero when the group stops instead. */
typedef int (*dl_barrier_fn) (void *arg);

/* Device memory every rank maps (group_share): rank r's copy at at[r], as this rank sees it. */
typedef struct dl_group_region
{
	char	   *at[DL_GROUP_MAX_RANKS];
	size_t		bytes;
} dl_group_region;

typedef struct dl_group
{
	int			rank;
	int			nranks;
	void	   *stage;			/* shared: group_stage_bytes(nranks, chunk) */
	size_t		chunk;			/* floats a rank stages per round (a multiple of 16) */
	int			bf16;			/* reduce-scatter stages gradients as bfloat16 (sums in float32) */
	dl_barrier_fn barrier;
	void	   *barrier_arg;
	uint64_t	rounds;			/* rounds so far: the same on every rank; picks the half */
	float	   *const *peers;	/* optional: every rank's buffer of peer_n floats, mapped here */
	size_t		peer_n;
	float	   *scratch;		/* 2 * chunk floats for the sums (malloc'd on first use) */
	/* optional: told, on the main thread, which way the ranks sum (the caller logs it) */
	void		(*note) (void *arg, const char *msg);
	/*
	 * told by a rank that fails (error: why) or was asked to stop (NULL), before it
	 * releases what the others map (group_unshare waits for them): the others must leave
	 * their barriers now, not when its caller learns of it
	 */
	void		(*stop) (void *arg, const char *error);
	/* set by group_share: the regions every rank maps, and the backend that maps them */
	dl_group_region shared[DL_GROUP_SHARED];
	int			nshared;
	dl_backend *dev_be;			/* the backend of the group's device memory */
	uint16_t   *dev_stage;		/* bf16 on a device: this rank's staging area, shared[last] */
	uint16_t   *dev_scratch;	/* bf16 on a device through host memory: chunk, rounded there */
	int			exported;		/* the peers may have mapped this rank's memory */
	dl_backend *aside_be;		/* a reduce-scatter runs on this backend's second queue */
	uint64_t	unshares;		/* group_unshare's after an export, the same count on every rank */
} dl_group;

/* Bytes of the staging area of a group of nranks with rounds of chunk floats (zeroed by its maker). */
size_t		group_stage_bytes(int nranks, size_t chunk);

/* Elements [*lo, *hi) of n: the part rank owns. */
void		group_part(int nranks, size_t n, int rank, size_t *lo, size_t *hi);

/*
 * Sum n floats over the ranks into their owners: every rank's in holds its n values;
 * out[0 .. hi - lo) gets (or, with accumulate, adds) the sums of this rank's part [lo, hi)
 * (group_part). in and out are in be's memory; out may be in + lo.
 */
dl_status	group_reduce_scatter(dl_group *g, dl_backend *be, const float *in, size_t n,
								 float *out, int accumulate, dl_error *err);

/* Every rank's part of buf (n floats, in be's memory) into every rank's buf. */
dl_status	group_all_gather(dl_group *g, dl_backend *be, float *buf, size_t n, dl_error *err);

/*
 * group_reduce_scatter, left running where it can: on a device whose memory the peers map
 * (group_share), in float32, the sums run on the backend's second queue alongside what the
 * caller queues next, until group_finish (which every collective calls first); elsewhere
 * it is group_reduce_scatter, done when it returns. in must not change, nor out be read,
 * until then.
 */
dl_status	group_reduce_scatter_start(dl_group *g, dl_backend *be, const float *in, size_t n,
									   float *out, int accumulate, dl_error *err);

/* Wait for the reduce-scatter that group_reduce_scatter_start left running, if any. */
dl_status	group_finish(dl_group *g, dl_error *err);

/* buf = the sum over the ranks of buf: a reduce-scatter in place, then an all-gather. */
dl_status	group_all_reduce(dl_group *g, dl_backend *be, float *buf, size_t n, dl_error *err);

/*
 * Every rank's k (<= DL_GROUP_SCALARS) scalars: all[r * k + i] is rank r's mine[i], on
 * every rank (callers sum or take the maximum in rank order).
 */
dl_status	group_scalars(dl_group *g, const double *mine, int k, double *all, dl_error *err);

/*
 * Map n device allocations of every rank (mem[i], bytes[i] from be->alloc, the same sizes
 * on every rank) into every rank, and with bfloat16 staging a device staging area too, so
 * that the sums and gathers of data in them read the peers' memory. Every rank calls it
 * at the same point. When a rank cannot (a backend without peer_export, a handle that
 * does not open), no rank shares anything and the sums go through the staging area, as
 * g->note is told; DL_OK either way, an error only when the group stops or memory runs out.
 */
dl_status	group_share(dl_group *g, dl_backend *be, void *const *mem, const size_t *bytes, int n,
						dl_error *err);

/*
 * Unmap the peers' memory that group_share mapped and free the group's device memory; the
 * ranks may free theirs once it returns: every rank has closed its mappings by then (it
 * waits for them, 30 s at most, as a rank may have died), and every collective
 * ends with a barrier after its last read of the peers' memory.
 */
void		group_unshare(dl_group *g);

/* Free the group's scratch and shares (not the staging area, which its owner maps). */
void		group_release(dl_group *g);

#endif
