/*
 * test_backend_ops.c: every operation, forward and backward, and every memory function of
 * every backend under test (backends.h: CUDA in its bf16, fp32 and mixed modes) against the
 * CPU backend, on fresh random inputs (llama.cpp's test-backend-ops). One line per case:
 * the normalised error ||out - ref|| / ||ref|| and its tolerance. Outputs are poisoned with
 * NaN before each operation, so an element left unwritten fails the case; gradients start
 * from random values, so one that overwrites instead of accumulating fails too.
 *
 * The reference gets exactly the inputs the backend under test computes with: weights as
 * that backend stores them (read back and widened), and for a bfloat16 backend inputs that
 * bfloat16 holds exactly wherever the backend rounds them (activations entering a cuBLAS
 * product, k and v entering the cache). What remains is summation order and libm:
 * 1e-5 (float32 far under 1e-3, METHOD.md). Copies must be exact. One matrix-product
 * case keeps inexact inputs to check the rounding itself, at 1e-2 (bfloat16 operands:
 * 2^-9 relative per element).
 *
 * Sampling compares token ids: a difference counts only where float rounding of a
 * cumulative sum explains it.
 *
 * Without a GPU (or without the plugin) every test says SKIP and why.
 */
#include "harness.h"
#include "backends.h"
#include "bf16.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TOL_F32 1e-5
#define TOL_BF16 1e-2

/* Uniform floats in [-1, 1) from a 64-bit LCG. */
static float
frand(uint64_t *s)
{
	*s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
	return (float) ((*s >> 40) / (double) (1ULL << 24)) * 2.0f - 1.0f;
}

/* A seed of its own for each case (different inputs everywhere, the same on every run). */
static uint64_t
new_seed(void)
{
	static uint64_t n = 0;

	n += 0x9e3779b97f4a7c15ULL;
	return n;
}

/* n random floats times scale (malloc'd). */
static float *
randv(size_t n, float scale, uint64_t *s)
{
	float	   *v = malloc(n * sizeof(float));

	for (size_t i = 0; i < n; i++)
		v[i] = frand(s) * scale;
	return v;
}

/* Round n floats to bfloat16 values in place. */
static void
round_bf16(float *v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		v[i] = bf16_to_float(float_to_bf16(v[i]));
}

/* Whether be stores weights (and the KV cache) as bfloat16. */
static int
is_bf16(const dl_backend *be)
{
	return be->weight_elem_size == 2;
}

/* ||a - b|| / ||b||; infinite when a holds a NaN or infinity. */
static double
nerr(const float *a, const float *b, size_t n)
{
	double		d = 0,
				r = 0;

	for (size_t i = 0; i < n; i++)
	{
		if (!isfinite(a[i]))
			return INFINITY;
		d += ((double) a[i] - b[i]) * ((double) a[i] - b[i]);
		r += (double) b[i] * b[i];
	}
	return r > 0 ? sqrt(d / r) : sqrt(d);
}

/* Print one case and say whether its error is within tol. */
static int
report(const char *op, const char *shape, const char *label, double e, double tol)
{
	int			ok = e <= tol;

	printf("  %-16s %-40s %-14s nerr %9.2e  tol %.0e  %s\n", op, shape, label, e, tol,
		   ok ? "ok" : "FAIL");
	return ok;
}

/* bytes of device memory on be holding a copy of host (NULL: NaN poison, every byte 0xff). */
static void *
put(dl_backend *be, const void *host, size_t bytes)
{
	dl_error	err;
	void	   *d = be->alloc(be, bytes, &err);
	void	   *tmp = NULL;

	if (d == NULL)
	{
		fprintf(stderr, "  alloc of %zu bytes on %s: %s\n", bytes, be->name, err.msg);
		exit(2);
	}
	if (host == NULL)
		host = tmp = memset(malloc(bytes), 0xff, bytes);
	if (be->upload(be, d, host, bytes, &err) != DL_OK)
	{
		fprintf(stderr, "  upload to %s: %s\n", be->name, err.msg);
		exit(2);
	}
	free(tmp);
	return d;
}

/* Copy bytes of device memory back to a malloc'd host buffer (after everything queued). */
static void *
get(dl_backend *be, const void *dev, size_t bytes)
{
	dl_error	err;
	void	   *h = malloc(bytes);

	if (be->download(be, h, dev, bytes, &err) != DL_OK)
	{
		fprintf(stderr, "  download from %s: %s\n", be->name, err.msg);
		exit(2);
	}
	return h;
}

/* n elements of be's weight or kv format (elem bytes) widened to float32 (malloc'd). */
static float *
widen(const void *src, size_t n, size_t elem)
{
	float	   *f = malloc(n * sizeof(float));

	for (size_t i = 0; i < n; i++)
		f[i] = elem == 2 ? bf16_to_float(((const uint16_t *) src)[i]) : ((const float *) src)[i];
	return f;
}

/* A float32 [rows, cols] host matrix as an F32 safetensors tensor (no file behind it). */
static st_tensor
f32_tensor(const float *v, int64_t rows, int64_t cols)
{
	st_tensor	t = {.name = "test", .dtype = ST_F32, .ndim = 2, .shape = {rows, cols},
	.numel = rows * cols, .nbytes = (size_t) (rows * cols) * 4, .data = (const uint8_t *) v};

	return t;
}

/*
 * Weights [rows, cols] on be through upload_tensor; *eff gets them as be stores them,
 * widened to float32 (the reference computes with those).
 */
static void *
put_weights(dl_backend *be, const float *w, int64_t rows, int64_t cols, float **eff)
{
	size_t		n = (size_t) (rows * cols);
	dl_error	err;
	st_tensor	t = f32_tensor(w, rows, cols);
	void	   *d = put(be, NULL, n * be->weight_elem_size);
	void	   *raw;

	if (be->upload_tensor(be, d, DL_FMT_WEIGHT, &t, NULL, &err) != DL_OK)
	{
		fprintf(stderr, "  upload_tensor to %s: %s\n", be->name, err.msg);
		exit(2);
	}
	raw = get(be, d, n * be->weight_elem_size);
	*eff = widen(raw, n, be->weight_elem_size);
	free(raw);
	return d;
}

/* Float32 values in be's kv format on be (rounded to bfloat16 there). */
static void *
put_kv(dl_backend *be, const float *v, size_t n)
{
	uint16_t   *b;
	void	   *d;

	if (be->kv_elem_size == 4)
		return put(be, v, n * 4);
	b = malloc(n * 2);
	for (size_t i = 0; i < n; i++)
		b[i] = float_to_bf16(v[i]);
	d = put(be, b, n * 2);
	free(b);
	return d;
}

/* The backends under test, or SKIP (visibly) when there are none. */
#define BACKENDS_OR_SKIP(list, n) \
	const test_backend *list; \
	const char *why_; \
	int n = test_backends(&list, &why_); \
	if (n == 0) \
		SKIP("%s", why_)

/* --- memory --- */

TEST(ops_memory_roundtrip_copy_zero_oom)
{
	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
	{
		dl_backend *be = tb[b].be;
		uint64_t	s = new_seed();
		size_t		n = 1 << 20;
		float	   *v = randv(n, 1.0f, &s);
		char	   *d = put(be, v, n * 4),
				   *d2 = put(be, NULL, n * 4);
		float	   *back;
		size_t		bad = 0;
		dl_error	err;
		void	   *huge;

		/* d2 = v shifted by 1000 floats (its head poisoned), then floats 5000..5999 zeroed */
		be->copy(be, d2 + 4000, d, (n - 1000) * 4);
		be->zero(be, d2 + 20000, 4000);
		back = get(be, d2, n * 4);
		for (size_t i = 1000; i < n; i++)
		{
			float		want = i >= 5000 && i < 6000 ? 0.0f : v[i - 1000];

			bad += memcmp(&back[i], &want, 4) != 0;
		}
		for (size_t i = 0; i < 1000; i++)
			bad += !isnan(back[i]);
		CHECK(report("copy/zero", "4 MB, offsets", tb[b].label, (double) bad, 0));
		free(back);

		huge = be->alloc(be, (size_t) 1 << 50, &err);
		CHECKF(huge == NULL && err.code == DL_ENOMEM && strstr(err.msg, "MB free"),
			   "alloc of 1 PB on %s: %s", be->name, huge ? "succeeded" : err.msg);
		printf("  %-16s %-40s %-14s \"%s\"\n", "alloc", "1 PB", tb[b].label, err.msg);
		/* the failed allocation must not poison what follows */
		CHECK_OK(be->synchronize(be, &err), &err);
		be->free(be, d);
		be->free(be, d2);
		free(v);
	}
}

/* One upload_tensor case: expected values computed here, compared bit for bit. */
static int
upload_case(const test_backend *tb, st_dtype dtype, dl_fmt fmt, int64_t rows, int64_t cols,
			int permute)
{
	dl_backend *be = tb->be;
	uint64_t	s = new_seed();
	size_t		n = (size_t) (rows * cols),
				es = dtype == ST_F32 ? 4 : 2,
				des = fmt == DL_FMT_F32 ? 4 : be->weight_elem_size;
	float	   *val = malloc(n * sizeof(float));
	uint8_t    *raw = malloc(n * es);
	int32_t    *perm = permute ? malloc(rows * sizeof(int32_t)) : NULL;
	st_tensor	t = {.name = "upload", .dtype = dtype, .ndim = 2, .shape = {rows, cols},
	.numel = (int64_t) n, .nbytes = n * es, .data = raw};
	void	   *d = put(be, NULL, n * des),
			   *got;
	float	   *back;
	size_t		bad = 0;
	char		shape[64];
	dl_error	err;

	/* values exact in the source dtype: k/1024 is exact in F16 and (|k| < 256) in BF16 */
	for (size_t i = 0; i < n; i++)
	{
		float		x = dtype == ST_F32 ? frand(&s) * 3.0f : (float) ((int) (frand(&s) * 255)) / 1024.0f;

		val[i] = x;
		if (dtype == ST_F32)
			memcpy(raw + 4 * i, &x, 4);
		else if (dtype == ST_BF16)
		{
			uint16_t	b = float_to_bf16(x);

			memcpy(raw + 2 * i, &b, 2);
		}
		else
		{
			/* binary16 of a normal float that it holds exactly: sign, rebiased exponent, top 10 bits */
			uint32_t	u;
			uint16_t	h;

			memcpy(&u, &x, 4);
			h = (u & 0x7fffffffu) == 0 ? (uint16_t) (u >> 16) :
				(uint16_t) ((u >> 16 & 0x8000) | (((u >> 23 & 0xff) - 112) << 10) | (u >> 13 & 0x3ff));
			memcpy(raw + 2 * i, &h, 2);
		}
	}
	for (int64_t r = 0; permute && r < rows; r++)
		perm[r] = (int32_t) ((r * 7919 + 13) % rows);
	if (be->upload_tensor(be, d, fmt, &t, perm, &err) != DL_OK)
	{
		fprintf(stderr, "  upload_tensor: %s\n", err.msg);
		return 0;
	}
	got = get(be, d, n * des);
	back = widen(got, n, des);
	for (int64_t r = 0; r < rows; r++)
		for (int64_t c = 0; c < cols; c++)
		{
			float		want = val[(size_t) (perm ? perm[r] : r) * cols + c];

			if (des == 2)
				want = bf16_to_float(float_to_bf16(want));
			bad += memcmp(&back[r * cols + c], &want, 4) != 0;
		}
	snprintf(shape, sizeof(shape), "%s->%s [%lld,%lld]%s", dtype == ST_F32 ? "F32" : dtype == ST_F16 ? "F16" : "BF16",
			 fmt == DL_FMT_F32 ? "f32" : "weight", (long long) rows, (long long) cols,
			 permute ? " rows permuted" : "");
	be->free(be, d);
	free(val);
	free(raw);
	free(perm);
	free(got);
	free(back);
	return report("upload_tensor", shape, tb->label, (double) bad, 0);
}

