/*
 * test_backend_cpu.c: every CPU backend operation against a naive double-precision
 * reference on random inputs, with odd sizes, several thread counts, both rotary layouts
 * and attention over a batch of sequences of mixed lengths and cached prefixes.
 */
#include "harness.h"
#include "../../src/engine/backend.h"
#include "../../src/engine/bf16.h"
#include "../../src/engine/sysinfo.h"
#include "../../src/engine/threadpool.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Deterministic uniform floats in [-1, 1). */
static float
frand(uint64_t *s)
{
	*s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
	return (float) ((*s >> 40) / (double) (1ULL << 24)) * 2.0f - 1.0f;
}

/* A malloc'd array of n random floats. */
static float *
randv(size_t n, uint64_t *s)
{
	float	   *v = malloc(n * sizeof(float));

	for (size_t i = 0; i < n; i++)
		v[i] = frand(s);
	return v;
}

/* Largest |a[i] - b[i]|. */
static double
max_diff(const float *a, const double *b, size_t n)
{
	double		m = 0;

	for (size_t i = 0; i < n; i++)
		m = fmax(m, fabs(a[i] - b[i]));
	return m;
}

typedef struct count_args
{
	atomic_int *hits;
	int			nthreads;
	atomic_int	bad_thread;
} count_args;

/* Count how often each task ran, and check the thread index. */
static void
count_task(void *p, int task, int thread)
{
	count_args *a = p;

	atomic_fetch_add(&a->hits[task], 1);
	if (thread < 0 || thread >= a->nthreads)
		atomic_store(&a->bad_thread, 1);
}

TEST(threadpool_runs_each_task_once)
{
	dl_error	err;

	for (int threads = 1; threads <= 4; threads++)
	{
		dl_threadpool *pool;
		atomic_int	hits[1000];
		count_args	a = {hits, threads, 0};

		CHECK_OK(threadpool_create(threads, &pool, &err), &err);
		CHECK(threadpool_size(pool) == threads);
		for (int round = 0; round < 200; round++)
		{
			int			n = (round * 37) % 1000;

			for (int i = 0; i < n; i++)
				atomic_store(&hits[i], 0);
			threadpool_run(pool, count_task, &a, n);
			for (int i = 0; i < n; i++)
				CHECKF(atomic_load(&hits[i]) == 1, "threads %d task %d ran %d times",
					   threads, i, atomic_load(&hits[i]));
			CHECK(atomic_load(&a.bad_thread) == 0);
		}
		threadpool_free(pool);
	}
	CHECK(threadpool_create(0, &(dl_threadpool *) {NULL}, &err) == DL_EINVAL);
}

/*
 * Products against a double reference, float32 and bfloat16 matrices (the reference then
 * multiplies the rounded weights), on the decode path (M <= 64) and the sgemm one, where
 * 65 x 1024 x 1100 widens its bfloat16 rows in two chunks.
 */
