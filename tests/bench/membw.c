/*
 * membw.c: memory bandwidth as memcpy sees it on a buffer far larger than the caches,
 * for the decode ceiling in tests/bench/bench_engine.py (decode reads every weight once
 * per step, so it cannot beat bandwidth / bytes read per step).
 *
 *   membw MEGABYTES THREADS
 *
 * Each thread copies its own slice of a MEGABYTES source into a destination of the same
 * size; best of 5 rounds after one that faults the pages in. Counts bytes read plus
 * bytes written, as STREAM's Copy does:
 *   memcpy_gbs=... megabytes=... threads=...
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ROUNDS 5

typedef struct slice
{
	char	   *dst;
	const char *src;
	size_t		len;
} slice;

/* Monotonic seconds. */
static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Thread body: copy one slice. */
static void *
copy_slice(void *arg)
{
	slice	   *s = arg;

	memcpy(s->dst, s->src, s->len);
	return NULL;
}

int
main(int argc, char **argv)
{
	size_t		mb,
				bytes;
	int			threads;
	char	   *src,
			   *dst;
	double		best = 1e30;

	if (argc != 3 || atol(argv[1]) < 1 || (threads = atoi(argv[2])) < 1 || threads > 256)
	{
		fprintf(stderr, "usage: membw MEGABYTES THREADS\n");
		return 2;
	}
	mb = (size_t) atol(argv[1]);
	bytes = mb << 20;
	src = malloc(bytes);
	dst = malloc(bytes);
	if (src == NULL || dst == NULL)
	{
		fprintf(stderr, "membw: cannot allocate 2 x %zu MB\n", mb);
		return 1;
	}
	memset(src, 1, bytes);

	for (int r = 0; r <= ROUNDS; r++)
	{
		pthread_t	tid[256];
		slice		sl[256];
		size_t		per = bytes / threads;
		double		t = now_s();

		for (int i = 0; i < threads; i++)
		{
			size_t		len = i == threads - 1 ? bytes - i * per : per;

			sl[i] = (slice) {dst + i * per, src + i * per, len};
			if (pthread_create(&tid[i], NULL, copy_slice, &sl[i]) != 0)
			{
				fprintf(stderr, "membw: cannot start thread %d\n", i);
				return 1;
			}
		}
		for (int i = 0; i < threads; i++)
			pthread_join(tid[i], NULL);
		t = now_s() - t;
		if (r > 0 && t < best)
			best = t;
	}
	printf("memcpy_gbs=%.2f megabytes=%zu threads=%d\n", 2.0 * bytes / best * 1e-9, mb, threads);
	free(src);
	free(dst);
	return 0;
}