TEST(ops_upload_tensor)
{
	static const st_dtype dtypes[3] = {ST_F32, ST_F16, ST_BF16};

	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
	{
		for (int d = 0; d < 3; d++)
			for (int fmt = 0; fmt < 2; fmt++)
				for (int p = 0; p < 2; p++)
					CHECK(upload_case(&tb[b], dtypes[d], fmt ? DL_FMT_WEIGHT : DL_FMT_F32, 37, 29, p));
		/* more than one 16 MB staging buffer: the chunks and their double buffering */
		CHECK(upload_case(&tb[b], ST_F32, DL_FMT_WEIGHT, 3001, 1500, 1));
		CHECK(upload_case(&tb[b], ST_BF16, DL_FMT_WEIGHT, 3001, 3000, 0));
		CHECK(upload_case(&tb[b], ST_F16, DL_FMT_F32, 5, 3000001, 0));
	}
}

/* --- row gathers --- */

TEST(ops_embedding_gather_rows)
{
	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
	{
		dl_backend *be = tb[b].be,
				   *cpu = reference_backend();
		uint64_t	s = new_seed();
		int			V = 300,
					C = 1000,
					T = 17,
					n = 7;
		float	   *table = randv((size_t) V * C, 1.0f, &s),
				   *eff,
				   *in = randv((size_t) T * C, 1.0f, &s);
		int32_t		ids[17],
					rows[7];
		void	   *d_table = put_weights(be, table, V, C, &eff);
		void	   *c_table = put(cpu, eff, (size_t) V * C * 4);
		void	   *d_out = put(be, NULL, (size_t) T * C * 4),
				   *c_out = put(cpu, NULL, (size_t) T * C * 4);
		void	   *d_ids,
				   *c_ids,
				   *d_in,
				   *c_in,
				   *d_rows,
				   *c_rows;
		float	   *got,
				   *ref;

		for (int t = 0; t < T; t++)
			ids[t] = t % 5 == 4 ? ids[t - 1] : (int32_t) ((frand(&s) + 1.0f) / 2 * V) % V;
		for (int i = 0; i < n; i++)
			rows[i] = (int32_t) ((frand(&s) + 1.0f) / 2 * T) % T;
		d_ids = put(be, ids, sizeof(ids));
		c_ids = put(cpu, ids, sizeof(ids));
		be->embedding_forward(be, d_out, d_table, d_ids, T, C);
		cpu->embedding_forward(cpu, c_out, c_table, c_ids, T, C);
		got = get(be, d_out, (size_t) T * C * 4);
		ref = get(cpu, c_out, (size_t) T * C * 4);
		CHECK(report("embedding", "V 300, C 1000, T 17 (repeats)", tb[b].label,
					 nerr(got, ref, (size_t) T * C), 0));
		free(got);
		free(ref);

		d_in = put(be, in, (size_t) T * C * 4);
		c_in = put(cpu, in, (size_t) T * C * 4);
		d_rows = put(be, rows, sizeof(rows));
		c_rows = put(cpu, rows, sizeof(rows));
		be->free(be, d_out);
		d_out = put(be, NULL, (size_t) n * C * 4);
		be->gather_rows_forward(be, d_out, d_in, d_rows, n, C);
		cpu->gather_rows_forward(cpu, c_out, c_in, c_rows, n, C);
		got = get(be, d_out, (size_t) n * C * 4);
		ref = get(cpu, c_out, (size_t) n * C * 4);
		CHECK(report("gather_rows", "T 17, C 1000, 7 rows", tb[b].label, nerr(got, ref, (size_t) n * C), 0));
		free(got);
		free(ref);
		free(table);
		free(eff);
		free(in);
		be->free(be, d_table);
		be->free(be, d_out);
		be->free(be, d_ids);
		be->free(be, d_in);
		be->free(be, d_rows);
		cpu->free(cpu, c_table);
		cpu->free(cpu, c_out);
		cpu->free(cpu, c_ids);
		cpu->free(cpu, c_in);
		cpu->free(cpu, c_rows);
	}
}

/* --- layer norm --- */

TEST(ops_layernorm)
{
	static const int shapes[][2] = {{1, 4096}, {7, 33}, {3, 2560}, {64, 256}};

	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
		for (int k = 0; k < 4; k++)
		{
			dl_backend *be = tb[b].be,
					   *cpu = reference_backend();
			uint64_t	s = new_seed();
			int			T = shapes[k][0],
						C = shapes[k][1];
			size_t		n = (size_t) T * C;
			float	   *x = randv(n, 2.0f, &s),
					   *w = randv(C, 1.0f, &s),
					   *bias = randv(C, 1.0f, &s);
			float	   *dx = put(be, x, n * 4),
					   *dw = put(be, w, C * 4),
					   *db = put(be, bias, C * 4),
					   *dout = put(be, NULL, n * 4),
					   *dm = put(be, NULL, T * 4),
					   *dr = put(be, NULL, T * 4);
			float	   *cx = put(cpu, x, n * 4),
					   *cw = put(cpu, w, C * 4),
					   *cb = put(cpu, bias, C * 4),
					   *cout = put(cpu, NULL, n * 4),
					   *cm = put(cpu, NULL, T * 4),
					   *cr = put(cpu, NULL, T * 4);
			float	   *got,
					   *ref;
			char		shape[64];

			/* out of place with mean and rstd, then in place without */
			be->layernorm_forward(be, dout, dm, dr, dx, dw, db, T, C, 1e-5f);
			cpu->layernorm_forward(cpu, cout, cm, cr, cx, cw, cb, T, C, 1e-5f);
			be->layernorm_forward(be, dx, NULL, NULL, dx, dw, db, T, C, 1e-5f);
			snprintf(shape, sizeof(shape), "T %d, C %d", T, C);
			got = get(be, dout, n * 4);
			ref = get(cpu, cout, n * 4);
			CHECK(report("layernorm", shape, tb[b].label, nerr(got, ref, n), TOL_F32));
			free(got);
			got = get(be, dx, n * 4);
			CHECK(report("layernorm", "in place", tb[b].label, nerr(got, ref, n), TOL_F32));
			free(got);
			free(ref);
			got = get(be, dm, T * 4);
			ref = get(cpu, cm, T * 4);
			CHECK(report("layernorm", "mean", tb[b].label, nerr(got, ref, T), TOL_F32));
			free(got);
			free(ref);
			got = get(be, dr, T * 4);
			ref = get(cpu, cr, T * 4);
			CHECK(report("layernorm", "rstd", tb[b].label, nerr(got, ref, T), TOL_F32));
			free(got);
			free(ref);
			free(x);
			free(w);
			free(bias);
			be->free(be, dx), be->free(be, dw), be->free(be, db);
			be->free(be, dout), be->free(be, dm), be->free(be, dr);
			cpu->free(cpu, cx), cpu->free(cpu, cw), cpu->free(cpu, cb);
			cpu->free(cpu, cout), cpu->free(cpu, cm), cpu->free(cpu, cr);
		}
}

/* --- matrix product --- */

typedef struct mm_case
{
	int			M,
				K,
				N,
				bias,
				accumulate,
				exact;			/* inputs bfloat16 holds exactly */
} mm_case;

/* One product on backend tb against the CPU with the weights tb stores. */
static int
matmul_case(const test_backend *tb, const mm_case *mc)
{
	dl_backend *be = tb->be,
			   *cpu = reference_backend();
	uint64_t	s = new_seed();
	int			M = mc->M,
				K = mc->K,
				N = mc->N;
	float	   *in = randv((size_t) M * K, 1.0f, &s),
			   *W = randv((size_t) N * K, 0.05f, &s),
			   *bias = randv(N, 1.0f, &s),
			   *out0 = randv((size_t) M * N, 1.0f, &s),
			   *eff,
			   *got,
			   *ref;
	void	   *dW,
			   *cW,
			   *din,
			   *cin,
			   *dbias,
			   *cbias,
			   *dout,
			   *cout;
	double		e,
				tol = tb->bf16_products && !mc->exact ? TOL_BF16 : TOL_F32;
	char		shape[80];

	if (tb->bf16_products && mc->exact)
	{
		round_bf16(in, (size_t) M * K);
		round_bf16(W, (size_t) N * K);
	}
	dW = put_weights(be, W, N, K, &eff);
	cW = put(cpu, eff, (size_t) N * K * 4);
	din = put(be, in, (size_t) M * K * 4);
	cin = put(cpu, in, (size_t) M * K * 4);
	dbias = put(be, bias, N * 4);
	cbias = put(cpu, bias, N * 4);
	/* accumulate adds to what is there; otherwise every element must be written */
	dout = put(be, mc->accumulate ? out0 : NULL, (size_t) M * N * 4);
	cout = put(cpu, out0, (size_t) M * N * 4);
	be->matmul_forward(be, dout, din, dW, mc->bias ? dbias : NULL, M, K, N, mc->accumulate);
	cpu->matmul_forward(cpu, cout, cin, cW, mc->bias ? cbias : NULL, M, K, N, mc->accumulate);
	got = get(be, dout, (size_t) M * N * 4);
	ref = get(cpu, cout, (size_t) M * N * 4);
	e = nerr(got, ref, (size_t) M * N);
	snprintf(shape, sizeof(shape), "M %d K %d N %d%s%s%s", M, K, N, mc->bias ? " +bias" : "",
			 mc->accumulate ? " +=" : "", mc->exact ? "" : " inexact");
	be->free(be, dW), be->free(be, din), be->free(be, dbias), be->free(be, dout);
	cpu->free(cpu, cW), cpu->free(cpu, cin), cpu->free(cpu, cbias), cpu->free(cpu, cout);
	free(in), free(W), free(bias), free(out0), free(eff), free(got), free(ref);
	return report("matmul", shape, tb->label, e, tol);
}

