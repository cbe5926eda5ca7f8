/*
 * cpu_matmul.c: out[M,N] (+)= in[M,K] @ W[N,K]^T + bias, W in weight format (nn.Linear's
 * layout), and its backward. Products of many rows go to OpenBLAS, a single-threaded
 * cblas_sgemm per slice of W's rows on each pool thread (a bfloat16 W widened to float32
 * a chunk at a time); those of a few rows (decode) to a micro-kernel of our own that
 * streams W once.
 */
#include "backend_cpu.h"
#include "cpu_vec.h"

#include <cblas.h>
#include <string.h>

/*
 * Small M (decode: one row per sequence) does not go to sgemm, which packs its operands
 * on every call: with a few rows of in, packing W costs more than multiplying by it,
 * and the product is bound by reading W once anyway. Instead each task streams its
 * slice of W's rows once and computes, per tile of MMV_NB rows of W and up to MMV_MB
 * rows of in, all the dot products in vector registers (W's rows are contiguous
 * operands since W is [N, K]). Up to MMV_MAX_M rows; sgemm from there on, where its
 * packing pays for itself.
 *
 * With AVX-512, a 4 x 8 tile needs 37 of the 32 vector registers and gcc spills a few
 * accumulators to L1, yet it beats the spill-free 4 x 4 and 3 x 8 on decode products:
 * 8 rows of in (a decode batch of 8) take one pass over each tile of W instead of two,
 * and that tile does not fit in L1 beside all of in.
 */
#if defined(__AVX512F__)
#define MMV_NB 4
#else
#define MMV_NB 2
#endif
#define MMV_MB 8
#define MMV_MAX_M 64
/* rows of W per task, about (slices are cut at multiples of 16, out's cache lines) */
#define MMV_ROWS 64
/*
 * tiles ahead that are prefetched into L2: far enough to cover the memory's latency (twice
 * as many tiles of bfloat16, half the bytes each)
 */
#define MMV_PREFETCH_TILES 2
#define MMV_AHEAD(bf16) ((bf16) ? 2 * MMV_PREFETCH_TILES : MMV_PREFETCH_TILES)

typedef struct mm_args
{
	float	   *out;
	const float *in;
	const void *W;				/* float32, or bfloat16 when bf16 */
	const float *bias;
	int			M;
	int			K;
	int			N;
	int			accumulate;
	int			bf16;
	float	  **widen;			/* bf16: per thread, WIDEN_FLOATS */
} mm_args;

/*
 * out[m .. m + mb, n .. n + nb] (+)= in rows times W rows (+ bias): nb x mb dot products
 * over all of K in registers. Always inlined with constant nb and mb, so that the
 * accumulators are registers and the loops unroll. Row i of the tile MMV_AHEAD tiles
 * ahead is prefetched into L2 where bit i of prefetch is set, a step's elements per step, so
 * that memory works while the FMAs do instead of the tile stalling on every new line.
 * W's rows are float32, or bfloat16 (bf16, also constant) widened as they are loaded:
 * half the bytes from memory for the same FMAs.
 */
static inline __attribute__((always_inline)) void
mmv_tile(const mm_args *a, int n, int m, const int nb, const int mb, int prefetch, const int bf16)
{
	const int	K = a->K;
	const size_t es = bf16 ? sizeof(uint16_t) : sizeof(float);
	const char *w = (const char *) a->W + (size_t) n * K * es;
	const float *x = a->in + (size_t) m * K;
	vfloat		acc[MMV_NB][MMV_MB];
	int			k = 0;

	for (int i = 0; i < nb; i++)
		for (int j = 0; j < mb; j++)
			acc[i][j] = (vfloat) {0};
	for (; k + VEC_LANES <= K; k += VEC_LANES)
	{
		vfloat		wv[MMV_NB];

		/*
		 * Operands into registers, each loaded once: otherwise gcc folds the loads into
		 * the FMAs and loads every operand again for each of its uses.
		 */
		for (int i = 0; i < nb; i++)
		{
			wv[i] = bf16 ? vload_bf16((const uint16_t *) w + (size_t) i * K + k)
				: vload((const float *) w + (size_t) i * K + k);
			__asm__("" : "+x"(wv[i]));
			if (prefetch >> i & 1)
				__builtin_prefetch(w + ((size_t) (MMV_AHEAD(bf16) * nb + i) * K + k) * es, 0, 2);
		}
		for (int j = 0; j < mb; j++)
		{
			vfloat		xv = vload(x + (size_t) j * K + k);

			__asm__("" : "+x"(xv));
			for (int i = 0; i < nb; i++)
				acc[i][j] += wv[i] * xv;
		}
	}
	for (int j = 0; j < mb; j++)
	{
		float	   *o = a->out + (size_t) (m + j) * a->N + n;

		for (int i = 0; i < nb; i++)
		{
			float		s = vhsum(acc[i][j]);

			for (int kk = k; kk < K; kk++)
				s += weight_at(w, (size_t) i * K + kk, bf16) * x[(size_t) j * K + kk];
			if (a->bias)
				s += a->bias[n + i];
			o[i] = a->accumulate ? o[i] + s : s;
		}
	}
}

