/*
 * attention_train.cu: causal self-attention for training, forward and backward, over a
 * batch of independent sequences (spans of rows of qkv [T, 3C]) without a cache.
 *
 * A span of L tokens is taken in blocks of up to QBLOCK queries: block [q0, q0 + nq) sees
 * the keys [0, nk), nk = q0 + nq, which is all that causality lets it see, so the products
 * skip most of the masked half (L 1024: 62% of the full L x L work). Per block, batched
 * over the H heads, each product is one cuda_gemm (bfloat16 tensor cores in the bf16 and
 * mixed modes, exact float32 in fp32 mode) and a row kernel (a warp per row of a head)
 * does the softmax between them:
 *   forward   S = scale Q K^T [H, nq, nk]; P = causal softmax(S), lse [L, H]; O = P V
 *   backward  S again, P = exp(S - lse); dP = dO V^T; dS = P (dP - rowsum(dO O));
 *             dV += P^T dO, dQ += scale dS K, dK += scale dS^T Q
 * The backward's products accumulate into dqkv, so a key's dK and dV gather the
 * contributions of every block that sees it.
 * Why this shape: a fused FlashAttention kernel cannot be checked without a GPU, while
 * cuBLAS products and a row kernel run under the emulator (tests/gpu/emu). The price is
 * the [nq, nk] block of scores (and the masked corner of each product, computed in vain),
 * but it lives only in the workspace while its block is processed: what the forward keeps
 * for the backward is lse, T x H floats, so nothing T x T outlives an operation (the
 * contract of backend.h). Forward and backward compute P by the same exp(S - lse), so the
 * backward rebuilds exactly the probabilities the forward used.
 *
 * Memory: the workspace holds S (then P) and dP (then dS) as float32 [H, QBLOCK, L] for
 * the longest span, and in the bfloat16 modes P and dS once more as bfloat16 operands of
 * the products that follow: 8 H QBLOCK L8 bytes in fp32 mode, 12 H QBLOCK L8 otherwise,
 * L8 = L rounded up to 8 (GPT-J, H 16, at L 2048: 64 MiB and 96 MiB). In the bfloat16
 * modes the span's qkv (and dO) are packed to bfloat16 once, into two scratch slots, for
 * all its products.
 */
#include "common.cuh"

#define ROW_WARPS 4				/* rows (one a warp) per block of the row kernels */
#define QBLOCK 256				/* queries of a span per block of products */
#define FULL_MASK 0xffffffffu

/*
 * Leading dimension of a block's [nq, nk] matrices: nk rounded up to 8 elements, so that
 * the rows of the bfloat16 copies start on 16 bytes, as cuBLAS's tensor-core kernels want.
 */
static __host__ __device__ __forceinline__ int
square_ld(int nk)
{
	return (nk + 7) & ~7;
}

/* Elements between the heads of a block's [H, nq, nk] matrices. */
static long long
square_stride(int nq, int nk)
{
	return (long long) nq * square_ld(nk);
}

/* Elements of one [H, nq, nk] matrix of the workspace, rounded up to keep each 256-byte aligned. */
static size_t
square_elems(int H, int nq, int nk)
{
	return ((size_t) H * square_stride(nq, nk) + 127) & ~(size_t) 127;
}

size_t
cuda_attention_train_workspace(dl_backend *be, int max_len, int n_head)
{
	size_t		per = 2 * sizeof(float) + (cuda_of(be)->bf16_math ? 2 * sizeof(__nv_bfloat16) : 0);

	return square_elems(n_head, max_len < QBLOCK ? max_len : QBLOCK, max_len) * per;
}

/*
 * A block of queries [q0, q0 + nq) of a span, the keys [0, nk) it sees (nk = q0 + nq),
 * and its matrices in the workspace, [H, nq, nk] each (rows square_ld(nk) apart).
 */
typedef struct qblock
{
	int			q0,
				nq,
				nk;
	float	   *S;				/* scores, then P in place in fp32 mode */
	float	   *dP;				/* backward: dO V^T, then dS in place in fp32 mode */
	__nv_bfloat16 *P16;			/* bfloat16 modes: P and dS as product operands */
	__nv_bfloat16 *dS16;
} qblock;