TEST(ops_matmul)
{
	/* M <= 8 with K a multiple of 8 takes the skinny kernel, the rest cuBLAS */
	static const mm_case cases[] = {
		{1, 4096, 4096, 0, 1, 1}, {1, 32, 96, 0, 0, 1}, {2, 1024, 3072, 1, 0, 1},
		{3, 64, 101, 1, 1, 1}, {8, 256, 64, 1, 0, 1}, {9, 128, 130, 1, 1, 1},
		{64, 512, 520, 0, 1, 1}, {5, 33, 17, 1, 0, 1}, {33, 4096, 512, 1, 1, 1},
		{4, 1000, 300, 1, 1, 0}, {40, 1000, 300, 1, 1, 0},
	};

	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
		for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++)
			CHECK(matmul_case(&tb[b], &cases[k]));
}

/* --- rotary --- */

/* Rotary on the q and k heads of qkv rows, both layouts, against the CPU. */
static int
rotary_case(const test_backend *tb, int H, int D, int rot, int T, int interleaved)
{
	dl_backend *be = tb->be,
			   *cpu = reference_backend();
	uint64_t	s = new_seed();
	int			C = H * D,
				P = 2048;
	size_t		n = (size_t) T * 3 * C;
	float	   *x = randv(n, 1.0f, &s),
			   *tab = malloc((size_t) P * rot * sizeof(float)),
			   *got,
			   *ref;
	int32_t    *pos = malloc(T * sizeof(int32_t));
	void	   *dx,
			   *cx,
			   *dtab,
			   *ctab,
			   *dpos,
			   *cpos;
	double		e;
	char		shape[80];

	for (int p = 0; p < P; p++)
		for (int j = 0; j < rot / 2; j++)
		{
			float		th = (float) p / powf(10000.0f, 2.0f * j / rot);

			tab[(size_t) p * rot + j] = cosf(th);
			tab[(size_t) p * rot + rot / 2 + j] = sinf(th);
		}
	for (int t = 0; t < T; t++)
		pos[t] = (int32_t) ((frand(&s) + 1.0f) / 2 * P) % P;
	dx = put(be, x, n * 4), cx = put(cpu, x, n * 4);
	dtab = put(be, tab, (size_t) P * rot * 4), ctab = put(cpu, tab, (size_t) P * rot * 4);
	dpos = put(be, pos, T * 4), cpos = put(cpu, pos, T * 4);
	be->rotary_forward(be, dx, 3 * C, T, 2 * H, D, rot, interleaved, dpos, dtab);
	cpu->rotary_forward(cpu, cx, 3 * C, T, 2 * H, D, rot, interleaved, cpos, ctab);
	got = get(be, dx, n * 4);
	ref = get(cpu, cx, n * 4);
	e = nerr(got, ref, n);
	snprintf(shape, sizeof(shape), "H %d D %d rot %d T %d %s", H, D, rot, T,
			 interleaved ? "GPT-J" : "NeoX");
	be->free(be, dx), be->free(be, dtab), be->free(be, dpos);
	cpu->free(cpu, cx), cpu->free(cpu, ctab), cpu->free(cpu, cpos);
	free(x), free(tab), free(pos), free(got), free(ref);
	return report("rotary", shape, tb->label, e, TOL_F32);
}

TEST(ops_rotary)
{
	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
		for (int il = 0; il < 2; il++)
		{
			CHECK(rotary_case(&tb[b], 4, 16, 8, 6, il));
			CHECK(rotary_case(&tb[b], 16, 256, 64, 3, il));
			CHECK(rotary_case(&tb[b], 3, 80, 20, 37, il));
		}
}

/* --- GELU --- */

TEST(ops_gelu)
{
	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
		for (int form = 0; form < 2; form++)
		{
			dl_backend *be = tb[b].be,
					   *cpu = reference_backend();
			uint64_t	s = new_seed();
			size_t		n = 100003;
			float	   *x = randv(n, 6.0f, &s),
					   *got,
					   *ref;
			void	   *dx = put(be, x, n * 4),
					   *dout = put(be, NULL, n * 4),
					   *cx = put(cpu, x, n * 4);
			dl_gelu		f = form ? DL_GELU_ERF : DL_GELU_TANH;
			const char *name = form ? "gelu erf" : "gelu tanh";

			be->gelu_forward(be, dout, dx, n, f);
			cpu->gelu_forward(cpu, cx, cx, n, f);
			be->gelu_forward(be, dx, dx, n, f);
			got = get(be, dout, n * 4);
			ref = get(cpu, cx, n * 4);
			CHECK(report(name, "n 100003", tb[b].label, nerr(got, ref, n), TOL_F32));
			free(got);
			got = get(be, dx, n * 4);
			CHECK(report(name, "n 100003, in place", tb[b].label, nerr(got, ref, n), TOL_F32));
			free(got), free(ref), free(x);
			be->free(be, dx), be->free(be, dout);
			cpu->free(cpu, cx);
		}
}

/* --- attention --- */

#define MAX_SPANS 64

/* A batch for attention: heads, head size, cache geometry and the spans (len, slot, pos). */
typedef struct attn_case
{
	const char *what;
	int			H,
				D,
				max_ctx,
				n_slots,
				n;
	int			span[MAX_SPANS][3];
	int			(*many)[3];		/* instead of span, for more than MAX_SPANS spans */
} attn_case;

/*
 * One batch on backend tb and on the CPU from the same random cache and qkv (bfloat16
 * values on a bfloat16 backend): the outputs within TOL_F32, the caches afterwards
 * (old contents and the new tokens' k and v) identical.
 */
static int
attention_case(const test_backend *tb, const attn_case *ac)
{
	dl_backend *be = tb->be,
			   *cpu = reference_backend();
	uint64_t	s = new_seed();
	int			C = ac->H * ac->D,
				T = 0;
	size_t		ncache = (size_t) ac->n_slots * ac->max_ctx * C;
	dl_span    *spans = malloc(sizeof(dl_span) * ac->n);
	float	   *kc,
			   *vc,
			   *qkv,
			   *got,
			   *ref,
			   *gk,
			   *gv,
			   *rk,
			   *rv;
	void	   *raw,
			   *d_k,
			   *d_v,
			   *c_k,
			   *c_v,
			   *d_qkv,
			   *c_qkv,
			   *d_out,
			   *c_out,
			   *d_ws,
			   *c_ws,
			   *d_sp,
			   *c_sp;
	dl_spans	ds,
				cs;
	double		e,
				ek,
				ev;
	int			ok;
	char		shape[120];

	for (int i = 0; i < ac->n; i++)
	{
		const int  *sp = ac->many ? ac->many[i] : ac->span[i];

		spans[i] = (dl_span) {T, sp[0], sp[1], sp[2]};
		T += sp[0];
	}
	kc = randv(ncache, 1.0f, &s);
	vc = randv(ncache, 1.0f, &s);
	qkv = randv((size_t) T * 3 * C, 1.0f, &s);
	if (is_bf16(be))
	{
		round_bf16(kc, ncache);
		round_bf16(vc, ncache);
		round_bf16(qkv, (size_t) T * 3 * C);
	}
	d_k = put_kv(be, kc, ncache), d_v = put_kv(be, vc, ncache);
	c_k = put(cpu, kc, ncache * 4), c_v = put(cpu, vc, ncache * 4);
	d_qkv = put(be, qkv, (size_t) T * 3 * C * 4), c_qkv = put(cpu, qkv, (size_t) T * 3 * C * 4);
	d_out = put(be, NULL, (size_t) T * C * 4), c_out = put(cpu, NULL, (size_t) T * C * 4);
	d_ws = put(be, NULL, be->attention_workspace(be, ac->max_ctx));
	c_ws = put(cpu, NULL, cpu->attention_workspace(cpu, ac->max_ctx));
	d_sp = put(be, spans, ac->n * sizeof(dl_span)), c_sp = put(cpu, spans, ac->n * sizeof(dl_span));
	ds = (dl_spans) {ac->n, spans, d_sp};
	cs = (dl_spans) {ac->n, spans, c_sp};

	be->attention_forward(be, d_out, d_qkv, d_k, d_v, ac->max_ctx, &ds, ac->H, ac->D,
						  1.0f / sqrtf((float) ac->D), d_ws);
	cpu->attention_forward(cpu, c_out, c_qkv, c_k, c_v, ac->max_ctx, &cs, ac->H, ac->D,
						   1.0f / sqrtf((float) ac->D), c_ws);
	got = get(be, d_out, (size_t) T * C * 4);
	ref = get(cpu, c_out, (size_t) T * C * 4);
	e = nerr(got, ref, (size_t) T * C);
	raw = get(be, d_k, ncache * be->kv_elem_size);
	gk = widen(raw, ncache, be->kv_elem_size);
	free(raw);
	raw = get(be, d_v, ncache * be->kv_elem_size);
	gv = widen(raw, ncache, be->kv_elem_size);
	free(raw);
	rk = get(cpu, c_k, ncache * 4);
	rv = get(cpu, c_v, ncache * 4);
	ek = nerr(gk, rk, ncache);
	ev = nerr(gv, rv, ncache);

	snprintf(shape, sizeof(shape), "%s: H %d D %d, %d spans, T %d", ac->what, ac->H, ac->D,
			 ac->n, T);
	ok = report("attention", shape, tb->label, e, TOL_F32);
	ok = report("attention", "  k cache after", tb->label, ek, 0) && ok;
	ok = report("attention", "  v cache after", tb->label, ev, 0) && ok;
	be->free(be, d_k), be->free(be, d_v), be->free(be, d_qkv), be->free(be, d_out);
	be->free(be, d_ws), be->free(be, d_sp);
	cpu->free(cpu, c_k), cpu->free(cpu, c_v), cpu->free(cpu, c_qkv), cpu->free(cpu, c_out);
	cpu->free(cpu, c_ws), cpu->free(cpu, c_sp);
	free(kc), free(vc), free(qkv), free(got), free(ref), free(gk), free(gv), free(rk), free(rv);
	free(spans);
	return ok;
}