/* The cases of mmv_tile_any for tiles of nb rows of W. */
#define MMV_CASES(nb, prefetch, bf16) \
	case 1: mmv_tile(a, n, m, nb, 1, prefetch, bf16); break; \
	case 2: mmv_tile(a, n, m, nb, 2, prefetch, bf16); break; \
	case 3: mmv_tile(a, n, m, nb, 3, prefetch, bf16); break; \
	case 4: mmv_tile(a, n, m, nb, 4, prefetch, bf16); break; \
	case 5: mmv_tile(a, n, m, nb, 5, prefetch, bf16); break; \
	case 6: mmv_tile(a, n, m, nb, 6, prefetch, bf16); break; \
	case 7: mmv_tile(a, n, m, nb, 7, prefetch, bf16); break; \
	default: mmv_tile(a, n, m, nb, MMV_MB, prefetch, bf16); break

/*
 * mmv_tile with nb = MMV_NB (full) or 1 (the rows left over), for mb = 1 .. MMV_MB and
 * both weight formats; full tiles prefetch as asked.
 */
static void
mmv_tile_any(const mm_args *a, int n, int m, int full, int mb, int prefetch)
{
	if (full && a->bf16)
		switch (mb)
		{
				MMV_CASES(MMV_NB, prefetch, 1);
		}
	else if (full)
		switch (mb)
		{
				MMV_CASES(MMV_NB, prefetch, 0);
		}
	else if (a->bf16)
		switch (mb)
		{
				MMV_CASES(1, 0, 1);
		}
	else
		switch (mb)
		{
				MMV_CASES(1, 0, 0);
		}
}

/*
 * Rows [n0, n1) of W against every row of in: per tile of W's rows, the rows of in in
 * nearly equal blocks of at most MMV_MB (12 rows are two blocks of 6, not 8 + 4), so
 * the tile of W is read from memory once and from cache after. The blocks
 * share the prefetching of a later tile: block b fetches its rows i with i % blocks == b.
 */
static void
mmv_rows(const mm_args *a, int n0, int n1)
{
	int			nmb = (a->M + MMV_MB - 1) / MMV_MB;

	for (int n = n0; n < n1;)
	{
		int			full = n1 - n >= MMV_NB;

		for (int b = 0; b < nmb; b++)
		{
			int			m0 = a->M * b / nmb,
						m1 = a->M * (b + 1) / nmb,
						prefetch = 0;

			if (n + (MMV_AHEAD(a->bf16) + 1) * MMV_NB <= a->N)
				for (int i = 0; i < MMV_NB; i++)
					prefetch |= (i % nmb == b) << i;
			mmv_tile_any(a, n, m0, full, m1 - m0, prefetch);
		}
		n += full ? MMV_NB : 1;
	}
}

/*
 * Columns [n0, n1) of out, i.e. rows [n0, n1) of W, with a single-threaded BLAS call; a
 * bfloat16 W by chunks of rows widened into the thread's buffer, a call each.
 */