/* Block [q0, q0 + nq) of a span, its matrices from the start of the workspace. */
static qblock
qblock_carve(void *workspace, int H, int q0, int nq)
{
	qblock		b = {q0, nq, q0 + nq, NULL, NULL, NULL, NULL};
	size_t		n = square_elems(H, nq, b.nk);

	b.S = (float *) workspace;
	b.dP = b.S + n;
	b.P16 = (__nv_bfloat16 *) (b.dP + n);
	b.dS16 = b.P16 + n;
	return b;
}

/*
 * The row of the block's [H, nq, nk] scores that this warp owns, r = h nq + i (query
 * q0 + i of head h); false past the last.
 */
static __device__ __forceinline__ bool
warp_row(int nq, int H, int *i, int *h)
{
	int			r = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5);

	*i = r % nq;
	*h = r / nq;
	return r < H * nq;
}

/*
 * Row of query q of P, P[j] = exp(s[j] - lse) for the keys j <= q and 0 past them (to
 * nk), and with ds that of dS = P (dp - drow); T is the operand format. The lanes of a
 * warp stride over the row; p and ds may be s and dp themselves (each lane rewrites what
 * it read).
 */
template <typename T>
static __device__ __forceinline__ void
store_probs(T *p, T *ds, const float *s, const float *dp, float lse, float drow, int q, int nk)
{
	for (int j = threadIdx.x & 31; j < nk; j += 32)
	{
		float		pj = j <= q ? expf(s[j] - lse) : 0.0f;

		p[j] = from_f32<T>(pj);
		if (ds)
			ds[j] = from_f32<T>(j <= q ? pj * (dp[j] - drow) : 0.0f);
	}
}

/* Extend the softmax state of max m and sum l by the state (mo, lo); max -INFINITY: empty. */
static __device__ __forceinline__ void
softmax_merge(float *m, float *l, float mo, float lo)
{
	if (mo <= *m)				/* also when (mo, lo) is empty */
		*l += mo == -INFINITY ? 0.0f : lo * expf(mo - *m);
	else
	{
		*l = *m == -INFINITY ? lo : *l * expf(*m - mo) + lo;
		*m = mo;
	}
}

/*
 * Forward: the causal softmax of each row of the block's S (query q = q0 + i sees keys
 * 0 .. q; one pass with the online softmax per lane, then merged over the warp),
 * lse[q, h] = max + log(sum), P. lse is the span's.
 */
template <typename T>
__global__ static void __launch_bounds__(ROW_WARPS * 32)
softmax_kernel(T *P, const float *S, float *lse, int q0, int nq, int nk, int H)
{
	int			i,
				h,
				q;
	float		m = -INFINITY,
				l = 0.0f;
	size_t		row;

	if (!warp_row(nq, H, &i, &h))
		return;
	q = q0 + i;
	row = ((size_t) h * nq + i) * square_ld(nk);
	for (int j = threadIdx.x & 31; j <= q; j += 32)
		softmax_merge(&m, &l, S[row + j], 1.0f);
	for (int off = 16; off > 0; off >>= 1)
	{
		float		mo = __shfl_xor_sync(FULL_MASK, m, off),
					lo = __shfl_xor_sync(FULL_MASK, l, off);

		softmax_merge(&m, &l, mo, lo);
	}
	m += logf(l);				/* lane 0 saw key 0: every lane holds the row's state */
	if ((threadIdx.x & 31) == 0)
		lse[(size_t) q * H + h] = m;
	store_probs(P + row, (T *) NULL, S + row, NULL, m, 0.0f, q, nk);
}

/*
 * Backward: P from S and the forward's lse, and dS = P (dP - drow) with drow = dO . O
 * over the row's head (D floats of rows ld C apart in the span's O and dO).
 */
template <typename T>
__global__ static void __launch_bounds__(ROW_WARPS * 32)
softmax_backward_kernel(T *P, T *dS, const float *S, const float *dP, const float *lse,
						const float *O, const float *dO, int q0, int nq, int nk, int H, int D)
{
	int			i,
				h,
				q;
	float		drow = 0.0f;
	size_t		row,
				at;

	if (!warp_row(nq, H, &i, &h))
		return;
	q = q0 + i;
	row = ((size_t) h * nq + i) * square_ld(nk);
	at = (size_t) q * H * D + (size_t) h * D;
	for (int d = threadIdx.x & 31; d < D; d += 32)
		drow += O[at + d] * dO[at + d];
	drow = warp_sum(drow);
	store_probs(P + row, dS + row, S + row, dP + row, lse[(size_t) q * H + h], drow, q, nk);
}

