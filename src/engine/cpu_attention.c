/*
 * cpu_attention.c: causal attention of a batch of sequences over one layer's KV cache
 * (float32, or bfloat16 in the backend's bf16 mode), and cpu_attend_block, the block of
 * scores, softmax and weighted values that training's attention shares.
 *
 * Spans of one token (decode) take all heads of their sequence in a task that streams
 * the cache rows once; longer spans (prefill, with or without a cached prefix) are cut
 * into blocks of ATTN_QBLOCK queries per head, each two BLAS products around a softmax.
 */
#include "backend_cpu.h"
#include "cpu_vec.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

typedef struct attn_args
{
	float	   *out;
	const float *qkv;
	void	   *k_cache;		/* float32, or bfloat16 when bf16 */
	void	   *v_cache;
	int			bf16;
	float	  **widen;			/* bf16: per thread, for cpu_attend_block */
	int			max_ctx;
	const dl_spans *spans;
	int			n_head;
	int			head_dim;
	float		scale;
	float	   *scratch;		/* the workspace: ATTN_QBLOCK * max_ctx floats per thread */
	int			groups;			/* decode: tasks per span, each a group of heads */
} attn_args;

/* cache[at .. at + n) = x, rounded to bfloat16 for a bfloat16 cache. */
static inline void
kv_put(void *cache, size_t at, const float *x, int n, int bf16)
{
	if (bf16)
		for (int i = 0; i < n; i++)
			((uint16_t *) cache)[at + i] = float_to_bf16(x[i]);
	else
		memcpy((float *) cache + at, x, n * sizeof(float));
}

/* Element `at` of a cache (or of any float32 / bfloat16 array) as an address. */
static inline void *
kv_at(void *cache, size_t at, int bf16)
{
	return (char *) cache + at * (bf16 ? sizeof(uint16_t) : sizeof(float));
}

/* Store the k and v rows of spans [lo, hi) in their cache slots (decode spans store their own). */
static void
kv_store_spans(const void *ctx, size_t lo, size_t hi, int thread)
{
	const attn_args *a = ctx;
	int			C = a->n_head * a->head_dim;

	(void) thread;
	for (size_t s = lo; s < hi; s++)
	{
		const dl_span *sp = &a->spans->host[s];

		for (int i = 0; sp->len > 1 && i < sp->len; i++)
		{
			const float *row = a->qkv + (size_t) (sp->first + i) * 3 * C;
			size_t		at = ((size_t) sp->slot * a->max_ctx + sp->pos + i) * C;

			kv_put(a->k_cache, at, row + C, C, a->bf16);
			kv_put(a->v_cache, at, row + 2 * C, C, a->bf16);
		}
	}
}

/* keys of a bfloat16 cache widened for one product of cpu_attend_block */
#define ATTN_WIDEN_KEYS 128

/*
 * Keys (or values) [c0, c0 + n) of a bfloat16 cache, rows kvs apart, widened into wbuf as
 * n rows of D floats: the operand of one product.
 */
static const float *
widen_keys(float *wbuf, const void *k, int kvs, int c0, int n, int D)
{
	for (int j = 0; j < n; j++)
		for (int d = 0; d < D; d++)
			wbuf[(size_t) j * D + d] = bf16_to_float(((const uint16_t *) k)[(size_t) (c0 + j) * kvs + d]);
	return wbuf;
}

/*
 * One head of a block of nq query rows whose positions are the last nq of nk keys:
 * S = scale * Q K^T (one product), the causal softmax of each row in place (row i sees
 * keys 0 .. nk - nq + i), then O = P V (one product). q, k and v rows are qs, kvs elements
 * apart, o rows os apart; with lse, the log-sum-exp of row i's scores goes to
 * lse[i * lses]. Single-threaded BLAS on the caller's scratch S [nq, nk]. A bfloat16
 * cache (wbuf given: WIDEN_FLOATS) is widened ATTN_WIDEN_KEYS keys at a time, a product
 * each.
 */
