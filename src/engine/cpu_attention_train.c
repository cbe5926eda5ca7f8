/*
 * cpu_attention_train.c: causal self-attention for training, forward and backward, over
 * a batch of independent sequences (spans of rows of qkv [T, 3C]) without a cache.
 *
 * The forward keeps the log-sum-exp of every row and head, so that the backward rebuilds
 * the probabilities instead of storing them (FlashAttention-2's scheme). A span of L
 * tokens is taken in blocks of ATTN_QBLOCK queries: block [t0, t0 + nq) sees only keys
 * [0, t0 + nq), which skips most of the masked half of each product.
 */
#include "backend_cpu.h"
#include "cpu_vec.h"

#include <cblas.h>
#include <string.h>

typedef struct attn_train_args
{
	float	   *out;			/* forward: written */
	float	   *lse;
	const float *saved_out;		/* backward: the forward's out and lse */
	const float *saved_lse;
	float	   *dqkv;
	const float *dout;
	const float *qkv;
	const dl_spans *spans;
	int			n_head;
	int			head_dim;
	float		scale;
	float	   *scratch;
	size_t		per_thread;		/* scratch floats of one thread */
} attn_train_args;

/* Workspace floats per thread: a block of scores and one of their gradients. */
static size_t
attn_train_per_thread(int max_len)
{
	return (size_t) 2 * ATTN_QBLOCK * max_len;
}

/* Scratch for spans of up to max_len tokens, one share per thread (a task is one head). */
size_t
cpu_attention_train_workspace(dl_backend *be, int max_len, int n_head)
{
	(void) n_head;
	return (size_t) cpu_threads(be) * attn_train_per_thread(max_len) * sizeof(float);
}

/* Set up the arguments of a training attention pass; the scratch stride fits its spans. */
static attn_train_args
attn_train_setup(const dl_spans *spans, int n_head, int head_dim, float scale, void *workspace)
{
	attn_train_args a = {.spans = spans, .n_head = n_head, .head_dim = head_dim,
	.scale = scale, .scratch = workspace};
	int			longest = 1;

	for (int s = 0; s < spans->n; s++)
		longest = spans->host[s].len > longest ? spans->host[s].len : longest;
	a.per_thread = attn_train_per_thread(longest);
	return a;
}

/*
 * Tasks [lo, hi) of the forward, each one head of one block of query tokens of one span,
 * keys and values from qkv itself.
 */
static void
attn_train_tasks(const void *ctx, size_t lo, size_t hi, int thread)
{
	const attn_train_args *a = ctx;
	int			C = a->n_head * a->head_dim;
	int			D = a->head_dim;

	for (size_t i = lo; i < hi; i++)
	{
		cpu_attn_task t = cpu_attn_task_of(a->spans, a->n_head, 0, (int) i);
		const float *base = a->qkv + (size_t) t.sp->first * 3 * C + (size_t) t.h * D;
		size_t		row = t.sp->first + t.t0;	/* of the block's first query */

		cpu_attend_block(base + (size_t) t.t0 * 3 * C, 3 * C, base + C, base + 2 * C, 3 * C,
						 a->out + row * C + t.h * D, C, a->lse + row * a->n_head + t.h, a->n_head,
						 t.nq, t.t0 + t.nq, D, a->scale,
						 a->scratch + (size_t) thread * a->per_thread, NULL);
	}
}

/* Causal attention within each span, keeping the log-sum-exp of every row and head. */
void
cpu_attention_train_forward(dl_backend *be, float *out, float *lse, const float *qkv,
							const dl_spans *spans, int n_head, int head_dim, float scale,
							void *workspace)
{
	attn_train_args a = attn_train_setup(spans, n_head, head_dim, scale, workspace);
	int			ntasks = cpu_attn_tasks(spans, n_head, 0);

	a.out = out;
	a.lse = lse;
	a.qkv = qkv;
	cpu_for_rows(be, ntasks, ntasks, attn_train_tasks, &a);
}

