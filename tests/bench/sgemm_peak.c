/*
 * sgemm_peak.c: what OpenBLAS's own cblas_sgemm reaches on the matrix products of a
 * transformer prefill, the ceiling that the engine's prefill matmuls are measured
 * against (tests/bench/bench_engine.py).
 *
 *   sgemm_peak M E F V LAYERS THREADS
 *
 * M tokens, width E, MLP width F, vocabulary V. Activations are [M, K] row-major and
 * weights [N, K] as Hugging Face stores them (y = x W^T: CblasTrans on W), the layout
 * the engine multiplies in. Prints one line per shape and a total over a prefill's
 * layer products (LAYERS x qkv, projection, MLP in, MLP out), after the BLAS line:
 *   shape=qkv M=512 K=768 N=2304 gflops=... seconds=...
 *   total_layers gflops=... seconds=... threads=2
 * The [M, E] x [E, V] logits product is printed too but left out of the total: a
 * generation prefill computes the logits of its last token only.
 */
#include <cblas.h>
#include <stdio.h>

#include "sysinfo.h"
#include <stdlib.h>
#include <time.h>

#define REPS 5

/* Monotonic seconds. */
static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Best of REPS seconds for C[M, N] = A[M, K] B[N, K]^T, after one warm-up call. */
static double
time_sgemm(const float *A, const float *B, float *C, int M, int K, int N)
{
	double		best = 1e30;

	for (int r = 0; r <= REPS; r++)
	{
		double		t = now_s();

		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K,
					1.0f, A, K, B, K, 0.0f, C, N);
		t = now_s() - t;
		if (r > 0 && t < best)
			best = t;
	}
	return best;
}

/* A buffer of n floats in [-0.5, 0.5), or exit. */
static float *
random_floats(size_t n, unsigned seed)
{
	float	   *p = malloc(n * sizeof(float));

	if (p == NULL)
	{
		fprintf(stderr, "sgemm_peak: out of memory for %zu floats\n", n);
		exit(1);
	}
	srand(seed);
	for (size_t i = 0; i < n; i++)
		p[i] = (float) rand() / RAND_MAX - 0.5f;
	return p;
}

int
main(int argc, char **argv)
{
	int			M,
				E,
				F,
				V,
				layers,
				threads;
	size_t		maxk,
				maxn;
	float	   *A,
			   *B,
			   *C;
	double		flops_total = 0.0,
				secs_total = 0.0;
	char		blas[256];

	if (argc != 7 || (M = atoi(argv[1])) < 1 || (E = atoi(argv[2])) < 1 ||
		(F = atoi(argv[3])) < 1 || (V = atoi(argv[4])) < 1 ||
		(layers = atoi(argv[5])) < 1 || (threads = atoi(argv[6])) < 1)
	{
		fprintf(stderr, "usage: sgemm_peak M E F V LAYERS THREADS\n");
		return 2;
	}

	const struct
	{
		const char *name;
		int			K,
					N;
		int			per_layer;	/* counted in the prefill total */
	}			shapes[] = {
		{"qkv", E, 3 * E, 1},
		{"attn_out", E, E, 1},
		{"mlp_in", E, F, 1},
		{"mlp_out", F, E, 1},
		{"logits", E, V, 0},
	};

	maxk = E > F ? E : F;
	maxn = (size_t) 3 * E;
	if ((size_t) F > maxn)
		maxn = F;
	if ((size_t) V > maxn)
		maxn = V;
	A = random_floats((size_t) M * maxk, 1);
	B = random_floats(maxn * maxk, 2);
	C = random_floats((size_t) M * maxn, 3);
	/* OpenBLAS's kernels as the engine runs them (sysinfo.c, compiled in) */
	sys_blas_tune();
	openblas_set_num_threads(threads);
	sys_blas_info(blas, sizeof(blas));
	printf("blas %s\n", blas);

	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
	{
		double		flops = 2.0 * M * shapes[s].K * shapes[s].N;
		double		t = time_sgemm(A, B, C, M, shapes[s].K, shapes[s].N);

		printf("shape=%s M=%d K=%d N=%d gflops=%.2f seconds=%.5f\n", shapes[s].name,
			   M, shapes[s].K, shapes[s].N, flops / t * 1e-9, t);
		if (shapes[s].per_layer)
		{
			flops_total += flops * layers;
			secs_total += t * layers;
		}
	}
	printf("total_layers gflops=%.2f seconds=%.4f threads=%d\n",
		   flops_total / secs_total * 1e-9, secs_total, threads);
	free(A);
	free(B);
	free(C);
	return 0;
}