void
cpu_attend_block(const float *q, int qs, const void *k, const void *v, int kvs, float *o,
				 int os, float *lse, int lses, int nq, int nk, int D, float scale, float *S,
				 float *wbuf)
{
	/* D is at most MAX_WIDTH = WIDEN_FLOATS (config.c): a chunk has a key at least */
	int			chunk = WIDEN_FLOATS / D < ATTN_WIDEN_KEYS ? (int) (WIDEN_FLOATS / D) : ATTN_WIDEN_KEYS;

	if (wbuf)
		for (int c0 = 0; c0 < nk; c0 += chunk)
		{
			int			n = nk - c0 < chunk ? nk - c0 : chunk;

			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, n, D, scale, q, qs,
						widen_keys(wbuf, k, kvs, c0, n, D), D, 0.0f, S + c0, nk);
		}
	else if (nq == 1)
		cblas_sgemv(CblasRowMajor, CblasNoTrans, nk, D, scale, k, kvs, q, 1, 0.0f, S, 1);
	else
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, D, scale,
					q, qs, k, kvs, 0.0f, S, nk);
	for (int i = 0; i < nq; i++)
	{
		float	   *s = S + (size_t) i * nk;
		int			n = nk - nq + i + 1;	/* causal: keys 0 .. own position */
		float		m = -INFINITY,
					sum,
					inv;

		for (int j = 0; j < n; j++)
			m = s[j] > m ? s[j] : m;
		for (int j = 0; j < n; j++)
			s[j] = fast_expf(s[j] - m);
		sum = vsum(s, n);
		inv = 1.0f / sum;
		for (int j = 0; j < n; j++)
			s[j] *= inv;
		memset(s + n, 0, (nk - n) * sizeof(float));
		if (lse)
			lse[(size_t) i * lses] = m + logf(sum);
	}
	if (wbuf)
		for (int c0 = 0; c0 < nk; c0 += chunk)
		{
			int			n = nk - c0 < chunk ? nk - c0 : chunk;

			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, D, n, 1.0f, S + c0, nk,
						widen_keys(wbuf, v, kvs, c0, n, D), D, c0 ? 1.0f : 0.0f, o, os);
		}
	else if (nq == 1)
		cblas_sgemv(CblasRowMajor, CblasTrans, nk, D, 1.0f, v, kvs, S, 1, 0.0f, o, 1);
	else
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, D, nk, 1.0f,
					S, nk, v, kvs, 0.0f, o, os);
}

/*
 * Decode (a span of one new token): group `group` of the span's heads, [h0, h1), which
 * also stores the token's k and v for those heads. A cache row holds every head of one
 * position, so the group reads its heads' slices of consecutive rows, key by key: one
 * plain stream when the group is all heads (up to ATTN_QBLOCK heads), instead of a piece
 * of every row per head. The scores of the group's heads ([h1 - h0, n]) fill the
 * thread's scratch; the softmax is normalised on the output, once per head.
 */
static void
attend_decode(const attn_args *a, const dl_span *sp, int group, int thread)
{
	int			D = a->head_dim,
				C = a->n_head * D,
				n = sp->pos + 1;	/* keys: every position up to the new one */
	int			h0 = a->n_head * group / a->groups,
				h1 = a->n_head * (group + 1) / a->groups;
	const float *q = a->qkv + (size_t) sp->first * 3 * C;
	size_t		c0 = (size_t) sp->slot * a->max_ctx * C;	/* the slot's first element */
	void	   *kc = kv_at(a->k_cache, c0, a->bf16),
			   *vc = kv_at(a->v_cache, c0, a->bf16);
	float	   *o = a->out + (size_t) sp->first * C,
			   *S = a->scratch + (size_t) thread * ATTN_QBLOCK * a->max_ctx;
	float		inv[ATTN_QBLOCK];

	kv_put(kc, (size_t) sp->pos * C + h0 * D, q + C + h0 * D, (h1 - h0) * D, a->bf16);
	kv_put(vc, (size_t) sp->pos * C + h0 * D, q + 2 * C + h0 * D, (h1 - h0) * D, a->bf16);
	for (int j = 0; j < n; j++)
		for (int h = h0; h < h1; h++)
			S[(size_t) (h - h0) * n + j] =
				a->scale * vdot(q + h * D, kv_at(kc, (size_t) j * C + h * D, a->bf16), D, a->bf16);
	for (int h = h0; h < h1; h++)
	{
		float	   *s = S + (size_t) (h - h0) * n;
		float		m = vmax(s, n);

		for (int j = 0; j < n; j++)
			s[j] = fast_expf(s[j] - m);
		inv[h - h0] = 1.0f / vsum(s, n);
	}
	memset(o + h0 * D, 0, (h1 - h0) * D * sizeof(float));
	for (int j = 0; j < n; j++)
		for (int h = h0; h < h1; h++)
			vaxpy(o + h * D, kv_at(vc, (size_t) j * C + h * D, a->bf16), S[(size_t) (h - h0) * n + j], D,
				  a->bf16);
	for (int h = h0; h < h1; h++)
		for (int d = 0; d < D; d++)
			o[h * D + d] *= inv[h - h0];
}