/* Blocks of the row kernels for the H nq rows of a block of queries. */
static unsigned
row_blocks(int H, int nq)
{
	return (unsigned) (((size_t) H * nq + ROW_WARPS - 1) / ROW_WARPS);
}

/*
 * The rows of a span that its products read: q | k | v [L, 3C] and (backward) dO [L, C],
 * as bfloat16 copies packed once per span in the bfloat16 modes, else the float32 rows.
 */
typedef struct span_src
{
	const void *qkv;
	const void *dout;
	int			bf16;
} span_src;

/*
 * H heads of D columns from column col of row `row` of a span's matrix at base (rows ld
 * apart, in src's format), as one batched operand.
 */
static cuda_mat
heads_mat(const span_src *src, const void *base, size_t row, int col, int ld, int D, int trans)
{
	size_t		es = src->bf16 ? sizeof(__nv_bfloat16) : sizeof(float);

	return cuda_mat {(const char *) base + (row * ld + col) * es, src->bf16, trans, ld, D};
}

/* P or dS of a block as an operand: the float32 matrix in fp32 mode, else its bfloat16 copy. */
static cuda_mat
probs_mat(const cuda_backend *cb, const float *f32, const __nv_bfloat16 *b16, const qblock *b,
		  int trans)
{
	return cuda_mat {cb->bf16_math ? (const void *) b16 : (const void *) f32, cb->bf16_math,
		trans, square_ld(b->nk), square_stride(b->nq, b->nk)};
}

/* The arguments of a pass: the forward's outputs, or the backward's inputs and dqkv. */
typedef struct attn_pass
{
	cuda_backend *cb;
	const char *op;
	int			H,
				D;
	float		scale;
	void	   *workspace;
	const float *qkv;
	float	   *out;			/* forward: written */
	float	   *lse;
	const float *saved_out;		/* backward: the forward's out and lse */
	const float *saved_lse;
	const float *dout;
	float	   *dqkv;
} attn_pass;

/* One block of queries of the span whose rows start at `first`, its operands in src. */
typedef void (*block_fn) (const attn_pass *a, size_t first, const span_src *src, const qblock *b);

/* Rows [first, first + L) of a [T, cols] float32 matrix as a span's operand (packed in slot). */
static const void *
span_rows(const attn_pass *a, const float *m, size_t first, int L, int cols, int slot)
{
	cuda_mat	rows = {m + first * cols, 0, 0, cols, 0};

	if (!a->cb->bf16_math)
		return rows.p;
	return cuda_as_bf16(a->cb, rows, L, cols, 1, slot, a->op).p;
}

/*
 * Run fn over the spans' blocks one after another (stream order lets each reuse the
 * workspace), each span's operands packed first.
 */
static void
each_block(const attn_pass *a, const dl_spans *spans, block_fn fn)
{
	int			C = a->H * a->D;

	for (int s = 0; s < spans->n; s++)
	{
		const dl_span *sp = &spans->host[s];
		span_src	src = {NULL, NULL, a->cb->bf16_math};

		if (sp->len < 1)
			continue;
		src.qkv = span_rows(a, a->qkv, sp->first, sp->len, 3 * C, SCRATCH_QKV16);
		if (a->dout)
			src.dout = span_rows(a, a->dout, sp->first, sp->len, C, SCRATCH_DOUT16);
		if (src.qkv == NULL || (a->dout && src.dout == NULL))
			return;				/* no room: the failure is kept */
		for (int q0 = 0; q0 < sp->len; q0 += QBLOCK)
		{
			qblock		b = qblock_carve(a->workspace, a->H, q0,
										 sp->len - q0 < QBLOCK ? sp->len - q0 : QBLOCK);

			fn(a, (size_t) sp->first, &src, &b);
		}
	}
}

/* S = scale Q K^T for every head of the block (what both passes start from). */
static void
block_scores(const attn_pass *a, const span_src *src, const qblock *b)
{
	int			C = a->H * a->D;

	cuda_gemm(a->cb, a->op, b->nq, b->nk, a->D, a->scale,
			  heads_mat(src, src->qkv, b->q0, 0, 3 * C, a->D, 0),
			  heads_mat(src, src->qkv, 0, C, 3 * C, a->D, 1),
			  0.0f, b->S, square_ld(b->nk), square_stride(b->nq, b->nk), a->H);
}

