/*
 * test_collective.c: reduce-scatter, all-gather, all-reduce and scalars over ranks in
 * threads: every rank gets the sums in rank order bit for bit, for sizes that do not
 * divide into the ranks or the rounds, for a span of an array, with bfloat16 staging, and
 * reading the peers' buffers directly (threads share them as the job's processes do);
 * a rank whose barrier reports a stopped group gets DL_ECANCELLED. A "device" backend (the
 * CPU's operations, its memory taken for a device's, handles that are the pointers) runs
 * the device paths of group_share: sums and gathers from the peers' mapped memory,
 * bfloat16 rounded into a staging area every rank maps, a reduce-scatter left running on
 * a second queue until the next collective; a rank whose peer_open fails sends every rank
 * through the staging area; every mapping is closed.
 */
#include "harness.h"
#include "backend.h"
#include "bf16.h"
#include "collective.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define NMAX 4
#define CHUNK (16 * 4 * 3)		/* small: many rounds, slices ending mid-round */

typedef struct shared
{
	pthread_barrier_t barrier;
	void	   *stage;
	int			nranks;
	int			bf16;
	size_t		n;
	size_t		first;			/* the reduce-scatter's span */
	size_t		count;
	float	   *in[NMAX];		/* each rank's data */
	float	   *out[NMAX];		/* all-reduce results */
	float	   *part[NMAX];		/* the span's reduce-scatter, accumulated onto 1.0 */
	double		scal[NMAX][2 * NMAX];
	int			stop;			/* the barrier reports a stopped group */
	int			peers;			/* the ranks read each other's: 0 no, 1 out buffers, 2 in buffers */
	int			device;			/* group_share of in and out on the "device" backend */
	int			refuse_rank;	/* with device: this rank's peer_open fails (-1: none) */
	int			shared_ranks;	/* ranks told that the sums read device memory */
	int			host_ranks;		/* ranks told that the sums go through host memory */
	int			refusals;		/* ranks told that they could not map the others' memory */
} shared;

typedef struct arg
{
	shared	   *sh;
	int			rank;
	dl_backend *be;
	dl_status	st;
	dl_error	err;
	int			open_after;		/* mappings open over every rank when its release returned */
} arg;

static int
barrier(void *p)
{
	shared	   *sh = p;

	pthread_barrier_wait(&sh->barrier);
	return sh->stop;
}

/*
 * A rank's "device": the CPU backend's table with memory that is not the host's, whose
 * sums "aside" are done only when waited for, as a second queue may do them that late.
 */
typedef struct device
{
	dl_backend	be;
	int			refuse;			/* peer_open fails */
	int			pending;		/* a sum aside waits for sum_ranks_wait: */
	float	   *out;
	const void *src[NMAX];
	int			nsrc;
	size_t		n;
	int			bf16;
	int			accumulate;
} device;

static int	opened;				/* mappings open over every device */
static pthread_mutex_t opened_lock = PTHREAD_MUTEX_INITIALIZER;

static dl_status
fake_export(dl_backend *be, void *mem, dl_peer_handle *h, dl_error *err)
{
	memset(h, 0, sizeof(*h));
	memcpy(h->bytes, &mem, sizeof(mem));
	return DL_OK;
}

static dl_status
fake_open(dl_backend *be, const dl_peer_handle *h, void **mem, dl_error *err)
{
	if (((device *) be)->refuse)
		return dl_fail(err, DL_EUNSUPPORTED, "refused on purpose");
	memcpy(mem, h->bytes, sizeof(*mem));
	pthread_mutex_lock(&opened_lock);
	opened++;
	pthread_mutex_unlock(&opened_lock);
	return DL_OK;
}

static void
fake_close(dl_backend *be, void *mem)
{
	pthread_mutex_lock(&opened_lock);
	opened--;
	pthread_mutex_unlock(&opened_lock);
}

static void
fake_aside(dl_backend *be, float *out, const void *const *src, int nsrc, size_t n, int bf16,
		   int accumulate)
{
	device	   *d = (device *) be;

	*d = (device) {.be = d->be, .refuse = d->refuse, .pending = 1, .out = out, .nsrc = nsrc,
	.n = n, .bf16 = bf16, .accumulate = accumulate};
	memcpy(d->src, src, nsrc * sizeof(*src));
}

static dl_status
fake_wait(dl_backend *be, dl_error *err)
{
	device	   *d = (device *) be;

	if (d->pending)
		be->sum_ranks(be, d->out, d->src, d->nsrc, d->n, d->bf16, d->accumulate);
	d->pending = 0;
	return DL_OK;
}