TEST(backend_cpu_matmul)
{
	static const int shapes[][3] = {{1, 33, 50}, {3, 64, 7}, {37, 70, 129}, {8, 16, 1}, {64, 128, 300},
	{100, 96, 70}, {65, 1024, 1100}};
	dl_error	err;
	uint64_t	seed = 1;

	for (int bf16 = 0; bf16 <= 1; bf16++)
	for (int threads = 1; threads <= 3; threads++)
	{
		dl_backend *be;

		CHECK_OK(backend_cpu_create(threads, bf16, &be, &err), &err);
		for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
			for (int variant = 0; variant < 4; variant++)
			{
				int			M = shapes[s][0],
							K = shapes[s][1],
							N = shapes[s][2];
				int			has_bias = variant & 1,
							acc = variant >> 1;
				float	   *in = randv((size_t) M * K, &seed);
				float	   *W = randv((size_t) N * K, &seed);
				float	   *bias = randv(N, &seed);
				float	   *out = randv((size_t) M * N, &seed);
				double	   *ref = malloc((size_t) M * N * sizeof(double));
				uint16_t   *Wh = malloc((size_t) N * K * sizeof(uint16_t));
				st_tensor	t = {.name = "W", .dtype = ST_F32, .ndim = 2, .shape = {N, K},
				.numel = (int64_t) N * K, .nbytes = (size_t) N * K * sizeof(float), .data = (const uint8_t *) W};
				double		d;

				if (bf16)
				{
					CHECK_OK(be->upload_tensor(be, Wh, DL_FMT_WEIGHT, &t, NULL, &err), &err);
					for (size_t i = 0; i < (size_t) N * K; i++)
						W[i] = bf16_to_float(Wh[i]);
				}
				for (int m = 0; m < M; m++)
					for (int n = 0; n < N; n++)
					{
						double		sum = acc ? out[(size_t) m * N + n] : 0;

						for (int k = 0; k < K; k++)
							sum += (double) in[(size_t) m * K + k] * W[(size_t) n * K + k];
						ref[(size_t) m * N + n] = sum + (has_bias ? bias[n] : 0);
					}
				be->matmul_forward(be, out, in, bf16 ? (const void *) Wh : W, has_bias ? bias : NULL,
								   M, K, N, acc);
				d = max_diff(out, ref, (size_t) M * N);
				free(in);
				free(W);
				free(Wh);
				free(bias);
				free(out);
				free(ref);
				CHECKF(d < 1e-5 * K, "bf16 %d threads %d M %d K %d N %d bias %d acc %d: diff %g",
					   bf16, threads, M, K, N, has_bias, acc, d);
			}
		be->destroy(be);
	}
}

TEST(backend_cpu_layernorm_gelu_rows)
{
	dl_backend *be;
	dl_error	err;
	uint64_t	seed = 2;
	int			T = 13,
				C = 131;
	float	   *x = randv((size_t) T * C, &seed),
			   *w = randv(C, &seed),
			   *b = randv(C, &seed),
			   *y = malloc((size_t) T * C * sizeof(float)),
				mean[13],
				rstd[13],
				g[1000];
	double	   *ref = malloc((size_t) T * C * sizeof(double)),
				gref[1000];
	int32_t		rows[5] = {12, 0, 5, 5, 3};

	CHECK_OK(backend_cpu_create(2, 0, &be, &err), &err);
	for (int i = 0; i < T * C; i++)
		x[i] = x[i] * 3 + 0.5f;	/* an offset mean, as real activations have */
	for (int t = 0; t < T; t++)
	{
		double		m = 0,
					v = 0;

		for (int i = 0; i < C; i++)
			m += x[t * C + i];
		m /= C;
		for (int i = 0; i < C; i++)
			v += (x[t * C + i] - m) * (x[t * C + i] - m);
		v /= C;
		for (int i = 0; i < C; i++)
			ref[t * C + i] = (x[t * C + i] - m) / sqrt(v + 1e-5) * w[i] + b[i];
	}
	be->layernorm_forward(be, y, mean, rstd, x, w, b, T, C, 1e-5f);
	CHECKF(max_diff(y, ref, (size_t) T * C) < 1e-5, "layernorm diff %g",
		   max_diff(y, ref, (size_t) T * C));
	for (int t = 0; t < T; t++)
		CHECK(fabsf(y[t * C] - ((x[t * C] - mean[t]) * rstd[t] * w[0] + b[0])) < 1e-5);

	/* in place, no statistics */
	be->layernorm_forward(be, x, NULL, NULL, x, w, b, T, C, 1e-5f);
	CHECK(max_diff(x, ref, (size_t) T * C) < 1e-5);

	/* gather rows */
	be->gather_rows_forward(be, y, x, rows, 5, C);
	for (int i = 0; i < 5; i++)
		CHECK(memcmp(y + i * C, x + rows[i] * C, C * sizeof(float)) == 0);
	be->embedding_forward(be, y, x, rows, 5, C);
	CHECK(memcmp(y + 4 * C, x + 3 * C, C * sizeof(float)) == 0);

	/* GELU, both forms, over a wide range, small and large n (one task or several) */
	for (int form = 0; form < 2; form++)
		for (int n = 7; n <= 1000; n += 993)
		{
			float		in[1000];

			for (int i = 0; i < n; i++)
				in[i] = -12.0f + 24.0f * i / n;
			for (int i = 0; i < n; i++)
				gref[i] = form == DL_GELU_TANH ?
					0.5 * in[i] * (1 + tanh(sqrt(2 / M_PI) * (in[i] + 0.044715 * pow(in[i], 3)))) :
					0.5 * in[i] * (1 + erf(in[i] / sqrt(2)));
			be->gelu_forward(be, g, in, n, form);
			CHECKF(max_diff(g, gref, n) < 2e-6, "gelu form %d n %d diff %g", form, n,
				   max_diff(g, gref, n));
		}
	be->destroy(be);
	free(x);
	free(w);
	free(b);
	free(y);
	free(ref);
}

