/*
 * attention_train.cu: causal self-attention for training, forward and backward, over a
 * batch of independent sequences (spans of rows of qkv [T, 3C]) without a cache.
 *
 * Per span of L tokens, batched over the H heads, each product is one cuda_gemm (bfloat16
 * tensor cores in the bf16 and mixed modes, exact float32 in fp32 mode) and a row kernel
 * (a warp per row of a head) does the softmax between them:
 *   forward   S = scale Q K^T [H, L, L]; P = causal softmax(S), lse [L, H]; O = P V
 *   backward  S again, P = exp(S - lse); dP = dO V^T; dS = P (dP - rowsum(dO O));
 *             dV += P^T dO, dQ += scale dS K, dK += scale dS^T Q
 * Why this shape: a fused FlashAttention kernel cannot be checked without a GPU, while
 * cuBLAS products and a row kernel run under the emulator (tests/gpu/emu). The price is
 * the L x L block of each span (and the masked half of each product, computed in vain),
 * but it lives only in the workspace while its span is processed: what the forward keeps
 * for the backward is lse, T x H floats, so nothing T x T outlives an operation (the
 * contract of backend.h). Forward and backward compute P by the same exp(S - lse), so the
 * backward rebuilds exactly the probabilities the forward used.
 *
 * Memory: the workspace holds S (then P) and dP (then dS) as float32 [H, L, L] for the
 * longest span, and in the bfloat16 modes P and dS once more as bfloat16 operands of the
 * products that follow: 8 H L L8 bytes in fp32 mode, 12 H L L8 otherwise, L8 = L rounded
 * up to 8 (GPT-J, H 16, at L 2048: 512 MiB and 768 MiB). cuda_gemm packs the span's q, k,
 * v and dO (L x C each) into its scratch slots in the bfloat16 modes.
 */
#include "common.cuh"

#define ROW_WARPS 4				/* rows (one a warp) per block of the row kernels */
#define FULL_MASK 0xffffffffu

/*
 * Leading dimension of a span's [L, L] matrices: L rounded up to 8 elements, so that the
 * rows of the bfloat16 copies start on 16 bytes, as cuBLAS's tensor-core kernels want.
 */
static __host__ __device__ __forceinline__ int
square_ld(int L)
{
	return (L + 7) & ~7;
}

/* Elements between the heads of a span's [H, L, L] matrices. */
static long long
square_stride(int L)
{
	return (long long) L * square_ld(L);
}

/* Elements of one [H, L, L] matrix of the workspace, rounded up to keep each 256-byte aligned. */
static size_t
square_elems(int H, int L)
{
	return ((size_t) H * square_stride(L) + 127) & ~(size_t) 127;
}

size_t
cuda_attention_train_workspace(dl_backend *be, int max_len, int n_head)
{
	size_t		per = 2 * sizeof(float) + (cuda_of(be)->bf16_math ? 2 * sizeof(__nv_bfloat16) : 0);

	return square_elems(n_head, max_len) * per;
}

/*
 * A span's matrices in the workspace, [H, L, L] each (rows square_ld(L) apart), laid out
 * for its own L.
 */
typedef struct span_ws
{
	float	   *S;				/* scores, then P in place in fp32 mode */
	float	   *dP;				/* backward: dO V^T, then dS in place in fp32 mode */
	__nv_bfloat16 *P16;			/* bfloat16 modes: P and dS as product operands */
	__nv_bfloat16 *dS16;
} span_ws;

/* The matrices of a span of L tokens, from the start of the workspace. */
static span_ws
span_ws_carve(void *workspace, int H, int L)
{
	size_t		n = square_elems(H, L);
	span_ws		w;

	w.S = (float *) workspace;
	w.dP = w.S + n;
	w.P16 = (__nv_bfloat16 *) (w.dP + n);
	w.dS16 = w.P16 + n;
	return w;
}

/*
 * The row of the span's [H, L, L] scores that this warp owns, r = h L + i (query i of
 * head h); false past the last.
 */
static __device__ __forceinline__ bool
warp_row(int L, int H, int *i, int *h)
{
	int			r = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5);

	*i = r % L;
	*h = r / L;
	return r < H * L;
}

/*
 * Row i of P, P[j] = exp(s[j] - lse) for the keys j <= i and 0 past them, and with ds
 * that of dS = P (dp - drow); T is the operand format. The lanes of a warp stride over
 * the row; p and ds may be s and dp themselves (each lane rewrites what it read).
 */