TEST(ops_attention)
{
	/* spans as {len, slot, pos}: prefill from 0, prefill after a cached prefix, decode */
	static attn_case cases[] = {
		{"fixture-sized mix", 4, 8, 128, 5, 5, {{7, 0, 0}, {1, 1, 5}, {40, 2, 3}, {1, 3, 0}, {33, 4, 0}}, NULL},
		{"prefill after prefix", 2, 16, 256, 3, 3, {{1, 0, 200}, {100, 1, 150}, {2, 2, 0}}, NULL},
		{"GPT-J heads, split decode", 4, 256, 1024, 3, 3, {{1, 0, 700}, {70, 1, 0}, {1, 2, 1}}, NULL},
		{"dolly-v2-3b heads", 3, 80, 512, 3, 3, {{33, 0, 10}, {1, 1, 300}, {1, 2, 511}}, NULL},
		{"9 decodes", 2, 128, 300, 9, 9, {{1, 0, 0}, {1, 1, 1}, {1, 2, 5}, {1, 3, 63}, {1, 4, 64},
		{1, 5, 65}, {1, 6, 127}, {1, 7, 200}, {1, 8, 299}}, NULL},
		{"head_dim 12", 2, 12, 64, 3, 3, {{5, 0, 0}, {1, 1, 10}, {20, 2, 30}}, NULL},
		{"head_dim 6", 1, 6, 40, 2, 2, {{1, 0, 39}, {3, 1, 2}}, NULL},
		{"64 decodes", 2, 64, 160, 64, 64, {{0}}, NULL},
	};
	attn_case  *many = &cases[sizeof(cases) / sizeof(cases[0]) - 1];
	uint64_t	s = new_seed();

	BACKENDS_OR_SKIP(tb, nb);
	for (int i = 0; i < many->n; i++)
	{
		many->span[i][0] = 1;
		many->span[i][1] = i;
		many->span[i][2] = (int) ((frand(&s) + 1.0f) / 2 * many->max_ctx) % many->max_ctx;
	}
	for (int b = 0; b < nb; b++)
		for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++)
			CHECK(attention_case(&tb[b], &cases[k]));
}

/*
 * A fault that breaks the GPU context (sticky: every later call fails) is reported as a
 * backend failure by the operations that allocate scratch memory, not as a full GPU: the
 * model server restarts a failed context, and only that. Needs the emulated plugin's fault
 * injection ($EMU_FAIL_ONCE, $EMU_FAIL_STICKY); a real GPU skips.
 */
TEST(ops_fault_is_not_out_of_memory)
{
	const char *plugin = getenv("DOLLY_CUDA_PLUGIN");
	char		flag[] = "/tmp/dolly-emu-fault-XXXXXX";
	test_backend t = {"cuda:0/mixed, faulted", NULL, 1};
	dl_error	err;
	dl_status	st;
	void	   *p;
	int			fd;

	BACKENDS_OR_SKIP(tb, nb);
	(void) tb;
	CHECK_OK(backend_cuda_create(plugin ? plugin : "./dolly_cuda.so", 0, DL_CUDA_MIXED, &t.be, &err), &err);
	CHECK((fd = mkstemp(flag)) >= 0);
	close(fd);
	setenv("EMU_FAIL_ONCE", flag, 1);
	setenv("EMU_FAIL_STICKY", "1", 1);
	p = t.be->alloc(t.be, 4096, &err);
	if (p)
		t.be->zero(t.be, p, 4096);
	/* the first launch faults; its error is the pending one */
	t.be->gelu_forward(t.be, p, p, 1024, DL_GELU_TANH);
	st = t.be->synchronize(t.be, &err);
	unsetenv("EMU_FAIL_ONCE");
	unsetenv("EMU_FAIL_STICKY");
	if (st == DL_OK)
	{
		unlink(flag);
		t.be->free(t.be, p);
		t.be->destroy(t.be);
		SKIP("no fault injected: not the emulated plugin");
	}
	CHECKF(st == DL_EBACKEND, "the fault itself: %d %s", st, err.msg);
	/* then an operation that grows its scratch buffer (the layer norm's backward) */
	t.be->layernorm_backward(t.be, p, p, p, p, p, p, p, p, 64, 4096);
	st = t.be->synchronize(t.be, &err);
	CHECKF(st == DL_EBACKEND, "after a fault, a failed scratch allocation is %d (%s), not a backend failure",
		   st, err.msg);
	t.be->free(t.be, p);
	t.be->destroy(t.be);
}

/*
 * More sequences in one pass than a grid's y and z dimensions take (65,535): 65,536 decodes
 * and a prefill of two tokens, each in its own cache slot; the kernels launch in groups of
 * spans (a launch of 65,536 fails on a GPU, and in the emulator).
 */
TEST(ops_attention_many_sequences)
{
	attn_case	ac = {"65,536 decodes and a prefill", 1, 8, 4, 65537, 65537, {{0}}, NULL};
	uint64_t	s = new_seed();

	BACKENDS_OR_SKIP(tb, nb);
	ac.many = malloc(sizeof(*ac.many) * ac.n);
	CHECK(ac.many != NULL);
	for (int i = 0; i < ac.n; i++)
	{
		ac.many[i][0] = i == ac.n - 1 ? 2 : 1;
		ac.many[i][1] = i;
		ac.many[i][2] = i == ac.n - 1 ? 0 : (int) ((frand(&s) + 1.0f) / 2 * ac.max_ctx) % ac.max_ctx;
	}
	for (int b = 0; b < nb; b++)
		if (!attention_case(&tb[b], &ac))
		{
			free(ac.many);
			CHECK(0);
		}
	free(ac.many);
}

/* --- training operations --- */

/* The same host data on the backend under test (d) and on the reference (c). */
typedef struct twin
{
	void	   *d;
	void	   *c;
	size_t		bytes;
} twin;

/* bytes from host on both (host NULL: NaN poison on both). */
static twin
twin_put(dl_backend *be, const void *host, size_t bytes)
{
	twin		t = {put(be, host, bytes), put(reference_backend(), host, bytes), bytes};

	return t;
}

static void
twin_free(dl_backend *be, twin *t)
{
	be->free(be, t->d);
	reference_backend()->free(reference_backend(), t->c);
}

/* Report ||d - c|| / ||c|| of the n floats of t as case (op, shape) of tb. */
static int
twin_check(const test_backend *tb, const twin *t, size_t n, const char *op, const char *shape,
		   double tol)
{
	float	   *got = get(tb->be, t->d, n * 4),
			   *ref = get(reference_backend(), t->c, n * 4);
	double		e = nerr(got, ref, n);

	free(got);
	free(ref);
	return report(op, shape, tb->label, e, tol);
}

/* n random floats times scale, rounded to bfloat16 when round (malloc'd). */
static float *
randv_r(size_t n, float scale, uint64_t *s, int round)
{
	float	   *v = randv(n, scale, s);

	if (round)
		round_bf16(v, n);
	return v;
}

/*
 * One matrix-product backward: din, dW and dbias start from random values (they
 * accumulate). With exact, every operand is one that bfloat16 holds, so that products on
 * bfloat16 tensor cores differ from the reference only in summation order.
 */
static int
matmul_backward_case(const test_backend *tb, int M, int K, int N, int with_din, int with_bias,
					 int exact)
{
	dl_backend *be = tb->be,
			   *cpu = reference_backend();
	uint64_t	s = new_seed();
	int			round = tb->bf16_products && exact;
	float	   *W = randv_r((size_t) N * K, 0.05f, &s, round),
			   *in = randv_r((size_t) M * K, 1.0f, &s, round),
			   *dout = randv_r((size_t) M * N, 1.0f, &s, round),
			   *din0 = randv((size_t) M * K, 1.0f, &s),
			   *dW0 = randv((size_t) N * K, 1.0f, &s),
			   *db0 = randv(N, 1.0f, &s),
			   *eff;
	void	   *dWt = put_weights(be, W, N, K, &eff);
	void	   *cWt = put(cpu, eff, (size_t) N * K * 4);
	twin		tin = twin_put(be, in, (size_t) M * K * 4),
				tdout = twin_put(be, dout, (size_t) M * N * 4),
				tdin = twin_put(be, din0, (size_t) M * K * 4),
				tdW = twin_put(be, dW0, (size_t) N * K * 4),
				tdb = twin_put(be, db0, N * 4);
	double		tol = tb->bf16_products && !exact ? TOL_BF16 : TOL_F32;
	char		shape[80];
	int			ok;

	be->matmul_backward(be, with_din ? tdin.d : NULL, tdW.d, with_bias ? tdb.d : NULL, tdout.d,
						tin.d, dWt, M, K, N);
	cpu->matmul_backward(cpu, with_din ? tdin.c : NULL, tdW.c, with_bias ? tdb.c : NULL, tdout.c,
						 tin.c, cWt, M, K, N);
	snprintf(shape, sizeof(shape), "M %d K %d N %d%s%s%s", M, K, N, with_din ? "" : " no din",
			 with_bias ? " +bias" : "", exact ? "" : " inexact");
	ok = twin_check(tb, &tdW, (size_t) N * K, "matmul_bwd dW", shape, tol);
	ok = twin_check(tb, &tdin, (size_t) M * K, "matmul_bwd din", shape, tol) && ok;
	ok = twin_check(tb, &tdb, N, "matmul_bwd dbias", shape, TOL_F32) && ok;
	be->free(be, dWt);
	cpu->free(cpu, cWt);
	twin_free(be, &tin), twin_free(be, &tdout), twin_free(be, &tdin);
	twin_free(be, &tdW), twin_free(be, &tdb);
	free(W), free(in), free(dout), free(din0), free(dW0), free(db0), free(eff);
	return ok;
}