static void
mm_sgemm(const mm_args *a, int n0, int n1, int thread)
{
	float		beta = a->accumulate ? 1.0f : 0.0f;
	int			chunk;

	if (a->bias)
	{
		/* out = bias (or out += bias), then the product is added on top */
		for (int m = 0; m < a->M; m++)
		{
			float	   *o = a->out + (size_t) m * a->N;

			if (a->accumulate)
				for (int n = n0; n < n1; n++)
					o[n] += a->bias[n];
			else
				memcpy(o + n0, a->bias + n0, (n1 - n0) * sizeof(float));
		}
		beta = 1.0f;
	}
	if (!a->bf16)
	{
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a->M, n1 - n0, a->K, 1.0f,
					a->in, a->K, (const float *) a->W + (size_t) n0 * a->K, a->K, beta, a->out + n0, a->N);
		return;
	}
	/* K is a width, at most MAX_WIDTH = WIDEN_FLOATS (config.c): a chunk has a row at least */
	chunk = (int) (WIDEN_FLOATS / a->K);
	for (int c0 = n0; c0 < n1; c0 += chunk)
	{
		int			c1 = c0 + chunk < n1 ? c0 + chunk : n1;
		float	   *wf = a->widen[thread];
		const uint16_t *wh = (const uint16_t *) a->W + (size_t) c0 * a->K;

		for (size_t i = 0; i < (size_t) (c1 - c0) * a->K; i++)
			wf[i] = bf16_to_float(wh[i]);
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a->M, c1 - c0, a->K, 1.0f,
					a->in, a->K, wf, a->K, beta, a->out + c0, a->N);
	}
}

/* One slice of W's rows (columns of out), whole cache lines of out's rows. */
static void
mm_slice(const void *ctx, size_t n0, size_t n1, int thread)
{
	const mm_args *a = ctx;

	if (a->M <= MMV_MAX_M)
		mmv_rows(a, n0, n1);
	else
		mm_sgemm(a, n0, n1, thread);
}

/*
 * out[M,N] (+)= in[M,K] @ W[N,K]^T + bias. sgemm: one slice of W per thread (each call
 * packs in again). Small M: slices of MMV_ROWS rows, handed out as they are done, so
 * that a thread slowed by the rest of the machine does not hold up the others.
 */
void
cpu_matmul_forward(dl_backend *be, float *out, const float *in, const void *W,
				   const float *bias, int M, int K, int N, int accumulate)
{
	cpu_backend *cb = cpu_of(be);
	mm_args		a = {out, in, W, bias, M, K, N, accumulate, cb->bf16, cb->widen};

	cpu_for_cols(be, N, M <= MMV_MAX_M ? (N + MMV_ROWS - 1) / MMV_ROWS : cpu_threads(be),
				 mm_slice, &a);
}

typedef struct mmb_args
{
	float	   *din;
	float	   *dW;
	float	   *dbias;
	const float *dout;
	const float *in;
	const float *W;
	int			M;
	int			K;
	int			N;
} mmb_args;

/* Rows [m0, m1) of din += dout W: one single-threaded BLAS call, beta 1 accumulating. */
static void
mmb_din_rows(const void *ctx, size_t m0, size_t m1, int thread)
{
	const mmb_args *a = ctx;

	(void) thread;
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m1 - m0, a->K, a->N, 1.0f,
				a->dout + m0 * a->N, a->N, a->W, a->K, 1.0f, a->din + m0 * a->K, a->K);
}

/*
 * Rows [n0, n1) of dW += dout^T in (one BLAS call, as above) and the column sums of dout
 * into dbias, in double.
 */
static void
mmb_dw_rows(const void *ctx, size_t n0, size_t n1, int thread)
{
	const mmb_args *a = ctx;

	(void) thread;
	cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n1 - n0, a->K, a->M, 1.0f,
				a->dout + n0, a->N, a->in, a->K, 1.0f, a->dW + n0 * a->K, a->K);
	if (a->dbias == NULL)
		return;
	for (size_t nb = n0; nb < n1; nb += COLSUM_BLOCK)
	{
		int			n = n1 - nb < COLSUM_BLOCK ? (int) (n1 - nb) : COLSUM_BLOCK;
		double		sb[COLSUM_BLOCK] = {0};

		for (int m = 0; m < a->M; m++)
		{
			const float *g = a->dout + (size_t) m * a->N + nb;

			for (int j = 0; j < n; j++)
				sb[j] += g[j];
		}
		for (int j = 0; j < n; j++)
			a->dbias[nb + j] += (float) sb[j];
	}
}

/*
 * Matrix product backward: din by rows and dW by slices of whole cache lines (as in the
 * forward) in one pass of the pool.
 */
void
cpu_matmul_backward(dl_backend *be, float *din, float *dW, float *dbias, const float *dout,
					const float *in, const void *W, int M, int K, int N)
{
	mmb_args	a = {din, dW, dbias, dout, in, W, M, K, N};
	cpu_loop	loops[] = {
		{mmb_din_rows, M, din ? cpu_threads(be) : 0, 1},
		{mmb_dw_rows, N, dW ? cpu_threads(be) : 0, CPU_COL_GRAIN},
	};

	cpu_for_loops(be, &a, loops, 2);
}