TEST(backend_cpu_rotary)
{
	dl_backend *be;
	dl_error	err;
	uint64_t	seed = 3;
	int			T = 9,
				n_head = 3,
				D = 12,
				stride = 3 * n_head * D,
				max_pos = 40;
	int32_t		pos[9] = {0, 1, 2, 39, 7, 7, 20, 3, 11};

	CHECK_OK(backend_cpu_create(2, 0, &be, &err), &err);
	for (int interleaved = 0; interleaved < 2; interleaved++)
		for (int rd = 4; rd <= D; rd += 8)
		{
			float	   *x = randv((size_t) T * stride, &seed);
			float	   *cs = malloc((size_t) max_pos * rd * sizeof(float));
			double	   *ref = malloc((size_t) T * stride * sizeof(double));
			double		d;

			for (int p = 0; p < max_pos; p++)
				for (int j = 0; j < rd / 2; j++)
				{
					double		th = p * pow(10000.0, -2.0 * j / rd);

					cs[p * rd + j] = cos(th);
					cs[p * rd + rd / 2 + j] = sin(th);
				}
			for (int i = 0; i < T * stride; i++)
				ref[i] = x[i];
			for (int t = 0; t < T; t++)
				for (int h = 0; h < n_head; h++)
					for (int j = 0; j < rd / 2; j++)
					{
						int			a = interleaved ? 2 * j : j,
									b = interleaved ? 2 * j + 1 : j + rd / 2;
						double		th = pos[t] * pow(10000.0, -2.0 * j / rd);
						double		x0 = x[t * stride + h * D + a],
									x1 = x[t * stride + h * D + b];

						ref[t * stride + h * D + a] = x0 * cos(th) - x1 * sin(th);
						ref[t * stride + h * D + b] = x1 * cos(th) + x0 * sin(th);
					}
			be->rotary_forward(be, x, stride, T, n_head, D, rd, interleaved, pos, cs);
			d = max_diff(x, ref, (size_t) T * stride);
			free(x);
			free(cs);
			free(ref);
			CHECKF(d < 1e-5, "interleaved %d rot_dim %d: diff %g", interleaved, rd, d);
		}
	be->destroy(be);
}