TEST(ops_matmul_backward)
{
	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
	{
		CHECK(matmul_backward_case(&tb[b], 1, 64, 96, 1, 1, 1));
		CHECK(matmul_backward_case(&tb[b], 37, 128, 130, 1, 1, 1));
		CHECK(matmul_backward_case(&tb[b], 300, 64, 33, 0, 1, 1));
		CHECK(matmul_backward_case(&tb[b], 700, 96, 40, 1, 0, 1));
		CHECK(matmul_backward_case(&tb[b], 40, 1000, 300, 1, 1, 0));
	}
}

/* The layer norm's backward of T rows of C on tb against the CPU backend; 1 when it agrees. */
static int
layernorm_backward_case(const test_backend *tb, int T, int C)
{
	dl_backend *be = tb->be,
			   *cpu = reference_backend();
	uint64_t	s = new_seed();
	size_t		n = (size_t) T * C;
	float	   *x = randv(n, 2.0f, &s),
			   *w = randv(C, 1.0f, &s),
			   *g = randv(n, 1.0f, &s),
			   *din0 = randv(n, 1.0f, &s),
			   *dw0 = randv(C, 1.0f, &s),
			   *db0 = randv(C, 1.0f, &s),
			   *mean,
			   *rstd;
	twin		tx = twin_put(be, x, n * 4),
				tw = twin_put(be, w, C * 4),
				tg = twin_put(be, g, n * 4),
				tdin = twin_put(be, din0, n * 4),
				tdw = twin_put(be, dw0, C * 4),
				tdb = twin_put(be, db0, C * 4),
				tout = twin_put(be, NULL, n * 4),
				tm,
				tr;
	char		shape[64];
	int			ok;

	/* the saved statistics come from the reference forward, the same on both */
	tm = twin_put(be, NULL, T * 4);
	tr = twin_put(be, NULL, T * 4);
	cpu->layernorm_forward(cpu, tout.c, tm.c, tr.c, tx.c, tw.c, tw.c, T, C, 1e-5f);
	mean = get(cpu, tm.c, T * 4);
	rstd = get(cpu, tr.c, T * 4);
	twin_free(be, &tm), twin_free(be, &tr);
	tm = twin_put(be, mean, T * 4);
	tr = twin_put(be, rstd, T * 4);
	be->layernorm_backward(be, tdin.d, tdw.d, tdb.d, tg.d, tx.d, tm.d, tr.d, tw.d, T, C);
	cpu->layernorm_backward(cpu, tdin.c, tdw.c, tdb.c, tg.c, tx.c, tm.c, tr.c, tw.c, T, C);
	snprintf(shape, sizeof(shape), "T %d, C %d", T, C);
	ok = twin_check(tb, &tdin, n, "layernorm_bwd din", shape, TOL_F32) &&
		twin_check(tb, &tdw, C, "layernorm_bwd dw", shape, TOL_F32) &&
		twin_check(tb, &tdb, C, "layernorm_bwd db", shape, TOL_F32);
	twin_free(be, &tx), twin_free(be, &tw), twin_free(be, &tg), twin_free(be, &tdin);
	twin_free(be, &tdw), twin_free(be, &tdb), twin_free(be, &tout);
	twin_free(be, &tm), twin_free(be, &tr);
	free(x), free(w), free(g), free(din0), free(dw0), free(db0), free(mean), free(rstd);
	return ok;
}

TEST(ops_layernorm_backward)
{
	/* 16384: the widest rows a block's shared memory sums on a GPU of 227 KB (sm_90) */
	static const int shapes[][2] = {{1, 512}, {7, 33}, {300, 96}, {5, 2560}, {3, 16384}};

	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
		for (int k = 0; k < 5; k++)
			CHECK(layernorm_backward_case(&tb[b], shapes[k][0], shapes[k][1]));
}

/*
 * A GPU that lets a kernel opt in to 99 KB of shared memory a block (sm_86 and sm_89:
 * A10, A40, L4, L40S, RTX 30 and 40; emulated through $EMU_SMEM_OPTIN, which a real GPU
 * ignores for its own limit): the backend is created (the layer norm's backward once
 * opted in to 128 KB, which such a GPU refuses, and every creation failed), and rows too
 * wide for its shared memory sum in global memory.
 */
TEST(ops_small_shared_memory_gpu)
{
	const char *plugin = getenv("DOLLY_CUDA_PLUGIN");
	test_backend small = {"cuda:0/mixed, 99 KB opt-in", NULL, 1};
	dl_error	err;
	dl_status	st;

	BACKENDS_OR_SKIP(tb, nb);
	(void) tb;
	setenv("EMU_SMEM_OPTIN", "101376", 1);
	st = backend_cuda_create(plugin ? plugin : "./dolly_cuda.so", 0, DL_CUDA_MIXED, &small.be, &err);
	unsetenv("EMU_SMEM_OPTIN");
	CHECK_OK(st, &err);
	CHECK(layernorm_backward_case(&small, 5, 2560));
	CHECK(layernorm_backward_case(&small, 3, 16384));
	small.be->destroy(small.be);
}

TEST(ops_embedding_rotary_gelu_backward)
{
	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
	{
		dl_backend *be = tb[b].be,
				   *cpu = reference_backend();
		uint64_t	s = new_seed();
		int			V = 50,
					C = 300,
					T = 40,
					H = 3,
					D = 20,
					rot = 8,
					P = 64;
		size_t		nf = 100003;
		int32_t		ids[40],
					pos[40];
		float	   *table = randv((size_t) V * C, 1.0f, &s),
				   *g = randv((size_t) T * C, 1.0f, &s),
				   *qkv = randv((size_t) T * 3 * H * D, 1.0f, &s),
				   *tab = malloc((size_t) P * rot * sizeof(float)),
				   *x = randv(nf, 6.0f, &s),
				   *gf = randv(nf, 1.0f, &s),
				   *din0 = randv(nf, 1.0f, &s);
		twin		tids,
					tpos,
					ttab,
					tq,
					tt = twin_put(be, table, (size_t) V * C * 4),
					tg = twin_put(be, g, (size_t) T * C * 4);

		/* many repeats of few ids: the scatter's adds meet */
		for (int t = 0; t < T; t++)
		{
			ids[t] = (int32_t) ((frand(&s) + 1.0f) / 2 * 7) % 7 * 7;
			pos[t] = (int32_t) ((frand(&s) + 1.0f) / 2 * P) % P;
		}
		tids = twin_put(be, ids, sizeof(ids));
		be->embedding_backward(be, tt.d, tg.d, tids.d, T, C);
		cpu->embedding_backward(cpu, tt.c, tg.c, tids.c, T, C);
		CHECK(twin_check(&tb[b], &tt, (size_t) V * C, "embedding_bwd", "V 50 C 300 T 40 (7 ids)", TOL_F32));

		for (int p = 0; p < P; p++)
			for (int j = 0; j < rot / 2; j++)
			{
				tab[(size_t) p * rot + j] = cosf(p * powf(10000.0f, -2.0f * j / rot));
				tab[(size_t) p * rot + rot / 2 + j] = sinf(p * powf(10000.0f, -2.0f * j / rot));
			}
		tpos = twin_put(be, pos, sizeof(pos));
		ttab = twin_put(be, tab, (size_t) P * rot * 4);
		for (int il = 0; il < 2; il++)
		{
			tq = twin_put(be, qkv, (size_t) T * 3 * H * D * 4);
			be->rotary_backward(be, tq.d, 3 * H * D, T, 2 * H, D, rot, il, tpos.d, ttab.d);
			cpu->rotary_backward(cpu, tq.c, 3 * H * D, T, 2 * H, D, rot, il, tpos.c, ttab.c);
			CHECK(twin_check(&tb[b], &tq, (size_t) T * 3 * H * D, "rotary_bwd",
							 il ? "H 3 D 20 rot 8 T 40 GPT-J" : "H 3 D 20 rot 8 T 40 NeoX", TOL_F32));
			twin_free(be, &tq);
		}

		for (int form = 0; form < 2; form++)
		{
			twin		tx = twin_put(be, x, nf * 4),
						tgf = twin_put(be, gf, nf * 4),
						td = twin_put(be, din0, nf * 4);

			be->gelu_backward(be, td.d, tx.d, tgf.d, nf, form ? DL_GELU_ERF : DL_GELU_TANH);
			cpu->gelu_backward(cpu, td.c, tx.c, tgf.c, nf, form ? DL_GELU_ERF : DL_GELU_TANH);
			CHECK(twin_check(&tb[b], &td, nf, form ? "gelu_bwd erf" : "gelu_bwd tanh", "n 100003", TOL_F32));
			twin_free(be, &tx), twin_free(be, &tgf), twin_free(be, &td);
		}
		twin_free(be, &tids), twin_free(be, &tpos), twin_free(be, &ttab);
		twin_free(be, &tt), twin_free(be, &tg);
		free(table), free(g), free(qkv), free(tab), free(x), free(gf), free(din0);
	}
}

/* Cross-entropy of T rows of V logits (every third row masked): losses, gradient out of place and in place. */
static int
crossentropy_case(const test_backend *tb, int T, int V)
{
	dl_backend *be = tb->be,
			   *cpu = reference_backend();
	uint64_t	s = new_seed();
	size_t		n = (size_t) T * V;
	float	   *x = randv(n, 8.0f, &s);
	int32_t    *y = malloc(T * sizeof(int32_t));
	twin		tx,
				ty,
				tl = twin_put(be, NULL, T * 4),
				td = twin_put(be, NULL, n * 4);
	char		shape[64];
	int			ok;

	for (int t = 0; t < T; t++)
		y[t] = t % 3 == 2 ? -100 : (int32_t) ((frand(&s) + 1.0f) / 2 * V) % V;
	tx = twin_put(be, x, n * 4);
	ty = twin_put(be, y, T * 4);
	be->crossentropy_forward(be, tl.d, td.d, tx.d, ty.d, T, V);
	cpu->crossentropy_forward(cpu, tl.c, td.c, tx.c, ty.c, T, V);
	snprintf(shape, sizeof(shape), "T %d V %d, 1/3 masked", T, V);
	ok = twin_check(tb, &tl, T, "crossentropy", shape, TOL_F32);
	ok = twin_check(tb, &td, n, "crossentropy grad", shape, TOL_F32) && ok;
	be->crossentropy_forward(be, tl.d, tx.d, tx.d, ty.d, T, V);
	cpu->crossentropy_forward(cpu, tl.c, tx.c, tx.c, ty.c, T, V);
	ok = twin_check(tb, &tx, n, "crossentropy grad", "  in place", TOL_F32) && ok;
	twin_free(be, &tx), twin_free(be, &ty), twin_free(be, &tl), twin_free(be, &td);
	free(x), free(y);
	return ok;
}