template <typename T>
static __device__ __forceinline__ void
store_probs(T *p, T *ds, const float *s, const float *dp, float lse, float drow, int i, int L)
{
	for (int j = threadIdx.x & 31; j < L; j += 32)
	{
		float		pj = j <= i ? expf(s[j] - lse) : 0.0f;

		p[j] = from_f32<T>(pj);
		if (ds)
			ds[j] = from_f32<T>(j <= i ? pj * (dp[j] - drow) : 0.0f);
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
 * Forward: the causal softmax of each row of S (scores of keys 0 .. i, one pass with the
 * online softmax per lane, then merged over the warp), lse[i, h] = max + log(sum), P.
 */
template <typename T>
__global__ static void __launch_bounds__(ROW_WARPS * 32)
softmax_kernel(T *P, const float *S, float *lse, int L, int H)
{
	int			i,
				h;
	float		m = -INFINITY,
				l = 0.0f;
	size_t		row;

	if (!warp_row(L, H, &i, &h))
		return;
	row = ((size_t) h * L + i) * square_ld(L);
	for (int j = threadIdx.x & 31; j <= i; j += 32)
		softmax_merge(&m, &l, S[row + j], 1.0f);
	for (int off = 16; off > 0; off >>= 1)
	{
		float		mo = __shfl_xor_sync(FULL_MASK, m, off),
					lo = __shfl_xor_sync(FULL_MASK, l, off);

		softmax_merge(&m, &l, mo, lo);
	}
	m += logf(l);				/* lane 0 saw key 0: every lane holds the row's state */
	if ((threadIdx.x & 31) == 0)
		lse[(size_t) i * H + h] = m;
	store_probs(P + row, (T *) NULL, S + row, NULL, m, 0.0f, i, L);
}

/*
 * Backward: P from S and the forward's lse, and dS = P (dP - drow) with drow = dO . O
 * over the row's head (D floats of rows ld C apart in O and dO).
 */
template <typename T>
__global__ static void __launch_bounds__(ROW_WARPS * 32)
softmax_backward_kernel(T *P, T *dS, const float *S, const float *dP, const float *lse,
						const float *O, const float *dO, int L, int H, int D)
{
	int			i,
				h;
	float		drow = 0.0f;
	size_t		row,
				at;

	if (!warp_row(L, H, &i, &h))
		return;
	row = ((size_t) h * L + i) * square_ld(L);
	at = (size_t) i * H * D + (size_t) h * D;
	for (int d = threadIdx.x & 31; d < D; d += 32)
		drow += O[at + d] * dO[at + d];
	drow = warp_sum(drow);
	store_probs(P + row, dS + row, S + row, dP + row, lse[(size_t) i * H + h], drow, i, L);
}

/* Blocks of the row kernels for the H L rows of a span. */
static unsigned
row_blocks(int H, int L)
{
	return (unsigned) (((size_t) H * L + ROW_WARPS - 1) / ROW_WARPS);
}

/* H heads of D columns at p, rows ld apart, as one batched operand. */
static cuda_mat
heads_mat(const float *p, int ld, int D, int trans)
{
	return cuda_mat {p, 0, trans, ld, D};
}

/* P or dS of a span as an operand: the float32 matrix in fp32 mode, else its bfloat16 copy. */
static cuda_mat
probs_mat(const cuda_backend *cb, const float *f32, const __nv_bfloat16 *b16, int L, int trans)
{
	return cuda_mat {cb->bf16_math ? (const void *) b16 : (const void *) f32, cb->bf16_math,
		trans, square_ld(L), square_stride(L)};
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

/* One span of a pass: rows [first, first + L), its matrices in w. */
typedef void (*span_fn) (const attn_pass *a, size_t first, int L, const span_ws *w);

/* Run fn over the spans one after another: stream order lets each reuse the workspace. */
static void
each_span(const attn_pass *a, const dl_spans *spans, span_fn fn)
{
	for (int s = 0; s < spans->n; s++)
	{
		const dl_span *sp = &spans->host[s];
		span_ws		w = span_ws_carve(a->workspace, a->H, sp->len);

		if (sp->len > 0)
			fn(a, (size_t) sp->first, sp->len, &w);
	}
}

/* S = scale Q K^T for every head of the span (what both passes start from). */
static void
span_scores(const attn_pass *a, const float *q, int L, float *S)
{
	int			ld = 3 * a->H * a->D;

	cuda_gemm(a->cb, a->op, L, L, a->D, a->scale, heads_mat(q, ld, a->D, 0),
			  heads_mat(q + a->H * a->D, ld, a->D, 1), 0.0f, S, square_ld(L), square_stride(L), a->H);
}

/* S, then P and lse, then O = P V. */
static void
forward_span(const attn_pass *a, size_t first, int L, const span_ws *w)
{
	cuda_backend *cb = a->cb;
	int			H = a->H,
				D = a->D,
				C = H * D;
	const float *q = a->qkv + first * 3 * C;
	float	   *lse = a->lse + first * H;

	span_scores(a, q, L, w->S);
	if (cb->bf16_math)
		softmax_kernel<<<row_blocks(H, L), ROW_WARPS * 32, 0, cb->stream>>>(w->P16, w->S, lse, L, H);
	else
		softmax_kernel<<<row_blocks(H, L), ROW_WARPS * 32, 0, cb->stream>>>(w->S, w->S, lse, L, H);
	cuda_check_launch(cb, a->op);
	cuda_gemm(cb, a->op, L, D, L, 1.0f, probs_mat(cb, w->S, w->P16, L, 0),
			  heads_mat(q + 2 * C, 3 * C, D, 0), 0.0f, a->out + first * C, C, D, H);
}

/* S and dP, then P and dS, then the three products that add to dV, dQ and dK. */
static void
backward_span(const attn_pass *a, size_t first, int L, const span_ws *w)
{
	cuda_backend *cb = a->cb;
	int			H = a->H,
				D = a->D,
				C = H * D;
	const float *q = a->qkv + first * 3 * C,
			   *O = a->saved_out + first * C,
			   *dO = a->dout + first * C,
			   *lse = a->saved_lse + first * H;
	float	   *dq = a->dqkv + first * 3 * C;

	span_scores(a, q, L, w->S);
	cuda_gemm(cb, a->op, L, L, D, 1.0f, heads_mat(dO, C, D, 0), heads_mat(q + 2 * C, 3 * C, D, 1),
			  0.0f, w->dP, square_ld(L), square_stride(L), H);
	if (cb->bf16_math)
		softmax_backward_kernel<<<row_blocks(H, L), ROW_WARPS * 32, 0, cb->stream>>>(
			w->P16, w->dS16, w->S, w->dP, lse, O, dO, L, H, D);
	else
		softmax_backward_kernel<<<row_blocks(H, L), ROW_WARPS * 32, 0, cb->stream>>>(
			w->S, w->dP, w->S, w->dP, lse, O, dO, L, H, D);
	cuda_check_launch(cb, a->op);
	cuda_gemm(cb, a->op, L, D, L, 1.0f, probs_mat(cb, w->S, w->P16, L, 1), heads_mat(dO, C, D, 0),
			  1.0f, dq + 2 * C, 3 * C, D, H);
	cuda_gemm(cb, a->op, L, D, L, a->scale, probs_mat(cb, w->dP, w->dS16, L, 0),
			  heads_mat(q + C, 3 * C, D, 0), 1.0f, dq, 3 * C, D, H);
	cuda_gemm(cb, a->op, L, D, L, a->scale, probs_mat(cb, w->dP, w->dS16, L, 1),
			  heads_mat(q, 3 * C, D, 0), 1.0f, dq + C, 3 * C, D, H);
}

void
cuda_attention_train_forward(dl_backend *be, float *out, float *lse, const float *qkv,
							 const dl_spans *spans, int n_head, int head_dim, float scale,
							 void *workspace)
{
	attn_pass	a = {cuda_enter(be), "attention_train_forward", n_head, head_dim, scale,
	workspace, qkv, out, lse, NULL, NULL, NULL, NULL};

	each_span(&a, spans, forward_span);
}

void
cuda_attention_backward(dl_backend *be, float *dqkv, const float *dout, const float *qkv,
						const float *out, const float *lse, const dl_spans *spans, int n_head,
						int head_dim, float scale, void *workspace)
{
	attn_pass	a = {cuda_enter(be), "attention_backward", n_head, head_dim, scale, workspace,
	qkv, NULL, NULL, out, lse, dout, dqkv};

	each_span(&a, spans, backward_span);
}