TEST(backend_cpu_attention_mixed_batch)
{
	/* prefill from scratch, decode steps, a long prefill after a cached prefix */
	static const dl_span spans[] = {
		{0, 5, 2, 0}, {5, 1, 0, 7}, {6, 40, 1, 150}, {46, 1, 3, 299}, {47, 17, 4, 0},
	};
	int			nspan = sizeof(spans) / sizeof(spans[0]);
	int			T = 64,
				n_head = 3,
				D = 20,
				C = n_head * D,
				max_ctx = 300,
				nslot = 5;
	float		scale = 1.0f / sqrtf(D);
	uint64_t	seed = 4;
	dl_error	err;
	float	   *kc0 = randv((size_t) nslot * max_ctx * C, &seed);
	float	   *vc0 = randv((size_t) nslot * max_ctx * C, &seed);
	float	   *qkv = randv((size_t) T * 3 * C, &seed);
	double	   *ref = malloc((size_t) T * C * sizeof(double));
	double	   *sc = malloc(max_ctx * sizeof(double));

	/* scale q up so that the softmax is far from uniform; keys and values exact in bfloat16,
	 * so that a bfloat16 cache holds them unchanged and meets the same reference */
	for (int i = 0; i < T * 3 * C; i++)
		qkv[i] = i % (3 * C) < C ? qkv[i] * 4 : bf16_to_float(float_to_bf16(qkv[i]));
	for (size_t i = 0; i < (size_t) nslot * max_ctx * C; i++)
	{
		kc0[i] = bf16_to_float(float_to_bf16(kc0[i]));
		vc0[i] = bf16_to_float(float_to_bf16(vc0[i]));
	}
	for (int s = 0; s < nspan; s++)
		for (int i = 0; i < spans[s].len; i++)
		{
			int			t = spans[s].first + i,
						p = spans[s].pos + i;

			for (int h = 0; h < n_head; h++)
			{
				double		mx = -1e300,
							sum = 0;

				for (int j = 0; j <= p; j++)
				{
					/* keys: new tokens of this span from qkv, older ones from the cache */
					const float *k = j >= spans[s].pos ?
						qkv + (size_t) (spans[s].first + j - spans[s].pos) * 3 * C + C :
						kc0 + ((size_t) spans[s].slot * max_ctx + j) * C;
					double		dot = 0;

					for (int d = 0; d < D; d++)
						dot += (double) qkv[(size_t) t * 3 * C + h * D + d] * k[h * D + d];
					sc[j] = dot * scale;
					mx = fmax(mx, sc[j]);
				}
				for (int j = 0; j <= p; j++)
					sum += (sc[j] = exp(sc[j] - mx));
				for (int d = 0; d < D; d++)
				{
					double		o = 0;

					for (int j = 0; j <= p; j++)
					{
						const float *v = j >= spans[s].pos ?
							qkv + (size_t) (spans[s].first + j - spans[s].pos) * 3 * C + 2 * C :
							vc0 + ((size_t) spans[s].slot * max_ctx + j) * C;

						o += sc[j] / sum * v[h * D + d];
					}
					ref[(size_t) t * C + h * D + d] = o;
				}
			}
		}

	/* a float32 cache, and a bfloat16 one (its blocks widened 128 keys at a time: 190 here) */
	for (int bf16 = 0; bf16 <= 1; bf16++)
	for (int threads = 1; threads <= 3; threads += 2)
	{
		dl_backend *be;
		size_t		ncache = (size_t) nslot * max_ctx * C;
		float	   *kc = malloc(ncache * sizeof(float));
		float	   *vc = malloc(ncache * sizeof(float));
		uint16_t   *kh = malloc(ncache * sizeof(uint16_t));
		uint16_t   *vh = malloc(ncache * sizeof(uint16_t));
		float	   *out = malloc((size_t) T * C * sizeof(float));
		dl_spans	sp = {nspan, spans, spans};
		double		d;
		void	   *ws;

		memcpy(kc, kc0, ncache * sizeof(float));
		memcpy(vc, vc0, ncache * sizeof(float));
		for (size_t i = 0; i < ncache; i++)
		{
			kh[i] = float_to_bf16(kc0[i]);
			vh[i] = float_to_bf16(vc0[i]);
		}
		CHECK_OK(backend_cpu_create(threads, bf16, &be, &err), &err);
		ws = be->alloc(be, be->attention_workspace(be, max_ctx), &err);
		be->attention_forward(be, out, qkv, bf16 ? (void *) kh : (void *) kc, bf16 ? (void *) vh : (void *) vc,
							  max_ctx, &sp, n_head, D, scale, ws);
		be->free(be, ws);
		d = max_diff(out, ref, (size_t) T * C);
		/* the new keys and values landed in the cache */
		for (size_t i = 0; bf16 && i < ncache; i++)
		{
			kc[i] = bf16_to_float(kh[i]);
			vc[i] = bf16_to_float(vh[i]);
		}
		CHECK(memcmp(kc + ((size_t) 1 * max_ctx + 150 + 3) * C, qkv + (size_t) (6 + 3) * 3 * C + C,
					 C * sizeof(float)) == 0);
		CHECK(memcmp(vc + ((size_t) 3 * max_ctx + 299) * C, qkv + (size_t) 46 * 3 * C + 2 * C,
					 C * sizeof(float)) == 0);
		be->destroy(be);
		free(kc);
		free(vc);
		free(kh);
		free(vh);
		free(out);
		CHECKF(d < 1e-5, "bf16 %d threads %d: attention diff %g", bf16, threads, d);
	}
	free(kc0);
	free(vc0);
	free(qkv);
	free(ref);
	free(sc);
}