/* Tasks of span sp in a pass (cpu_attn_task). */
static int
span_tasks(const dl_span *sp, int n_head, int decode_groups)
{
	if (decode_groups > 0 && sp->len == 1)
		return decode_groups;
	return (sp->len + ATTN_QBLOCK - 1) / ATTN_QBLOCK * n_head;
}

cpu_attn_task
cpu_attn_task_of(const dl_spans *spans, int n_head, int decode_groups, int task)
{
	cpu_attn_task t = {spans->host, 0, 0, 0, 0};

	while (task >= span_tasks(t.sp, n_head, decode_groups))
		task -= span_tasks(t.sp++, n_head, decode_groups);
	t.index = task;
	t.h = task % n_head;
	t.t0 = task / n_head * ATTN_QBLOCK;
	t.nq = t.sp->len - t.t0 < ATTN_QBLOCK ? t.sp->len - t.t0 : ATTN_QBLOCK;
	return t;
}

int
cpu_attn_tasks(const dl_spans *spans, int n_head, int decode_groups)
{
	int			n = 0;

	for (int s = 0; s < spans->n; s++)
		n += span_tasks(&spans->host[s], n_head, decode_groups);
	return n;
}

/*
 * Tasks [lo, hi) of attention over the cache, each a group of heads of a decode span, or
 * one head of one block of query tokens of a longer span, over the span's cache slot.
 */
static void
attn_tasks(const void *ctx, size_t lo, size_t hi, int thread)
{
	const attn_args *a = ctx;
	int			C = a->n_head * a->head_dim;
	int			D = a->head_dim;

	for (size_t i = lo; i < hi; i++)
	{
		cpu_attn_task t = cpu_attn_task_of(a->spans, a->n_head, a->groups, (int) i);
		size_t		row,
					kv0;

		if (t.sp->len == 1)
		{
			attend_decode(a, t.sp, t.index, thread);
			continue;
		}
		row = t.sp->first + t.t0;	/* the block's first query */
		kv0 = (size_t) t.sp->slot * a->max_ctx * C + (size_t) t.h * D;
		/* keys 0 .. the block's last position */
		cpu_attend_block(a->qkv + row * 3 * C + t.h * D, 3 * C,
						 kv_at(a->k_cache, kv0, a->bf16), kv_at(a->v_cache, kv0, a->bf16), C,
						 a->out + row * C + t.h * D, C, NULL, 0,
						 t.nq, t.sp->pos + t.t0 + t.nq, D, a->scale,
						 a->scratch + (size_t) thread * ATTN_QBLOCK * a->max_ctx,
						 a->bf16 ? a->widen[thread] : NULL);
	}
}

/* Scores of one block of queries per thread. */
size_t
cpu_attention_workspace(dl_backend *be, int max_ctx)
{
	return (size_t) cpu_threads(be) * ATTN_QBLOCK * max_ctx * sizeof(float);
}

/*
 * Store k, v of the new tokens, then attend. Spans of more than one token are stored in
 * a first pass (a block's keys include the tokens of the blocks before it); decode spans
 * store their own in the attention pass, so that a pure decode step is one pass. A task
 * is one unit of work of its own (a head of a block, or of a decode), so each gets one.
 */
void
cpu_attention_forward(dl_backend *be, float *out, const float *qkv, void *k_cache,
					  void *v_cache, int max_ctx, const dl_spans *spans, int n_head,
					  int head_dim, float scale, void *workspace)
{
	/*
	 * A decode task takes all heads of its sequence (as many as its scratch holds): split
	 * into groups of heads, a sequence's cache is read as pieces of rows, and in a test
	 * of 1 to 4 sequences on 2 threads that took 1.5 to 2.5 times as long as whole rows
	 * on one thread, even with the other thread idle.
	 */
	cpu_backend *cb = cpu_of(be);
	attn_args	a = {out, qkv, k_cache, v_cache, cb->bf16, cb->widen, max_ctx, spans, n_head,
		head_dim, scale, workspace, (n_head + ATTN_QBLOCK - 1) / ATTN_QBLOCK};
	int			ntasks = cpu_attn_tasks(spans, n_head, a.groups),
				ndecode = 0;

	for (int s = 0; s < spans->n; s++)
		ndecode += spans->host[s].len == 1;
	if (ndecode < spans->n)
		cpu_for_rows(be, spans->n, spans->n, kv_store_spans, &a);
	cpu_for_rows(be, ntasks, ntasks, attn_tasks, &a);
}