TEST(ops_crossentropy)
{
	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
	{
		CHECK(crossentropy_case(&tb[b], 6, 50400));
		CHECK(crossentropy_case(&tb[b], 33, 1001));
	}
}

TEST(ops_sum_squares_adamw)
{
	static const size_t sizes[] = {1, 1000, 3000017};

	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
	{
		dl_backend *be = tb[b].be,
				   *cpu = reference_backend();
		dl_error	err;

		for (int k = 0; k < 3; k++)
		{
			uint64_t	s = new_seed();
			size_t		n = sizes[k];
			float	   *g = randv(n, 1.0f, &s);
			void	   *dg = put(be, g, n * 4);
			double		got = -1,
						want = 0;
			char		shape[32];

			for (size_t i = 0; i < n; i++)
				want += (double) g[i] * g[i];
			CHECK_OK(be->sum_squares(be, dg, n, &got, &err), &err);
			snprintf(shape, sizeof(shape), "n %zu", n);
			CHECK(report("sum_squares", shape, tb[b].label, fabs(got - want) / want, 1e-10));
			be->free(be, dg);
			free(g);
		}
		for (int step = 1; step <= 3; step += 2)
		{
			uint64_t	s = new_seed();
			size_t		n = 100003;
			float	   *p = randv(n, 1.0f, &s),
					   *g = randv(n, 10.0f, &s),
					   *m = randv(n, 0.1f, &s),
					   *v = randv(n, 0.1f, &s);
			dl_adamw	h = {1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f, 0.25f, step};
			twin		tp,
						tg = twin_put(be, g, n * 4),
						tm = twin_put(be, m, n * 4),
						tv;

			for (size_t i = 0; i < n; i++)
				v[i] = fabsf(v[i]);
			tp = twin_put(be, p, n * 4);
			tv = twin_put(be, v, n * 4);
			be->adamw_update(be, tp.d, tg.d, tm.d, tv.d, n, &h);
			cpu->adamw_update(cpu, tp.c, tg.c, tm.c, tv.c, n, &h);
			CHECK(twin_check(&tb[b], &tp, n, "adamw param", step == 1 ? "step 1, decay" : "step 3, decay", 1e-6));
			CHECK(twin_check(&tb[b], &tm, n, "adamw m", "", 1e-6));
			CHECK(twin_check(&tb[b], &tv, n, "adamw v", "", 1e-6));
			twin_free(be, &tp), twin_free(be, &tg), twin_free(be, &tm), twin_free(be, &tv);
			free(p), free(g), free(m), free(v);
		}
	}
}

/* --- training attention --- */

/*
 * With bfloat16 products the probabilities, then their gradients, enter products rounded
 * (2^-9 relative each) however exact the inputs are.
 */
#define TOL_BF16_ATTN 2e-2

/* A batch of independent causal sequences: heads, head size and the spans' lengths. */
typedef struct attn_train_case
{
	const char *what;
	int			H,
				D,
				n;
	int			len[MAX_SPANS];
} attn_train_case;

/* got - base against ref - base, n floats: the error of what an operation added. */
static double
nerr_added(float *got, float *ref, const float *base, size_t n)
{
	for (size_t i = 0; i < n; i++)
	{
		got[i] -= base[i];
		ref[i] -= base[i];
	}
	return nerr(got, ref, n);
}

/*
 * One batch on backend tb and on the CPU from the same qkv and dout (bfloat16 values where
 * tb rounds product operands): the forward's out and lse; then the backward, both sides
 * from the reference's out and lse, adding to the same random dqkv (what it added is
 * compared, so overwriting fails).
 */
static int
attention_train_case(const test_backend *tb, const attn_train_case *ac)
{
	dl_backend *be = tb->be,
			   *cpu = reference_backend();
	uint64_t	s = new_seed();
	int			H = ac->H,
				D = ac->D,
				C = H * D,
				T = 0,
				longest = 1;
	float		scale = 1.0f / sqrtf((float) D);
	double		tol = tb->bf16_products ? TOL_BF16_ATTN : TOL_F32,
				eo,
				el,
				eg;
	dl_span		spans[MAX_SPANS];
	dl_spans	ds,
				cs;
	float	   *qkv,
			   *dout,
			   *dq0,
			   *got,
			   *ref,
			   *ref_out,
			   *ref_lse;
	void	   *d_qkv,
			   *c_qkv,
			   *d_out,
			   *c_out,
			   *d_lse,
			   *c_lse,
			   *d_dout,
			   *c_dout,
			   *d_dq,
			   *c_dq,
			   *d_ws,
			   *c_ws,
			   *d_sp,
			   *c_sp;
	int			ok;
	char		shape[120];

	for (int i = 0; i < ac->n; i++)
	{
		spans[i] = (dl_span) {T, ac->len[i], 0, 0};
		T += ac->len[i];
		longest = ac->len[i] > longest ? ac->len[i] : longest;
	}
	qkv = randv((size_t) T * 3 * C, 1.0f, &s);
	dout = randv((size_t) T * C, 1.0f, &s);
	dq0 = randv((size_t) T * 3 * C, 1.0f, &s);
	if (tb->bf16_products)
	{
		round_bf16(qkv, (size_t) T * 3 * C);
		round_bf16(dout, (size_t) T * C);
	}
	d_qkv = put(be, qkv, (size_t) T * 3 * C * 4), c_qkv = put(cpu, qkv, (size_t) T * 3 * C * 4);
	d_out = put(be, NULL, (size_t) T * C * 4), c_out = put(cpu, NULL, (size_t) T * C * 4);
	d_lse = put(be, NULL, (size_t) T * H * 4), c_lse = put(cpu, NULL, (size_t) T * H * 4);
	d_ws = put(be, NULL, be->attention_train_workspace(be, longest, H));
	c_ws = put(cpu, NULL, cpu->attention_train_workspace(cpu, longest, H));
	d_sp = put(be, spans, ac->n * sizeof(dl_span)), c_sp = put(cpu, spans, ac->n * sizeof(dl_span));
	ds = (dl_spans) {ac->n, spans, d_sp};
	cs = (dl_spans) {ac->n, spans, c_sp};

	be->attention_train_forward(be, d_out, d_lse, d_qkv, &ds, H, D, scale, d_ws);
	cpu->attention_train_forward(cpu, c_out, c_lse, c_qkv, &cs, H, D, scale, c_ws);
	got = get(be, d_out, (size_t) T * C * 4);
	ref_out = get(cpu, c_out, (size_t) T * C * 4);
	eo = nerr(got, ref_out, (size_t) T * C);
	free(got);
	got = get(be, d_lse, (size_t) T * H * 4);
	ref_lse = get(cpu, c_lse, (size_t) T * H * 4);
	el = nerr(got, ref_lse, (size_t) T * H);
	free(got);

	/* the backward under test starts from the reference's out and lse */
	be->free(be, d_out), be->free(be, d_lse);
	d_out = put(be, ref_out, (size_t) T * C * 4), d_lse = put(be, ref_lse, (size_t) T * H * 4);
	d_dout = put(be, dout, (size_t) T * C * 4), c_dout = put(cpu, dout, (size_t) T * C * 4);
	d_dq = put(be, dq0, (size_t) T * 3 * C * 4), c_dq = put(cpu, dq0, (size_t) T * 3 * C * 4);
	be->attention_backward(be, d_dq, d_dout, d_qkv, d_out, d_lse, &ds, H, D, scale, d_ws);
	cpu->attention_backward(cpu, c_dq, c_dout, c_qkv, c_out, c_lse, &cs, H, D, scale, c_ws);
	got = get(be, d_dq, (size_t) T * 3 * C * 4);
	ref = get(cpu, c_dq, (size_t) T * 3 * C * 4);
	eg = nerr_added(got, ref, dq0, (size_t) T * 3 * C);

	snprintf(shape, sizeof(shape), "%s: H %d D %d, T %d", ac->what, H, D, T);
	ok = report("attention_train", shape, tb->label, eo, tol);
	ok = report("attention_train", "  lse", tb->label, el, tol) && ok;
	ok = report("attention_train", "  backward: dqkv +=", tb->label, eg, tol) && ok;
	be->free(be, d_qkv), be->free(be, d_out), be->free(be, d_lse), be->free(be, d_dout);
	be->free(be, d_dq), be->free(be, d_ws), be->free(be, d_sp);
	cpu->free(cpu, c_qkv), cpu->free(cpu, c_out), cpu->free(cpu, c_lse), cpu->free(cpu, c_dout);
	cpu->free(cpu, c_dq), cpu->free(cpu, c_ws), cpu->free(cpu, c_sp);
	free(qkv), free(dout), free(dq0), free(got), free(ref), free(ref_out), free(ref_lse);
	return ok;
}

TEST(ops_attention_train)
{
	static const attn_train_case cases[] = {
		{"one span", 2, 16, 1, {37}},
		{"lengths mixed, with 1", 4, 8, 6, {7, 1, 40, 1, 33, 2}},
		{"GPT-J heads", 16, 256, 3, {20, 1, 9}},
		{"dolly-v2-3b heads", 3, 80, 3, {33, 1, 17}},
		{"head_dim 12", 2, 12, 3, {5, 1, 20}},
		{"head_dim 6", 1, 6, 3, {1, 3, 12}},
		{"spans past one query block", 2, 16, 3, {600, 5, 257}},
	};

	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
		for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++)
			CHECK(attention_train_case(&tb[b], &cases[k]));
}

/* --- sampling --- */