TEST(backend_cpu_upload_tensor_permutes_rows)
{
	dl_backend *be;
	dl_error	err;
	uint16_t	bf[6] = {0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0xbf80};	/* 1..5, -1 */
	st_tensor	t = {.name = "w", .dtype = ST_BF16, .ndim = 2, .shape = {3, 2},
	.numel = 6, .nbytes = sizeof(bf), .data = (const uint8_t *) bf};
	int32_t		rows[3] = {2, 0, 1};
	float		out[6];
	static const float expect[6] = {5, -1, 1, 2, 3, 4};

	CHECK_OK(backend_cpu_create(1, 0, &be, &err), &err);
	CHECK_OK(be->upload_tensor(be, out, DL_FMT_WEIGHT, &t, rows, &err), &err);
	CHECK(memcmp(out, expect, sizeof(out)) == 0);
	CHECK_OK(be->upload_tensor(be, out, DL_FMT_F32, &t, NULL, &err), &err);
	CHECK(out[0] == 1 && out[5] == -1);
	be->destroy(be);
}

/*
 * upload_tensor shares a tensor out over the pool (tasks that end mid-row, and with one
 * thread tasks longer than the bfloat16 rounding buffer): every source dtype into float32
 * and into bfloat16 matrices, with and without a permutation, equals converting row by
 * row; bfloat16 bytes are kept as the file has them (a signalling NaN stays one).
 * A permutation naming a row that does not exist is refused.
 */
TEST(backend_cpu_upload_tensor_on_the_pool)
{
	enum {R = 1101, C = 4096};
	static const st_dtype dtypes[3] = {ST_F32, ST_F16, ST_BF16};
	uint32_t   *src = malloc((size_t) R * C * 4);
	float	   *row = malloc(C * sizeof(float));
	uint32_t   *want = malloc((size_t) R * C * 4),
			   *got = malloc((size_t) R * C * 4);
	int32_t    *perm = malloc(R * sizeof(int32_t));
	uint64_t	seed = 11;
	dl_error	err;

	CHECK(src && row && want && got && perm);
	for (size_t i = 0; i < (size_t) R * C; i++)
		src[i] = (uint32_t) (frand(&seed) * 2147483648.0f);
	((uint16_t *) src)[5] = 0x7f81;	/* a signalling bfloat16 NaN */
	for (int r = 0; r < R; r++)
		perm[r] = (r * 7 + 3) % R;
	for (int threads = 1; threads <= 3; threads += 2)
		for (int bf16 = 0; bf16 < 2; bf16++)
		{
			dl_backend *be;

			CHECK_OK(backend_cpu_create(threads, bf16, &be, &err), &err);
			for (int d = 0; d < 3; d++)
				for (int p = 0; p < 2; p++)
				{
					st_tensor	t = {.name = "w", .dtype = dtypes[d], .ndim = 2, .shape = {R, C},
					.numel = (int64_t) R * C, .data = (const uint8_t *) src};
					const int32_t *rows = p ? perm : NULL;
					size_t		es = bf16 ? 2 : 4;

					t.nbytes = (size_t) t.numel * st_dtype_size(t.dtype);
					for (int r = 0; r < R; r++)
					{
						int64_t		from = rows ? rows[r] : r;
						char	   *w = (char *) want + (size_t) r * C * es;

						CHECK_OK(st_range_to_f32(&t, from * C, C, row, &err), &err);
						if (!bf16)
							memcpy(w, row, C * sizeof(float));
						else if (t.dtype == ST_BF16)
							memcpy(w, t.data + from * C * 2, C * 2);
						else
							for (int c = 0; c < C; c++)
								((uint16_t *) w)[c] = float_to_bf16(row[c]);
					}
					memset(got, 0xa5, (size_t) R * C * es);
					CHECK_OK(be->upload_tensor(be, got, DL_FMT_WEIGHT, &t, rows, &err), &err);
					CHECKF(memcmp(got, want, (size_t) R * C * es) == 0, "%d threads, %s into %s, %s",
						   threads, st_dtype_name(t.dtype), bf16 ? "bf16" : "f32",
						   p ? "permuted" : "in order");
				}
			perm[7] = R;
			CHECK(be->upload_tensor(be, got, DL_FMT_WEIGHT,
									&(st_tensor) {.name = "w", .dtype = ST_F32, .ndim = 2, .shape = {R, C},
									.numel = (int64_t) R * C, .data = (const uint8_t *) src},
									perm, &err) == DL_EINVAL);
			CHECKF(strstr(err.msg, "\"w\"") && strstr(err.msg, "1101"), "%s", err.msg);
			perm[7] = (7 * 7 + 3) % R;
			be->destroy(be);
		}
	free(src);
	free(row);
	free(want);
	free(got);
	free(perm);
}

