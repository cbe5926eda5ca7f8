/*
 * bench_allreduce.c: the all-reduce of data-parallel fine-tuning alone (collective.h), on
 * the CPU, against memcpy in the same run. Ranks are forked processes, as the job's
 * workers are, sharing a staging area of the job's size (1M floats a rank a round) and a
 * process-shared barrier; each all-reduces its own buffer of S bytes (distinct values per
 * rank), private and staged, or in memory all ranks map (peers, as the job's CPU ranks'
 * gradients are). Prints, per rank count and size, the best of 3 runs as S / time, and
 * memcpy's S / time for the same S (one process copying one buffer into another), and the
 * ratios.
 *
 * With --step-model DIR (a model made by dolly-cli init), also the training step: tokens/s
 * of 2 ranks (a thread each, ZeRO stages 0, 1, 2) against 1 rank of 2 threads on the same
 * global batches of random tokens (8 examples of 256 tokens, 4 steps).
 *
 *   build/bench-allreduce [--ranks 2,4] [--mb 64,256,1024] [--bf16] [--step-model DIR]
 */
#include "backend.h"
#include "collective.h"
#include "sampler.h"
#include "sysinfo.h"
#include "train.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHUNK (1 << 20)
#define REPEAT 3

typedef struct shared
{
	pthread_barrier_t barrier;
	double		seconds[16][REPEAT];
	double		tokens_per_second;	/* the step benchmark's rank 0 */
} shared;

#define STEP_EXAMPLES 32
#define STEP_TOKENS 256
#define STEP_BATCH 8

static int
barrier(void *arg)
{
	pthread_barrier_wait(&((shared *) arg)->barrier);
	return 0;
}

/* One rank: fill its buffer, then REPEAT timed all-reduces between barriers. */
static int
rank_main(shared *sh, void *stage, float *peer_mem, int rank, int nranks, size_t n, int bf16)
{
	dl_backend *be;
	dl_error	err;
	float	   *peers[16];
	dl_group	g = {.rank = rank, .nranks = nranks, .stage = stage, .chunk = CHUNK, .bf16 = bf16,
	.barrier = barrier, .barrier_arg = sh, .peers = peer_mem ? peers : NULL, .peer_n = n};
	float	   *buf = peer_mem ? peer_mem + (size_t) rank * n : malloc(n * sizeof(float));

	for (int r = 0; r < nranks && peer_mem; r++)
		peers[r] = peer_mem + (size_t) r * n;
	if (buf == NULL || backend_cpu_create(1, 0, &be, &err) != DL_OK)
		return 1;
	for (size_t i = 0; i < n; i++)
		buf[i] = (float) (i % 1000) * 1e-3f + rank;
	for (int k = 0; k < REPEAT; k++)
	{
		double		t0;

		pthread_barrier_wait(&sh->barrier);
		t0 = sys_now_s();
		if (group_all_reduce(&g, be, buf, n, &err) != DL_OK)
		{
			fprintf(stderr, "rank %d: %s\n", rank, err.msg);
			return 1;
		}
		pthread_barrier_wait(&sh->barrier);
		sh->seconds[rank][k] = sys_now_s() - t0;
	}
	group_release(&g);
	be->destroy(be);
	if (peer_mem == NULL)
		free(buf);
	return 0;
}