/*
 * The backward of one head of one span (a task owns its span's dK and dV, which every
 * query block adds to). Per block of queries, with P rebuilt from the saved lse:
 * P = exp(scale Q K^T - lse), dP = dO V^T, dS = P (dP - rowsum(dO O)),
 * dQ += scale dS K, dK += scale dS^T Q, dV += P^T dO (FlashAttention-2's backward).
 */
static void
attn_back_head(const attn_train_args *a, const dl_span *sp, int h, float *P, float *dP)
{
	int			H = a->n_head,
				D = a->head_dim,
				C = H * D;
	size_t		q0 = (size_t) sp->first * 3 * C + (size_t) h * D,
				o0 = (size_t) sp->first * C + (size_t) h * D;
	const float *Q = a->qkv + q0,
			   *K = Q + C,
			   *V = Q + 2 * C,
			   *O = a->saved_out + o0,
			   *dO = a->dout + o0,
			   *lse = a->saved_lse + (size_t) sp->first * H + h;
	float	   *dQ = a->dqkv + q0,
			   *dK = dQ + C,
			   *dV = dQ + 2 * C;

	for (int t0 = 0; t0 < sp->len; t0 += ATTN_QBLOCK)
	{
		int			nq = sp->len - t0 < ATTN_QBLOCK ? sp->len - t0 : ATTN_QBLOCK;
		int			nk = t0 + nq;

		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, D, a->scale,
					Q + (size_t) t0 * 3 * C, 3 * C, K, 3 * C, 0.0f, P, nk);
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, D, 1.0f,
					dO + (size_t) t0 * C, C, V, 3 * C, 0.0f, dP, nk);
		for (int i = 0; i < nq; i++)
		{
			float	   *pr = P + (size_t) i * nk,
					   *dpr = dP + (size_t) i * nk;
			const float *o = O + (size_t) (t0 + i) * C,
					   *g = dO + (size_t) (t0 + i) * C;
			float		l = lse[(size_t) (t0 + i) * H],
						di = 0.0f;
			int			n = t0 + i + 1;

			for (int d = 0; d < D; d++)
				di += o[d] * g[d];
			for (int j = 0; j < n; j++)
			{
				float		pj = fast_expf(pr[j] - l);

				pr[j] = pj;
				dpr[j] = pj * (dpr[j] - di);
			}
			memset(pr + n, 0, (nk - n) * sizeof(float));
			memset(dpr + n, 0, (nk - n) * sizeof(float));
		}
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, D, nk, a->scale,
					dP, nk, K, 3 * C, 1.0f, dQ + (size_t) t0 * 3 * C, 3 * C);
		cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, D, nq, a->scale,
					dP, nk, Q + (size_t) t0 * 3 * C, 3 * C, 1.0f, dK, 3 * C);
		cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, D, nq, 1.0f,
					P, nk, dO + (size_t) t0 * C, C, 1.0f, dV, 3 * C);
	}
}

/* Tasks [lo, hi) of the backward: task i is head i % n_head of span i / n_head. */
static void
attn_back_tasks(const void *ctx, size_t lo, size_t hi, int thread)
{
	const attn_train_args *a = ctx;
	float	   *P = a->scratch + (size_t) thread * a->per_thread;

	for (size_t i = lo; i < hi; i++)
		attn_back_head(a, &a->spans->host[i / a->n_head], (int) (i % a->n_head),
					   P, P + a->per_thread / 2);
}

/* Attention backward: one task per span and head. */
void
cpu_attention_backward(dl_backend *be, float *dqkv, const float *dout, const float *qkv,
					   const float *out, const float *lse, const dl_spans *spans, int n_head,
					   int head_dim, float scale, void *workspace)
{
	attn_train_args a = attn_train_setup(spans, n_head, head_dim, scale, workspace);

	a.saved_out = out;
	a.saved_lse = lse;
	a.dqkv = dqkv;
	a.dout = dout;
	a.qkv = qkv;
	cpu_for_rows(be, (size_t) spans->n * n_head, spans->n * n_head, attn_back_tasks, &a);
}