/*
 * bfloat16 matrices: float32 rounded to nearest even (ties to the even one, a NaN kept),
 * rows permuted as asked, and the embedding lookup widening them back.
 */
TEST(backend_cpu_bf16_weights_round_and_embed)
{
	dl_backend *be;
	dl_error	err;
	/* 1 + 2^-8 and 1 + 3 * 2^-8: ties, to 1 and to 1 + 2^-6; -2; a NaN; just over the tie above 3 */
	float		f[6] = {1.00390625f, 1.01171875f, -2.0f, NAN, 3.0078125f + 1e-5f, 0.0f};
	st_tensor	t = {.name = "e", .dtype = ST_F32, .ndim = 2, .shape = {3, 2},
	.numel = 6, .nbytes = sizeof(f), .data = (const uint8_t *) f};
	int32_t		rows[3] = {1, 2, 0};
	int32_t		ids[2] = {2, 0};
	uint16_t	h[6];
	float		out[4];

	CHECK_OK(backend_cpu_create(1, 1, &be, &err), &err);
	CHECK(be->weight_elem_size == 2);
	CHECK_OK(be->upload_tensor(be, h, DL_FMT_WEIGHT, &t, NULL, &err), &err);
	CHECKF(h[0] == 0x3f80 && h[1] == 0x3f82 && h[2] == 0xc000 && (h[3] & 0x7fff) > 0x7f80 &&
		   h[4] == 0x4041 && h[5] == 0, "%04x %04x %04x %04x %04x %04x", h[0], h[1], h[2], h[3], h[4], h[5]);
	CHECK_OK(be->upload_tensor(be, h, DL_FMT_WEIGHT, &t, rows, &err), &err);
	CHECK(h[0] == 0xc000 && h[2] == 0x4041 && h[4] == 0x3f80 && h[5] == 0x3f82);
	be->embedding_forward(be, out, h, ids, 2, 2);
	CHECK(out[0] == 1.0f && out[1] == bf16_to_float(0x3f82) && out[2] == -2.0f && isnan(out[3]));
	be->destroy(be);
}

/*
 * Pure decode with many heads (70: past the 32 at which the CPU backend splits a
 * sequence's heads into groups to fit its scratch space) against a double-precision
 * reference, at 1 to 3 threads; the new keys and values must land in the cache.
 */