/* The best of REPEAT all-reduces of n floats over nranks processes, in seconds. */
static double
allreduce_s(int nranks, size_t n, int bf16, int peers)
{
	shared	   *sh = mmap(NULL, sizeof(shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	size_t		stage_bytes = group_stage_bytes(nranks, CHUNK),
				peer_bytes = peers ? (size_t) nranks * n * sizeof(float) : 0;
	void	   *stage = mmap(NULL, stage_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	float	   *peer_mem = peers ? mmap(NULL, peer_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0) : NULL;
	pthread_barrierattr_t attr;
	double		best = 1e30;
	int			failed = 0;

	if (sh == MAP_FAILED || stage == MAP_FAILED || peer_mem == MAP_FAILED)
		return -1;
	pthread_barrierattr_init(&attr);
	pthread_barrierattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
	pthread_barrier_init(&sh->barrier, &attr, nranks);
	for (int r = 0; r < nranks; r++)
		if (fork() == 0)
			_exit(rank_main(sh, stage, peer_mem, r, nranks, n, bf16));
	for (int r = 0; r < nranks; r++)
	{
		int			status;

		wait(&status);
		failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
	}
	for (int k = 0; k < REPEAT && !failed; k++)
	{
		double		slowest = 0;

		for (int r = 0; r < nranks; r++)
			slowest = sh->seconds[r][k] > slowest ? sh->seconds[r][k] : slowest;
		best = slowest < best ? slowest : best;
	}
	pthread_barrier_destroy(&sh->barrier);
	munmap(stage, stage_bytes);
	if (peer_mem)
		munmap(peer_mem, peer_bytes);
	munmap(sh, sizeof(shared));
	return failed ? -1 : best;
}

/* The best of REPEAT memcpys of n floats, in seconds. */
static double
memcpy_s(size_t n)
{
	float	   *a = malloc(n * sizeof(float)),
			   *b = malloc(n * sizeof(float));
	double		best = 1e30;

	if (a == NULL || b == NULL)
		return -1;
	memset(a, 1, n * sizeof(float));
	memset(b, 2, n * sizeof(float));
	for (int k = 0; k < REPEAT; k++)
	{
		double		t0 = sys_now_s();

		memcpy(b, a, n * sizeof(float));
		t0 = sys_now_s() - t0;
		best = t0 < best ? t0 : best;
	}
	free(a);
	free(b);
	return best;
}

/*
 * One rank of the step benchmark: the model from dir on threads CPU threads, the same
 * random examples as every rank, one epoch; rank 0 reports the training tokens/s.
 */
static int
step_rank(shared *sh, void *stage, float *peer_mem, size_t peer_n, const char *dir, int rank,
		  int nranks, int threads, int zero_stage)
{
	dl_backend *be;
	dl_model   *m;
	dl_error	err;
	dl_example	ex[STEP_EXAMPLES];
	int32_t		ids[STEP_EXAMPLES][STEP_TOKENS];
	float	   *peers[16];
	dl_group	g = {.rank = rank, .nranks = nranks, .stage = stage, .chunk = CHUNK,
	.barrier = barrier, .barrier_arg = sh, .peers = peer_mem ? peers : NULL, .peer_n = peer_n};
	dl_finetune_opts o;
	dl_train_progress last;
	dl_rng		rng;

	for (int r = 0; r < nranks && peer_mem; r++)
		peers[r] = peer_mem + (size_t) r * peer_n;
	if (backend_cpu_create(threads, 0, &be, &err) != DL_OK || dl_model_load(dir, be, &m, &err) != DL_OK)
	{
		fprintf(stderr, "rank %d: %s\n", rank, err.msg);
		return 1;
	}
	rng_seed(&rng, 7);
	for (int i = 0; i < STEP_EXAMPLES; i++)
	{
		for (int t = 0; t < STEP_TOKENS; t++)
			ids[i][t] = (int32_t) (rng_next(&rng) % (uint64_t) m->cfg.vocab_size);
		ex[i] = (dl_example) {ids[i], STEP_TOKENS, STEP_TOKENS / 2};
	}
	memset(&o, 0, sizeof(o));
	train_defaults(&o.cfg);
	o.cfg.warmup_steps = 0;
	o.cfg.max_tokens = STEP_TOKENS * STEP_BATCH;
	o.epochs = 1;
	o.batch_size = STEP_BATCH;
	o.rank = rank;
	o.nranks = nranks;
	o.group = nranks > 1 ? &g : NULL;
	o.zero_stage = zero_stage;
	if (finetune_run(m, ex, STEP_EXAMPLES, NULL, 0, &o, &last, &err) != DL_OK)
	{
		fprintf(stderr, "rank %d: %s\n", rank, err.msg);
		return 1;
	}
	if (rank == 0)
		sh->tokens_per_second = last.tokens_per_second;
	group_release(&g);
	dl_model_free(m);
	be->destroy(be);
	return 0;
}

/* Training tokens/s of nranks ranks sharing `threads` CPU threads; -1 on failure. */
static double
step_tps(const char *dir, int nranks, int threads, int zero_stage, size_t param_bytes)
{
	shared	   *sh = mmap(NULL, sizeof(shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	size_t		stage_bytes = group_stage_bytes(nranks, CHUNK),
				peer_n = zero_stage < 2 ? param_bytes / sizeof(float) : 0,
				peer_bytes = nranks * peer_n * sizeof(float);
	void	   *stage = mmap(NULL, stage_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	float	   *peer_mem = peer_n ? mmap(NULL, peer_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0) : NULL;
	pthread_barrierattr_t attr;
	int			failed = 0;
	double		tps;

	if (sh == MAP_FAILED || stage == MAP_FAILED || peer_mem == MAP_FAILED)
		return -1;
	pthread_barrierattr_init(&attr);
	pthread_barrierattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
	pthread_barrier_init(&sh->barrier, &attr, nranks);
	for (int r = 0; r < nranks; r++)
		if (fork() == 0)
			_exit(step_rank(sh, stage, peer_mem, peer_n, dir, r, nranks, threads / nranks, zero_stage));
	for (int r = 0; r < nranks; r++)
	{
		int			status;

		wait(&status);
		failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
	}
	tps = failed ? -1 : sh->tokens_per_second;
	pthread_barrier_destroy(&sh->barrier);
	munmap(stage, stage_bytes);
	if (peer_mem)
		munmap(peer_mem, peer_bytes);
	munmap(sh, sizeof(shared));
	return tps;
}

/* The step benchmark: 1 rank of 2 threads against 2 ranks of 1 thread at each stage. */
static int
bench_steps(const char *dir)
{
	dl_backend *be;
	dl_model   *m;
	dl_error	err;
	size_t		param_bytes;
	double		one;

	if (backend_cpu_create(1, 0, &be, &err) != DL_OK || dl_model_load(dir, be, &m, &err) != DL_OK)
	{
		fprintf(stderr, "bench-allreduce: %s\n", err.msg);
		return 1;
	}
	param_bytes = m->param_bytes;
	printf("\ntraining step, %s (%.1fM parameters), %d examples of %d tokens, batches of %d:\n\n"
		   "| ranks | ZeRO stage | training tokens/s | against 1 rank |\n|---|---|---|---|\n",
		   dir, dl_model_param_count(m) / 1e6, STEP_EXAMPLES, STEP_TOKENS, STEP_BATCH);
	dl_model_free(m);
	be->destroy(be);
	one = step_tps(dir, 1, 2, 0, param_bytes);
	if (one <= 0)
		return 1;
	printf("| 1 (2 threads) | - | %.0f | 1.00 |\n", one);
	for (int stage = 0; stage <= 2; stage++)
	{
		double		two = step_tps(dir, 2, 2, stage, param_bytes);

		if (two <= 0)
			return 1;
		printf("| 2 (a thread each) | %d | %.0f | %.2f |\n", stage, two, two / one);
		fflush(stdout);
	}
	return 0;
}

/* A comma-separated list of ints into v (at most max); returns how many. */
static int
parse_list(const char *s, int *v, int max)
{
	int			n = 0;

	while (*s && n < max)
	{
		v[n++] = atoi(s);
		s = strchr(s, ',');
		if (s == NULL)
			break;
		s++;
	}
	return n;
}

int
main(int argc, char **argv)
{
	const char *step_model = NULL;
	int			ranks[8] = {2, 4},
				mb[8] = {64, 256, 1024},
				nr = 2,
				nm = 3,
				bf16 = 0;

	for (int i = 1; i < argc; i++)
	{
		if (strcmp(argv[i], "--ranks") == 0 && i + 1 < argc)
			nr = parse_list(argv[++i], ranks, 8);
		else if (strcmp(argv[i], "--mb") == 0 && i + 1 < argc)
			nm = parse_list(argv[++i], mb, 8);
		else if (strcmp(argv[i], "--bf16") == 0)
			bf16 = 1;
		else if (strcmp(argv[i], "--step-model") == 0 && i + 1 < argc)
			step_model = argv[++i];
		else
		{
			fprintf(stderr, "usage: bench-allreduce [--ranks 2,4] [--mb 64,256,1024] [--bf16] [--step-model DIR]\n");
			return 2;
		}
	}
	printf("| ranks | buffer | staged | from the peers' buffers | memcpy | ratios |\n|---|---|---|---|---|---|\n");
	for (int j = 0; j < nm; j++)
	{
		size_t		n = (size_t) mb[j] * 1048576 / sizeof(float);
		double		copy = memcpy_s(n);

		for (int i = 0; i < nr; i++)
		{
			int			ok = ranks[i] >= 2 && ranks[i] <= 16;
			double		t = ok ? allreduce_s(ranks[i], n, bf16, 0) : -1,
						tp = ok ? allreduce_s(ranks[i], n, bf16, 1) : -1;

			if (t < 0 || tp < 0 || copy < 0)
			{
				fprintf(stderr, "bench-allreduce: %d ranks, %d MB failed\n", ranks[i], mb[j]);
				return 1;
			}
			printf("| %d%s | %d MB | %.2f GB/s | %.2f GB/s | %.2f GB/s | %.2f, %.2f |\n", ranks[i],
				   bf16 ? " (bf16)" : "", mb[j], mb[j] / 1024.0 / t, mb[j] / 1024.0 / tp,
				   mb[j] / 1024.0 / copy, copy / t, copy / tp);
			fflush(stdout);
		}
	}
	return step_model ? bench_steps(step_model) : 0;
}