/* Parameter sets the rows of a sampling case cycle through: each warper on and off. */
static const dl_sampling sample_params[] = {
	{0, 1.0f, 0, 1.0f}, {1, 1.0f, 0, 1.0f}, {1, 0.6f, 0, 1.0f}, {1, 1.0f, 1, 1.0f},
	{1, 1.0f, 40, 1.0f}, {1, 1.0f, 0, 0.9f}, {1, 1.4f, 0, 0.5f}, {1, 0.8f, 50, 0.95f},
	{1, 1.0f, 0, 1e-7f}, {1, 2.0f, 1000, 0.999f}, {0, 1.0f, 7, 0.5f}, {1, 1.0f, 0, 0.05f},
};
#define N_SAMPLE_PARAMS ((int) (sizeof(sample_params) / sizeof(sample_params[0])))

/*
 * Rows [R, V] of logits sampled by backend tb and by the CPU backend with the same
 * parameters and uniforms, reported as op; frees logits and rows. A differing token is
 * allowed only at a cumulative boundary: where the CPU, with u moved by 1e-6, draws the
 * backend's token. The case fails on any other difference.
 */
static int
sample_compare(const test_backend *tb, const char *op, float *logits, dl_sample_row *rows, int V,
			   int R)
{
	dl_backend *be = tb->be,
			   *cpu = reference_backend();
	size_t		n = (size_t) R * V;
	float	   *scratch = malloc(3 * (size_t) V * sizeof(float));
	int32_t    *got,
			   *ref;
	void	   *d_lg = put(be, logits, n * 4),
			   *c_lg = put(cpu, logits, n * 4),
			   *d_rows = put(be, rows, R * sizeof(dl_sample_row)),
			   *c_rows = put(cpu, rows, R * sizeof(dl_sample_row)),
			   *d_tok = put(be, NULL, R * sizeof(int32_t)),
			   *c_tok = put(cpu, NULL, R * sizeof(int32_t)),
			   *d_ws = put(be, NULL, be->sample_workspace(be, R, V)),
			   *c_ws = put(cpu, NULL, cpu->sample_workspace(cpu, R, V));
	int			bad = 0,
				boundary = 0;
	char		shape[80];

	be->sample_forward(be, d_tok, d_lg, d_rows, R, V, d_ws);
	cpu->sample_forward(cpu, c_tok, c_lg, c_rows, R, V, c_ws);
	got = get(be, d_tok, R * sizeof(int32_t));
	ref = get(cpu, c_tok, R * sizeof(int32_t));
	for (int r = 0; r < R; r++)
		if (got[r] != ref[r])
		{
			const float *x = logits + (size_t) r * V;
			dl_sample_row lo = rows[r],
						hi = rows[r];
			int32_t    *ids = (int32_t *) (scratch + 2 * (size_t) V);

			lo.u = fmax(0.0, lo.u - 1e-6);
			hi.u = fmin(0x1.fffffffffffffp-1, hi.u + 1e-6);
			if (sample_draw(x, V, &lo, scratch, ids) != got[r] &&
				sample_draw(x, V, &hi, scratch, ids) != got[r])
			{
				fprintf(stderr, "  row %d: %d, the CPU %d\n", r, got[r], ref[r]);
				bad++;
			}
			else
				boundary++;
		}
	be->free(be, d_lg), be->free(be, d_rows), be->free(be, d_tok), be->free(be, d_ws);
	cpu->free(cpu, c_lg), cpu->free(cpu, c_rows), cpu->free(cpu, c_tok), cpu->free(cpu, c_ws);
	free(scratch), free(got), free(ref), free(logits), free(rows);
	snprintf(shape, sizeof(shape), "V %d R %d: %d differ at boundaries", V, R, boundary);
	return report(op, shape, tb->label, (double) bad, 0);
}

/*
 * R rows of V random logits (scales 2 to 16; every fifth row rounded, so with ties;
 * rows with a NaN, greedy and sampled, with -inf entries, all -inf, and with +inf, as R
 * allows), sampled by backend tb and by the CPU (sample_compare).
 */
static int
sample_case(const test_backend *tb, int V, int R)
{
	uint64_t	s = new_seed();
	float	   *logits = randv((size_t) R * V, 1.0f, &s);
	dl_sample_row *rows = malloc(R * sizeof(dl_sample_row));

	for (int r = 0; r < R; r++)
	{
		float	   *x = logits + (size_t) r * V;
		float		scale = 2.0f * (1 + r % 8);

		for (int j = 0; j < V; j++)
			x[j] = r % 5 == 1 ? roundf(x[j] * scale) : x[j] * scale;
		if (r == 3 || r == 12)
			x[V / 2] = NAN;
		if (r == 4 || r == 9)
			for (int j = 0; j < V; j += r == 4 ? 3 : 1)
				x[j] = -INFINITY;
		if (r == 6)
			x[V - 1] = INFINITY;
		rows[r].p = sample_params[r % N_SAMPLE_PARAMS];
		rows[r].u = (frand(&s) + 1.0f) / 2;
	}
	return sample_compare(tb, "sample", logits, rows, V, R);
}

/*
 * Top-p where its select is hardest, over GPT-J's 50,400 tokens, each kind of row with
 * three uniforms: the cut inside a group of tied logits, inside one tie of the whole
 * vocabulary (only ids order it), among logits whose probabilities round to one float,
 * in a peaked row (one token holds nearly all the mass), and top_p next to 0 and 1.
 */
static int
topp_case(const test_backend *tb)
{
	static const struct
	{
		const char *what;
		float		top_p;
	}			kinds[] = {
		{"ties", 0.9f}, {"flat", 0.5f}, {"equal p", 0.37f}, {"peaked", 0.9f},
		{"peaked", 0.99999994f}, {"top_p 1e-7", 1e-7f}, {"top_p 0.01", 0.01f},
		{"top_p 1 - 2^-24", 0.99999994f}, {"top_p 1 - 2^-23", 0.9999999f},
	};
	enum { V = 50400, NK = sizeof(kinds) / sizeof(kinds[0]), R = 3 * NK };
	uint64_t	s = new_seed();
	float	   *logits = randv((size_t) R * V, 1.0f, &s);
	dl_sample_row *rows = malloc(R * sizeof(dl_sample_row));

	for (int r = 0; r < R; r++)
	{
		float	   *x = logits + (size_t) r * V;
		const char *what = kinds[r / 3].what;

		for (int j = 0; j < V; j++)
		{
			if (strcmp(what, "ties") == 0)
				x[j] = roundf(x[j] * 3.0f);
			else if (strcmp(what, "flat") == 0)
				x[j] = 0.0f;
			else if (strcmp(what, "equal p") == 0)
				x[j] = (float) (j % 3) * 1e-7f;		/* exp rounds the three to one p */
			else
				x[j] *= 4.0f;
		}
		if (strncmp(what, "peaked", 6) == 0)
			x[V / 3] = 40.0f;
		rows[r].p = (dl_sampling) {1, 1.0f, 0, kinds[r / 3].top_p};
		rows[r].u = r % 3 == 0 ? 0.0 : r % 3 == 1 ? 0.999999 : (frand(&s) + 1.0f) / 2;
	}
	return sample_compare(tb, "sample top-p", logits, rows, V, R);
}

TEST(ops_sample)
{
	static const int shapes[][2] = {{50400, 64}, {50277, 13}, {1000, 64}, {4097, 24}, {7, 12},
	{1, 3}};

	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
		for (size_t k = 0; k < sizeof(shapes) / sizeof(shapes[0]); k++)
			CHECK(sample_case(&tb[b], shapes[k][0], shapes[k][1]));
}

/* --- LoRA, and the backward operations of a frozen base --- */

/* A LoRA case: which gradients lora_backward is given. */
enum
{
	LORA_DIN = 1, LORA_DA = 2, LORA_DB = 4, LORA_ALL = 7
};

typedef struct lora_case_def
{
	int			M;
	int			K;
	int			N;
	int			r;
	int			col0;			/* out's rows are ldo = col0 + N + 5 apart, the update at col0 */
	float		p;				/* dropout */
	int			grads;			/* LORA_* */
} lora_case_def;

/*
 * One lora_forward then lora_backward on tb against the CPU backend: out, u, then din, dA,
 * dB and du (in u). The products are float32 on every mode (adapters are), so every mode
 * is held to TOL_F32; out, din, dA and dB start from random values (they accumulate), and
 * out's columns outside the update must stay as they were (compared whole).
 */