TEST(backend_cpu_attention_decode_many_heads)
{
	enum { H = 70, D = 24, C = H * D, ctx = 50, B = 3 };
	uint64_t	seed = 11;
	float	   *kc = randv((size_t) B * ctx * C, &seed);
	float	   *vc = randv((size_t) B * ctx * C, &seed);
	float	   *qkv = randv((size_t) B * 3 * C, &seed);
	float	   *out = malloc((size_t) B * C * sizeof(float));
	double	   *ref = malloc((size_t) B * C * sizeof(double));
	float	   *k2 = malloc((size_t) B * ctx * C * sizeof(float));
	float	   *v2 = malloc((size_t) B * ctx * C * sizeof(float));
	dl_span		sp[B] = {{0, 1, 2, 10}, {1, 1, 0, 49}, {2, 1, 1, 0}};
	dl_spans	spans = {B, sp, sp};
	double		worst = 0;
	int			stored = 1;

	/* reference: token b at position p of slot s attends to the cache and to itself */
	for (int b = 0; b < B; b++)
		for (int h = 0; h < H; h++)
		{
			double		sc[ctx],
						mx = -INFINITY,
						sum = 0;
			int			p = sp[b].pos;
			const float *q = qkv + (size_t) b * 3 * C + h * D;

			for (int j = 0; j <= p; j++)
			{
				const float *k = j == p ? qkv + (size_t) b * 3 * C + C : kc + ((size_t) sp[b].slot * ctx + j) * C;
				double		d = 0;

				for (int x = 0; x < D; x++)
					d += (double) q[x] * k[h * D + x];
				sc[j] = d * 0.2;
				mx = fmax(mx, sc[j]);
			}
			for (int j = 0; j <= p; j++)
				sum += (sc[j] = exp(sc[j] - mx));
			for (int x = 0; x < D; x++)
			{
				double		o = 0;

				for (int j = 0; j <= p; j++)
				{
					const float *v = j == p ? qkv + (size_t) b * 3 * C + 2 * C : vc + ((size_t) sp[b].slot * ctx + j) * C;

					o += sc[j] / sum * v[h * D + x];
				}
				ref[(size_t) b * C + h * D + x] = o;
			}
		}
	for (int threads = 1; threads <= 3; threads++)
	{
		dl_backend *be;
		dl_error	err;
		void	   *ws;

		memcpy(k2, kc, (size_t) B * ctx * C * sizeof(float));
		memcpy(v2, vc, (size_t) B * ctx * C * sizeof(float));
		CHECK_OK(backend_cpu_create(threads, 0, &be, &err), &err);
		ws = be->alloc(be, be->attention_workspace(be, ctx), &err);
		CHECK(ws != NULL);
		be->attention_forward(be, out, qkv, k2, v2, ctx, &spans, H, D, 0.2f, ws);
		worst = fmax(worst, max_diff(out, ref, (size_t) B * C));
		for (int b = 0; b < B; b++)
			for (int c = 0; c < C; c++)
				stored &= k2[((size_t) sp[b].slot * ctx + sp[b].pos) * C + c] == qkv[(size_t) b * 3 * C + C + c] &&
					v2[((size_t) sp[b].slot * ctx + sp[b].pos) * C + c] == qkv[(size_t) b * 3 * C + 2 * C + c];
		be->free(be, ws);
		be->destroy(be);
	}
	free(kc);
	free(vc);
	free(qkv);
	free(out);
	free(ref);
	free(k2);
	free(v2);
	/* float32 dot products of 24 terms and softmax over <= 50 positions: ~1e-6 */
	CHECKF(worst < 1e-5, "decode attention with %d heads differs from the reference by %g", H, worst);
	CHECK(stored);
}

/* More memory than the host has left is refused with the figures, not left to the OOM killer. */
TEST(backend_cpu_alloc_refuses_what_the_host_lacks)
{
	dl_backend *be;
	dl_error	err;
	long long	avail = sys_mem_available();
	void	   *p;

	if (avail < 0)
		SKIP("neither /proc/meminfo nor a memory cgroup is readable");
	CHECK(backend_cpu_create(1, 0, &be, &err) == DL_OK);
	p = be->alloc(be, (size_t) avail + ((size_t) 1 << 30), &err);
	CHECKF(p == NULL && err.code == DL_ENOMEM && strstr(err.msg, "MB needed") &&
		   strstr(err.msg, "MB available"), "%s", p ? "allocated" : err.msg);
	p = be->alloc(be, (size_t) 128 << 20, &err);
	CHECKF(p != NULL, "%s", err.msg);
	be->free(be, p);
	be->destroy(be);
}
