/*
 * test_ranks.c: the sums over ranks on the CUDA backend, each rank its own process as in a
 * fine-tuning job, their device memory mapped into each other through CUDA IPC
 * (collective.c's group_share): an all-reduce (its sums on the second stream, left running
 * until the all-gather), and a reduce-scatter of a span with bfloat16 rounded on the
 * device, both equal bit for bit to the host's rank-order sums, with two ranks and with four (on the emulator's two GPUs: two ranks a GPU; on one GPU:
 * all on it). The parent never touches CUDA, which does not survive fork: every rank
 * loads the plugin ($DOLLY_CUDA_PLUGIN, default ./dolly_cuda.so) itself; it SKIPs when a
 * rank finds no plugin or no GPU. The same sums through host memory, with the backend's
 * peer_export taken away: the same bits (the bfloat16 rounded on the device there too).
 */
#include "harness.h"
#include "../../src/engine/backend.h"
#include "../../src/engine/bf16.h"
#include "../../src/engine/collective.h"
#include "../../src/engine/cuda_plugin.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define NMAX 4
#define NMAX_FLOATS 30011
#define CHUNK (16 * 4 * 3)		/* small: many rounds, parts ending mid-round */

/* What the ranks share: a barrier, the staging area, and what each rank got. */
typedef struct shared
{
	atomic_int	arrived;
	atomic_uint generation;
	atomic_int	stop;			/* a rank failed: the others leave their barrier */
	int			nranks;
	size_t		n;
	size_t		first;			/* the reduce-scatter's span */
	size_t		count;
	int			skipped;		/* a rank found no plugin or no GPU */
	int			ipc;			/* the ranks may map each other's memory */
	int			told_shared;	/* rank 0 was told that the ranks read each other's memory */
	int			told_host;		/* rank 0 was told that they sum through host memory */
	char		why[NMAX][DL_ERRMSG_LEN + 32];
	float		all[NMAX][NMAX_FLOATS];	/* each rank's all-reduce */
	float		part[NMAX][NMAX_FLOATS];	/* its part of the span, accumulated onto 1.0 */
	_Alignas(64) char stage[];
} shared;

static int
barrier(void *p)
{
	shared	   *sh = p;
	unsigned	gen = atomic_load(&sh->generation);

	if (atomic_fetch_add(&sh->arrived, 1) == sh->nranks - 1)
	{
		atomic_store(&sh->arrived, 0);
		atomic_fetch_add(&sh->generation, 1);
	}
	else
		while (atomic_load(&sh->generation) == gen && !atomic_load(&sh->stop))
			usleep(50);
	return atomic_load(&sh->stop);
}

static void
note(void *p, const char *msg)
{
	shared	   *sh = p;

	if (strstr(msg, "each reading the others' memory directly"))
		sh->told_shared = 1;
	if (strstr(msg, "the ranks sum through host memory"))
		sh->told_host = 1;
}

/* Rank r's input element i. */
static float
input(int r, size_t i)
{
	return (float) ((i * 2654435761u + r * 40503u) % 10007) / 997.0f - 5.0f;
}

/* One rank's run, in its own process; fills sh->why on failure. */
static dl_status
rank_run(shared *sh, int rank, dl_backend *be)
{
	dl_group	g = {.rank = rank, .nranks = sh->nranks, .stage = sh->stage, .chunk = CHUNK,
	.bf16 = 1, .barrier = barrier, .barrier_arg = sh, .note = note};
	size_t		n = sh->n,
				lo,
				hi;
	float	   *host = malloc(n * sizeof(float)),
			   *in = be->alloc(be, n * sizeof(float), NULL),
			   *out = be->alloc(be, n * sizeof(float), NULL),
			   *part = be->alloc(be, n * sizeof(float), NULL);
	void	   *mem[2] = {in, out};
	size_t		bytes[2] = {n * sizeof(float), n * sizeof(float)};
	dl_error	err = {0};
	dl_status	st = host && in && out && part ? DL_OK : dl_fail(&err, DL_ENOMEM, "out of memory");

	for (size_t i = 0; st == DL_OK && i < n; i++)
		host[i] = input(rank, i);
	group_part(sh->nranks, sh->count, rank, &lo, &hi);
	if (st == DL_OK &&
		(st = be->upload(be, in, host, n * sizeof(float), &err)) == DL_OK &&
		(st = be->upload(be, out, host, n * sizeof(float), &err)) == DL_OK)
	{
		for (size_t i = 0; i < hi - lo; i++)
			host[i] = 1.0f;
		st = be->upload(be, part, host, (hi - lo) * sizeof(float), &err);
	}
	/*
	 * the device staging area of bfloat16 is made with the shares; the all-reduce is
	 * float32, its reduce-scatter left running on the second stream until the all-gather
	 */
	if (st == DL_OK && (st = group_share(&g, be, mem, bytes, 2, &err)) == DL_OK)
	{
		size_t		mine_lo,
					mine_hi;

		g.bf16 = 0;
		group_part(sh->nranks, n, rank, &mine_lo, &mine_hi);
		if ((st = group_reduce_scatter_start(&g, be, out, n, out + mine_lo, 0, &err)) == DL_OK)
			st = group_all_gather(&g, be, out, n, &err);
		g.bf16 = 1;
	}
	if (st == DL_OK)
		st = group_reduce_scatter(&g, be, in + sh->first, sh->count, part, 1, &err);
	if (st == DL_OK &&
		(st = be->download(be, sh->all[rank], out, n * sizeof(float), &err)) == DL_OK)
		st = be->download(be, sh->part[rank], part, (hi - lo) * sizeof(float), &err);
	if (st != DL_OK)
	{
		snprintf(sh->why[rank], sizeof(sh->why[rank]), "rank %d: %s", rank, err.msg);
		atomic_store(&sh->stop, 1);
	}
	group_release(&g);
	be->free(be, in);
	be->free(be, out);
	be->free(be, part);
	free(host);
	return st;
}