/* S, then P and lse, then O = P V for the block's queries. */
static void
forward_block(const attn_pass *a, size_t first, const span_src *src, const qblock *b)
{
	cuda_backend *cb = a->cb;
	int			H = a->H,
				D = a->D,
				C = H * D;
	float	   *lse = a->lse + first * H;

	block_scores(a, src, b);
	if (cb->bf16_math)
		softmax_kernel<<<row_blocks(H, b->nq), ROW_WARPS * 32, 0, cb->stream>>>(b->P16, b->S, lse, b->q0,
																				 b->nq, b->nk, H);
	else
		softmax_kernel<<<row_blocks(H, b->nq), ROW_WARPS * 32, 0, cb->stream>>>(b->S, b->S, lse, b->q0,
																				 b->nq, b->nk, H);
	cuda_check_launch(cb, a->op);
	cuda_gemm(cb, a->op, b->nq, D, b->nk, 1.0f, probs_mat(cb, b->S, b->P16, b, 0),
			  heads_mat(src, src->qkv, 0, 2 * C, 3 * C, D, 0), 0.0f, a->out + (first + b->q0) * C,
			  C, D, H);
}

/*
 * S and dP, then P and dS, then the three products: dQ of the block's queries, dK and dV
 * of the keys it sees (added to what earlier blocks gave them).
 */
static void
backward_block(const attn_pass *a, size_t first, const span_src *src, const qblock *b)
{
	cuda_backend *cb = a->cb;
	int			H = a->H,
				D = a->D,
				C = H * D;
	const float *O = a->saved_out + first * C,
			   *dO = a->dout + first * C,
			   *lse = a->saved_lse + first * H;
	float	   *dq = a->dqkv + first * 3 * C;

	block_scores(a, src, b);
	cuda_gemm(cb, a->op, b->nq, b->nk, D, 1.0f, heads_mat(src, src->dout, b->q0, 0, C, D, 0),
			  heads_mat(src, src->qkv, 0, 2 * C, 3 * C, D, 1), 0.0f, b->dP, square_ld(b->nk),
			  square_stride(b->nq, b->nk), H);
	if (cb->bf16_math)
		softmax_backward_kernel<<<row_blocks(H, b->nq), ROW_WARPS * 32, 0, cb->stream>>>(
			b->P16, b->dS16, b->S, b->dP, lse, O, dO, b->q0, b->nq, b->nk, H, D);
	else
		softmax_backward_kernel<<<row_blocks(H, b->nq), ROW_WARPS * 32, 0, cb->stream>>>(
			b->S, b->dP, b->S, b->dP, lse, O, dO, b->q0, b->nq, b->nk, H, D);
	cuda_check_launch(cb, a->op);
	cuda_gemm(cb, a->op, b->nk, D, b->nq, 1.0f, probs_mat(cb, b->S, b->P16, b, 1),
			  heads_mat(src, src->dout, b->q0, 0, C, D, 0), 1.0f, dq + 2 * C, 3 * C, D, H);
	cuda_gemm(cb, a->op, b->nq, D, b->nk, a->scale, probs_mat(cb, b->dP, b->dS16, b, 0),
			  heads_mat(src, src->qkv, 0, C, 3 * C, D, 0), 1.0f, dq + (size_t) b->q0 * 3 * C,
			  3 * C, D, H);
	cuda_gemm(cb, a->op, b->nk, D, b->nq, a->scale, probs_mat(cb, b->dP, b->dS16, b, 1),
			  heads_mat(src, src->qkv, b->q0, 0, 3 * C, D, 0), 1.0f, dq + C, 3 * C, D, H);
}

void
cuda_attention_train_forward(dl_backend *be, float *out, float *lse, const float *qkv,
							 const dl_spans *spans, int n_head, int head_dim, float scale,
							 void *workspace)
{
	attn_pass	a = {cuda_enter(be), "attention_train_forward", n_head, head_dim, scale,
	workspace, qkv, out, lse, NULL, NULL, NULL, NULL};

	each_block(&a, spans, forward_block);
}

void
cuda_attention_backward(dl_backend *be, float *dqkv, const float *dout, const float *qkv,
						const float *out, const float *lse, const dl_spans *spans, int n_head,
						int head_dim, float scale, void *workspace)
{
	attn_pass	a = {cuda_enter(be), "attention_backward", n_head, head_dim, scale, workspace,
	qkv, NULL, NULL, out, lse, dout, dqkv};

	each_block(&a, spans, backward_block);
}