/* What group_share tells a rank: count which way the sums go. */
static void
count_note(void *p, const char *msg)
{
	shared	   *sh = p;

	pthread_mutex_lock(&opened_lock);
	if (strstr(msg, "each reading the others' memory"))
		sh->shared_ranks++;
	else if (strstr(msg, "through host memory"))
		sh->host_ranks++;
	else if (strstr(msg, "cannot map the other ranks' device memory: refused on purpose"))
		sh->refusals++;
	pthread_mutex_unlock(&opened_lock);
}

static void *
rank_main(void *p)
{
	arg		   *a = p;
	shared	   *sh = a->sh;
	dl_group	g = {.rank = a->rank, .nranks = sh->nranks, .stage = sh->stage, .chunk = CHUNK,
	.bf16 = 0, .barrier = barrier, .barrier_arg = sh,
	.peers = sh->peers == 1 ? sh->out : sh->peers == 2 ? sh->in : NULL, .peer_n = sh->n};
	double		mine[2] = {a->rank + 0.5, -a->rank};
	size_t		lo,
				hi;
	device		dev = {.be = *a->be, .refuse = a->rank == sh->refuse_rank};
	dl_backend *be = a->be;
	float	   *saved;

	if (sh->device)
	{
		void	   *mem[2] = {sh->in[a->rank], sh->out[a->rank]};
		size_t		bytes[2] = {sh->n * sizeof(float), sh->n * sizeof(float)};

		be = &dev.be;
		be->host_memory = 0;
		be->peer_export = fake_export;
		be->peer_open = fake_open;
		be->peer_close = fake_close;
		be->sum_ranks_aside = fake_aside;
		be->sum_ranks_wait = fake_wait;
		g.note = count_note;
		g.bf16 = sh->bf16;		/* the device staging area is made with the shares */
		a->st = group_share(&g, be, mem, bytes, 2, &a->err);
		g.bf16 = 0;
		if (a->st != DL_OK)
			return NULL;
	}
	memcpy(sh->out[a->rank], sh->in[a->rank], sh->n * sizeof(float));
	a->st = group_all_reduce(&g, be, sh->out[a->rank], sh->n, &a->err);
	if (a->st == DL_OK)
		a->st = group_scalars(&g, mine, 2, sh->scal[a->rank], &a->err);
	group_part(sh->nranks, sh->count, a->rank, &lo, &hi);
	for (size_t i = 0; i < hi - lo; i++)
		sh->part[a->rank][i] = 1.0f;
	g.bf16 = sh->bf16;
	/* on the device, left running (float32) until the next collective's group_finish */
	if (a->st == DL_OK)
		a->st = group_reduce_scatter_start(&g, be, sh->in[a->rank] + sh->first, sh->count,
										   sh->part[a->rank], 1, &a->err);
	if (a->st == DL_OK)
		a->st = group_scalars(&g, mine, 2, sh->scal[a->rank], &a->err);
	/* the scalars waited for every rank's sums: this rank's input may change now */
	saved = malloc(sh->n * sizeof(float));
	memcpy(saved, sh->in[a->rank], sh->n * sizeof(float));
	for (size_t i = 0; i < sh->n; i++)
		sh->in[a->rank][i] = NAN;
	group_release(&g);
	memcpy(sh->in[a->rank], saved, sh->n * sizeof(float));
	free(saved);
	pthread_mutex_lock(&opened_lock);
	a->open_after = opened;
	pthread_mutex_unlock(&opened_lock);
	return NULL;
}

/* Run nranks threads over n random floats each; 0 when every rank succeeded. */
static int
run(shared *sh, arg *a, dl_backend *be)
{
	pthread_t	th[NMAX];
	int			failed = 0;

	sh->stage = calloc(1, group_stage_bytes(sh->nranks, CHUNK));
	pthread_barrier_init(&sh->barrier, NULL, sh->nranks);
	for (int r = 0; r < sh->nranks; r++)
	{
		sh->in[r] = malloc(sh->n * sizeof(float));
		sh->out[r] = malloc(sh->n * sizeof(float));
		sh->part[r] = malloc((sh->n / sh->nranks + 1) * sizeof(float));
		for (size_t i = 0; i < sh->n; i++)
			sh->in[r][i] = (float) ((i * 2654435761u + r * 40503u) % 10007) / 997.0f - 5.0f;
		a[r] = (arg) {.sh = sh, .rank = r, .be = be};
	}
	for (int r = 0; r < sh->nranks; r++)
		pthread_create(&th[r], NULL, rank_main, &a[r]);
	for (int r = 0; r < sh->nranks; r++)
	{
		pthread_join(th[r], NULL);
		failed |= a[r].st != DL_OK;
	}
	pthread_barrier_destroy(&sh->barrier);
	free(sh->stage);
	return failed;
}