/* A rank's process: its own plugin and backend, on GPU rank mod the GPUs. */
static void
rank_main(shared *sh, int rank)
{
	const char *path = getenv("DOLLY_CUDA_PLUGIN");
	const dl_cuda_plugin *plugin;
	dl_gpu_info gpus[DL_MAX_GPUS];
	int			ngpus = 0;
	dl_backend *be = NULL;
	dl_error	err;
	dl_status	st;

	if (cuda_plugin_load(path ? path : "./dolly_cuda.so", &plugin, &err) != DL_OK ||
		plugin->probe(gpus, DL_MAX_GPUS, &ngpus, &err) != DL_OK || ngpus < 1 ||
		plugin->create(rank % ngpus, DL_CUDA_FP32, &be, &err) != DL_OK)
	{
		snprintf(sh->why[rank], sizeof(sh->why[rank]), "%s", ngpus < 1 ? "no GPU" : err.msg);
		sh->skipped = 1;
		atomic_store(&sh->stop, 1);
		_exit(0);
	}
	if (!sh->ipc)
		be->peer_export = NULL;
	st = rank_run(sh, rank, be);
	be->destroy(be);
	_exit(st == DL_OK ? 0 : 1);
}

/* The rank-order sum of element i (bf16: of the rounded values). */
static float
expected(const shared *sh, size_t i, int bf16)
{
	float		s = 0;

	for (int r = 0; r < sh->nranks; r++)
	{
		float		v = bf16 ? bf16_to_float(float_to_bf16(input(r, i))) : input(r, i);

		s = r ? s + v : v;
	}
	return s;
}

/* Two and four ranks, sizes that do not divide into them or the rounds, in sh's memory. */
static void
check_ranks(int *failed_, shared *sh, size_t bytes, int ipc)
{
	static const size_t sizes[] = {7, 1000, NMAX_FLOATS};

	for (int nranks = 2; nranks <= NMAX; nranks += 2)
		for (int k = 0; k < 3; k++)
		{
			pid_t		pids[NMAX];
			int			failed = 0;

			memset(sh, 0, bytes);
			sh->ipc = ipc;
			sh->nranks = nranks;
			sh->n = sizes[k];
			sh->first = sh->n / 3;
			sh->count = sh->n - sh->n / 3 - sh->n / 5;
			for (int r = 0; r < nranks; r++)
				if ((pids[r] = fork()) == 0)
					rank_main(sh, r);
			for (int r = 0; r < nranks; r++)
			{
				int			status;

				waitpid(pids[r], &status, 0);
				if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
				{
					failed = 1;
					atomic_store(&sh->stop, 1);
				}
			}
			if (sh->skipped)
				SKIP("%s", sh->why[0][0] ? sh->why[0] : sh->why[1]);
			for (int r = 0; r < nranks; r++)
				CHECKF(!failed && !sh->why[r][0], "%d ranks, n %zu: %s", nranks, sh->n, sh->why[r]);
			CHECKF(ipc ? sh->told_shared : sh->told_host, "%d ranks: not told that they sum %s", nranks,
				   ipc ? "reading each other's memory" : "through host memory");
			for (int r = 0; r < nranks; r++)
			{
				size_t		lo,
							hi;

				for (size_t i = 0; i < sh->n; i++)
					CHECKF(sh->all[r][i] == expected(sh, i, 0), "%d ranks, n %zu: rank %d element %zu: %g, not %g",
						   nranks, sh->n, r, i, sh->all[r][i], expected(sh, i, 0));
				group_part(nranks, sh->count, r, &lo, &hi);
				for (size_t i = lo; i < hi; i++)
				{
					float		want = 1.0f + expected(sh, sh->first + i, 1);

					CHECKF(sh->part[r][i - lo] == want, "%d ranks, n %zu, bf16: rank %d element %zu: %g, not %g",
						   nranks, sh->n, r, i, sh->part[r][i - lo], want);
				}
			}
		}
}

TEST(ranks_sum_bit_for_bit_through_ipc_and_host_memory)
{
	size_t		bytes = sizeof(shared) + group_stage_bytes(NMAX, CHUNK);
	shared	   *sh = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	CHECK(sh != MAP_FAILED);
	for (int ipc = 1; ipc >= 0 && *failed_ == 0; ipc--)
		check_ranks(failed_, sh, bytes, ipc);
	munmap(sh, bytes);
}