static int
lora_case(const test_backend *tb, const lora_case_def *lc)
{
	dl_backend *be = tb->be,
			   *cpu = reference_backend();
	uint64_t	s = new_seed();
	int			M = lc->M,
				K = lc->K,
				N = lc->N,
				r = lc->r,
				ldo = lc->col0 + N + 5;
	size_t		nout = (size_t) M * ldo;
	float	   *A = randv((size_t) r * K, 0.1f, &s),
			   *B = randv((size_t) N * r, 0.1f, &s),
			   *in = randv((size_t) M * K, 1.0f, &s),
			   *out0 = randv(nout, 1.0f, &s),
			   *dout = randv(nout, 1.0f, &s),
			   *din0 = randv((size_t) M * K, 1.0f, &s),
			   *dA0 = randv((size_t) r * K, 1.0f, &s),
			   *dB0 = randv((size_t) N * r, 1.0f, &s);
	twin		tA = twin_put(be, A, (size_t) r * K * 4),
				tB = twin_put(be, B, (size_t) N * r * 4),
				tin = twin_put(be, in, (size_t) M * K * 4),
				tout = twin_put(be, out0, nout * 4),
				tdout = twin_put(be, dout, nout * 4),
				tdin = twin_put(be, din0, (size_t) M * K * 4),
				tdA = twin_put(be, dA0, (size_t) r * K * 4),
				tdB = twin_put(be, dB0, (size_t) N * r * 4),
				tu = twin_put(be, NULL, (size_t) M * r * 4),
				tws = twin_put(be, NULL, (size_t) M * K * 4);
	dl_lora_mats wd = {tA.d, tB.d, lc->grads & LORA_DA ? tdA.d : NULL,
	lc->grads & LORA_DB ? tdB.d : NULL, r, 0.75f, lc->p, s},
				wc = {tA.c, tB.c, lc->grads & LORA_DA ? tdA.c : NULL,
	lc->grads & LORA_DB ? tdB.c : NULL, r, 0.75f, lc->p, s};
	char		shape[80];
	int			ok;

	snprintf(shape, sizeof(shape), "M %d K %d N %d r %d @%d/%d p %.1f%s%s%s", M, K, N, r, lc->col0,
			 ldo, lc->p, lc->grads & LORA_DIN ? "" : " -din", lc->grads & LORA_DA ? "" : " -dA",
			 lc->grads & LORA_DB ? "" : " -dB");
	/* no workspace without dropout: it must not be touched */
	be->lora_forward(be, tout.d, ldo, tu.d, tin.d, K, &(dl_lora_seg) {wd, 0, M, lc->col0, N}, 1,
					 lc->p > 0 ? tws.d : NULL);
	cpu->lora_forward(cpu, tout.c, ldo, tu.c, tin.c, K, &(dl_lora_seg) {wc, 0, M, lc->col0, N}, 1,
					  lc->p > 0 ? tws.c : NULL);
	ok = twin_check(tb, &tout, nout, "lora_fwd out", shape, TOL_F32);
	ok = twin_check(tb, &tu, (size_t) M * r, "lora_fwd u", shape, TOL_F32) && ok;
	be->lora_backward(be, lc->grads & LORA_DIN ? tdin.d : NULL, (float *) tdout.d + lc->col0, ldo,
					  tu.d, tin.d, &wd, M, K, N, lc->p > 0 ? tws.d : NULL);
	cpu->lora_backward(cpu, lc->grads & LORA_DIN ? tdin.c : NULL, (float *) tdout.c + lc->col0, ldo,
					   tu.c, tin.c, &wc, M, K, N, lc->p > 0 ? tws.c : NULL);
	ok = twin_check(tb, &tu, (size_t) M * r, "lora_bwd du", shape, TOL_F32) && ok;
	ok = twin_check(tb, &tdin, (size_t) M * K, "lora_bwd din", shape, TOL_F32) && ok;
	ok = twin_check(tb, &tdA, (size_t) r * K, "lora_bwd dA", shape, TOL_F32) && ok;
	ok = twin_check(tb, &tdB, (size_t) N * r, "lora_bwd dB", shape, TOL_F32) && ok;
	twin_free(be, &tA), twin_free(be, &tB), twin_free(be, &tin), twin_free(be, &tout);
	twin_free(be, &tdout), twin_free(be, &tdin), twin_free(be, &tdA), twin_free(be, &tdB);
	twin_free(be, &tu), twin_free(be, &tws);
	free(A), free(B), free(in), free(out0), free(dout), free(din0), free(dA0), free(dB0);
	return ok;
}

/*
 * Serving's shapes (a few rows, small ranks) and training's (all rows, dropout, an update
 * into some columns of a wider product, gradients left out as a frozen part leaves them).
 */
TEST(ops_lora)
{
	static const lora_case_def cases[] = {
		{1, 40, 24, 8, 0, 0.0f, LORA_ALL},
		{5, 100, 70, 1, 3, 0.0f, LORA_ALL},
		{1, 50, 31, 1, 0, 0.1f, LORA_ALL},
		{37, 130, 97, 64, 11, 0.1f, LORA_ALL},
		{300, 72, 200, 8, 40, 0.1f, LORA_DA | LORA_DB},
		{300, 200, 150, 64, 0, 0.0f, LORA_DIN | LORA_DB},
		{37, 65, 33, 8, 1, 0.1f, LORA_DA},
		{5, 33, 45, 64, 2, 0.1f, LORA_DIN},
	};

	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
		for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++)
			CHECK(lora_case(&tb[b], &cases[k]));
}

/*
 * lora_forward over several segments at once, as a mixed decode step makes them: runs of
 * rows with their own adapters (ranks, columns and widths differ), two segments over the
 * same rows in different columns (GPT-J's q and v), rows between runs left alone, dropout
 * in one; out and every segment's u against the CPU backend.
 */
TEST(ops_lora_segments)
{
	enum
	{
		T = 23, K = 48, LDO = 150, NSEG = 5
	};
	static const int rows[NSEG][5] = {	/* first, M, col0, N, r */
		{0, 3, 0, 48, 8}, {0, 3, 96, 48, 8}, {4, 7, 0, 150, 4}, {11, 1, 10, 60, 16},
		{15, 8, 48, 48, 2},
	};

	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
	{
		dl_backend *be = tb[b].be,
				   *cpu = reference_backend();
		uint64_t	s = new_seed();
		dl_lora_seg sd[NSEG],
					sc[NSEG];
		twin		tw[NSEG][2];
		float	   *in = randv((size_t) T * K, 1.0f, &s),
				   *out0 = randv((size_t) T * LDO, 1.0f, &s);
		twin		tin = twin_put(be, in, (size_t) T * K * 4),
					tout = twin_put(be, out0, (size_t) T * LDO * 4),
					tu = twin_put(be, NULL, (size_t) T * 16 * 2 * 4),
					tws = twin_put(be, NULL, (size_t) T * K * 4);
		size_t		nu = 0;

		for (int g = 0; g < NSEG; g++)
		{
			int			M = rows[g][1],
						N = rows[g][3],
						r = rows[g][4];
			float	   *A = randv((size_t) r * K, 0.1f, &s),
					   *B = randv((size_t) N * r, 0.1f, &s);
			dl_lora_mats w = {NULL, NULL, NULL, NULL, r, 2.0f / r, g == 2 ? 0.1f : 0.0f, s};

			tw[g][0] = twin_put(be, A, (size_t) r * K * 4);
			tw[g][1] = twin_put(be, B, (size_t) N * r * 4);
			sd[g] = sc[g] = (dl_lora_seg) {w, rows[g][0], M, rows[g][2], N};
			sd[g].w.A = tw[g][0].d, sd[g].w.B = tw[g][1].d;
			sc[g].w.A = tw[g][0].c, sc[g].w.B = tw[g][1].c;
			nu += (size_t) M * r;
			free(A), free(B);
		}
		be->lora_forward(be, tout.d, LDO, tu.d, tin.d, K, sd, NSEG, tws.d);
		cpu->lora_forward(cpu, tout.c, LDO, tu.c, tin.c, K, sc, NSEG, tws.c);
		CHECK(twin_check(&tb[b], &tout, (size_t) T * LDO, "lora_fwd out", "5 segments", TOL_F32));
		CHECK(twin_check(&tb[b], &tu, nu, "lora_fwd u", "5 segments", TOL_F32));
		for (int g = 0; g < NSEG; g++)
			twin_free(be, &tw[g][0]), twin_free(be, &tw[g][1]);
		twin_free(be, &tin), twin_free(be, &tout), twin_free(be, &tu), twin_free(be, &tws);
		free(in), free(out0);
	}
}

/*
 * matmul_backward and layernorm_backward over a frozen base: with no parameter gradient
 * (dW and dbias, dw and db NULL) din must still be what the reference computes.
 */
static int
frozen_backward_case(const test_backend *tb, int M, int K, int N)
{
	dl_backend *be = tb->be,
			   *cpu = reference_backend();
	uint64_t	s = new_seed();
	int			round = tb->bf16_products;
	float	   *W = randv_r((size_t) N * K, 0.05f, &s, round),
			   *x = randv_r((size_t) M * K, 1.0f, &s, round),
			   *dout = randv_r((size_t) M * N, 1.0f, &s, round),
			   *din0 = randv((size_t) M * K, 1.0f, &s),
			   *g = randv((size_t) M * K, 1.0f, &s),
			   *stats = randv(2 * (size_t) M, 1.0f, &s),
			   *lnw = randv(K, 1.0f, &s),
			   *eff;
	void	   *dWt = put_weights(be, W, N, K, &eff);
	void	   *cWt = put(cpu, eff, (size_t) N * K * 4);
	twin		tx = twin_put(be, x, (size_t) M * K * 4),
				tdout = twin_put(be, dout, (size_t) M * N * 4),
				tdin = twin_put(be, din0, (size_t) M * K * 4),
				tg = twin_put(be, g, (size_t) M * K * 4),
				tlnw = twin_put(be, lnw, K * 4),
				tstats;
	char		shape[64];
	int			ok;

	be->matmul_backward(be, tdin.d, NULL, NULL, tdout.d, tx.d, dWt, M, K, N);
	cpu->matmul_backward(cpu, tdin.c, NULL, NULL, tdout.c, tx.c, cWt, M, K, N);
	snprintf(shape, sizeof(shape), "M %d K %d N %d no dW, dbias", M, K, N);
	ok = twin_check(tb, &tdin, (size_t) M * K, "matmul_bwd din", shape, TOL_F32);
	/* any mean and positive rstd will do: the backward is a formula in them */
	for (int t = 0; t < M; t++)
		stats[M + t] = 0.5f + fabsf(stats[M + t]);
	tstats = twin_put(be, stats, 2 * (size_t) M * 4);
	be->layernorm_backward(be, tdin.d, NULL, NULL, tg.d, tx.d, tstats.d, (float *) tstats.d + M,
						   tlnw.d, M, K);
	cpu->layernorm_backward(cpu, tdin.c, NULL, NULL, tg.c, tx.c, tstats.c, (float *) tstats.c + M,
							tlnw.c, M, K);
	snprintf(shape, sizeof(shape), "T %d, C %d no dw, db", M, K);
	ok = twin_check(tb, &tdin, (size_t) M * K, "layernorm_bwd din", shape, TOL_F32) && ok;
	be->free(be, dWt);
	cpu->free(cpu, cWt);
	twin_free(be, &tx), twin_free(be, &tdout), twin_free(be, &tdin), twin_free(be, &tg);
	twin_free(be, &tlnw), twin_free(be, &tstats);
	free(W), free(x), free(dout), free(din0), free(g), free(stats), free(lnw), free(eff);
	return ok;
}

TEST(ops_frozen_base_backward)
{
	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
	{
		CHECK(frozen_backward_case(&tb[b], 1, 64, 96));
		CHECK(frozen_backward_case(&tb[b], 37, 130, 33));
		CHECK(frozen_backward_case(&tb[b], 300, 96, 40));
	}
}

TEST(ops_sample_topp)
{
	BACKENDS_OR_SKIP(tb, nb);
	for (int b = 0; b < nb; b++)
		CHECK(topp_case(&tb[b]));
}