static void
run_free(shared *sh)
{
	for (int r = 0; r < sh->nranks; r++)
	{
		free(sh->in[r]);
		free(sh->out[r]);
		free(sh->part[r]);
	}
}

/* The rank-order sum of element i, as the group must compute it (bf16: of the staged values). */
static float
expected(const shared *sh, size_t i, int bf16)
{
	float		s = 0;

	for (int r = 0; r < sh->nranks; r++)
	{
		float		v = bf16 ? bf16_to_float(float_to_bf16(sh->in[r][i])) : sh->in[r][i];

		s = r ? s + v : v;
	}
	return s;
}

TEST(collective_sums_in_rank_order)
{
	dl_backend *be;
	dl_error	err;
	static const size_t sizes[] = {1, 7, 1000, 100003};

	CHECK_OK(backend_cpu_create(1, 0, &be, &err), &err);
	for (int nranks = 1; nranks <= NMAX; nranks++)
		for (int k = 0; k < 4; k++)
			for (int mode = 0; mode < 9; mode++)
			{
				/* 0-2: peers none, out, in; 3: in; 4: bf16; 5-8: device, bf16, refused */
				int			bf16 = mode == 4 || mode == 6 || mode == 8;
				shared		sh = {.nranks = nranks, .bf16 = bf16, .n = sizes[k],
					.peers = mode < 5 ? mode % 3 : 0, .device = mode >= 5,
				.refuse_rank = mode >= 7 ? nranks - 1 : -1};
				arg			a[NMAX];

				/* a span that starts and ends inside slices */
				sh.first = sh.n / 3;
				sh.count = sh.n - sh.n / 3 - sh.n / 5;
				CHECKF(run(&sh, a, be) == 0, "%d ranks, n %zu: %s", nranks, sh.n, a[0].err.msg);
				for (int r = 0; r < nranks; r++)
				{
					size_t		lo,
								hi;

					for (size_t i = 0; i < sh.n; i++)
						CHECKF(sh.out[r][i] == expected(&sh, i, 0), "%d ranks, n %zu: rank %d element %zu: %g, not %g",
							   nranks, sh.n, r, i, sh.out[r][i], expected(&sh, i, 0));
					for (int q = 0; q < nranks; q++)
						CHECK(sh.scal[r][2 * q] == q + 0.5 && sh.scal[r][2 * q + 1] == -q);
					group_part(nranks, sh.count, r, &lo, &hi);
					for (size_t i = lo; i < hi; i++)
					{
						float		want = 1.0f + expected(&sh, sh.first + i, bf16);

						CHECKF(sh.part[r][i - lo] == want, "%d ranks, n %zu, mode %d: rank %d element %zu: %g, not %g",
							   nranks, sh.n, mode, r, i, sh.part[r][i - lo], want);
					}
				}
				CHECKF(opened == 0, "mode %d: %d mappings left open", mode, opened);
				/* a rank may free its memory once its release returns: no peer maps it then */
				for (int r = 0; r < nranks; r++)
					CHECKF(a[r].open_after == 0, "mode %d: rank %d released with %d mappings still open",
						   mode, r, a[r].open_after);
				/* rank 0 tells the way; one rank alone opens nothing, so is never refused */
				if (sh.device)
				{
					int			refused = mode >= 7 && nranks > 1;

					CHECKF(sh.shared_ranks == !refused && sh.host_ranks == refused && sh.refusals == refused,
						   "mode %d, %d ranks: told %d shared, %d host, %d refusals", mode, nranks,
						   sh.shared_ranks, sh.host_ranks, sh.refusals);
				}
				run_free(&sh);
			}
	be->destroy(be);
}

TEST(collective_stops_with_the_group)
{
	dl_backend *be;
	dl_error	err;
	shared		sh = {.nranks = 2, .n = 1000, .stop = 1};
	arg			a[NMAX];

	CHECK_OK(backend_cpu_create(1, 0, &be, &err), &err);
	CHECK(run(&sh, a, be) != 0);
	for (int r = 0; r < 2; r++)
		CHECKF(a[r].st == DL_ECANCELLED, "rank %d: %d %s", r, a[r].st, a[r].err.msg);
	run_free(&sh);
	be->destroy(be);
}
