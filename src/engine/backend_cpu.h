/*
 * backend_cpu.h: what the files of the CPU backend share; the engine sees only backend.h.
 * One op family a file, as kernels/ splits the CUDA plugin:
 *
 *   backend_cpu.c           the backend's life (creation, the table of backend.h) and
 *                           cpu_for_loops, which runs an operation on the pool
 *   cpu_vec.h               inline vector math: loads, dot products, sums, exp
 *   cpu_memory.c            host memory, copies, upload_tensor
 *   cpu_embedding.c         row gathers (embedding, logit rows), the embedding's scatter-add
 *   cpu_layernorm.c         layer norm forward and backward
 *   cpu_matmul.c            matrix products: a decode micro-kernel of our own, else sgemm
 *   cpu_lora.c              LoRA's low-rank update of a product, forward and backward
 *   cpu_rotary.c            rotary position embedding, forward and backward
 *   cpu_attention.c         attention over the KV cache, and the block of scores both share
 *   cpu_attention_train.c   attention of whole sequences for training, forward and backward
 *   cpu_activation.c        GELU forward and backward
 *   cpu_loss.c              softmax cross-entropy
 *   cpu_optimizer.c         sum of squares (gradient clipping) and AdamW
 *   cpu_ranks.c             sums over data-parallel ranks, bfloat16 rounding
 *   cpu_sampling.c          sample_forward: sampler.c per row
 *
 * Every operation runs as ranges of its rows (or columns, or elements) on the backend's
 * thread pool through cpu_for_rows: a function fn(ctx, lo, hi, thread) that loops over
 * [lo, hi) as llm.c's layers loop over all rows, and a context struct of its arguments.
 */
#ifndef DOLLY_BACKEND_CPU_H
#define DOLLY_BACKEND_CPU_H

#include "backend.h"
#include "threadpool.h"

#define CPU_ALIGN 64

/* floats a thread widens from bfloat16 at a time for one sgemm (4 MB) */
#define WIDEN_FLOATS ((size_t) 1 << 20)

/* query tokens of one sequence per attention task (rows of its score block) */
#define ATTN_QBLOCK 32

typedef struct cpu_backend
{
	dl_backend	be;				/* first: a dl_backend * is a cpu_backend * */
	dl_threadpool *pool;
	int			bf16;			/* matrices and KV cache in bfloat16 (weight_elem_size 2) */
	float	  **widen;			/* bf16: per thread, WIDEN_FLOATS for sgemm operands */
} cpu_backend;

/* The CPU backend behind a dl_backend. */
static inline cpu_backend *
cpu_of(dl_backend *be)
{
	return (cpu_backend *) be;
}

/* Threads of the pool, the caller included. */
static inline int
cpu_threads(dl_backend *be)
{
	return threadpool_size(cpu_of(be)->pool);
}

/* --- running an operation on the pool (backend_cpu.c) --- */

/* The work of one task: items [lo, hi) of a loop, on pool thread `thread` (for scratch). */
typedef void (*cpu_rows_fn) (const void *ctx, size_t lo, size_t hi, int thread);

/*
 * A loop of an operation: n items (rows, columns, elements) cut into ntasks nearly equal
 * ranges whose bounds are multiples of grain (bar the end); ntasks is capped at the
 * number of grains, so that no task is empty (0 tasks: the loop is skipped).
 */
typedef struct cpu_loop
{
	cpu_rows_fn fn;
	size_t		n;
	int			ntasks;
	int			grain;
} cpu_loop;

/* columns per grain of a loop over columns: 16 floats, a cache line of every row */
#define CPU_COL_GRAIN 16

/* Run the tasks of nloops loops over ctx as one pass of the pool, and wait for them. */
void		cpu_for_loops(dl_backend *be, const void *ctx, const cpu_loop *loops, int nloops);

/* fn over rows [0, n) in ntasks ranges on the pool (one loop of cpu_for_loops). */
static inline void
cpu_for_rows(dl_backend *be, size_t n, int ntasks, cpu_rows_fn fn, const void *ctx)
{
	cpu_loop	loop = {fn, n, ntasks, 1};

	cpu_for_loops(be, ctx, &loop, 1);
}

/* fn over columns [0, n) in ntasks ranges of whole cache lines. */
static inline void
cpu_for_cols(dl_backend *be, size_t n, int ntasks, cpu_rows_fn fn, const void *ctx)
{
	cpu_loop	loop = {fn, n, ntasks, CPU_COL_GRAIN};

	cpu_for_loops(be, ctx, &loop, 1);
}

/* Tasks for n rows of per_row floats: enough to balance, none too small to share out. */
int			cpu_row_tasks(dl_backend *be, size_t n, size_t per_row);

/* --- the operations, by file (shapes and semantics: backend.h) --- */

/* cpu_memory.c */
void	   *cpu_alloc(dl_backend *be, size_t bytes, dl_error *err);
void		cpu_free(dl_backend *be, void *ptr);
void		cpu_zero(dl_backend *be, void *dst, size_t bytes);
void		cpu_copy(dl_backend *be, void *dst, const void *src, size_t bytes);
dl_status	cpu_transfer(dl_backend *be, void *dst, const void *src, size_t bytes,
						 dl_error *err);
dl_status	cpu_synchronize(dl_backend *be, dl_error *err);
dl_status	cpu_upload_tensor(dl_backend *be, void *dst, dl_fmt fmt, const st_tensor *t,
							  const int32_t *rows, dl_error *err);

/* cpu_embedding.c */
void		cpu_embedding_forward(dl_backend *be, float *out, const void *table,
								  const int32_t *ids, int T, int C);
void		cpu_gather_rows_forward(dl_backend *be, float *out, const float *in,
									const int32_t *rows, int n, int C);
void		cpu_embedding_backward(dl_backend *be, float *dtable, const float *dout,
								   const int32_t *ids, int T, int C);

/* cpu_layernorm.c */
void		cpu_layernorm_forward(dl_backend *be, float *out, float *mean, float *rstd,
								  const float *in, const float *w, const float *b, int T, int C,
								  float eps);
void		cpu_layernorm_backward(dl_backend *be, float *din, float *dw, float *db,
								   const float *dout, const float *in, const float *mean,
								   const float *rstd, const float *w, int T, int C);

/* columns whose sums over rows one pass keeps in double accumulators (dw, db, dbias) */
#define COLSUM_BLOCK 64

/* cpu_matmul.c */
void		cpu_matmul_forward(dl_backend *be, float *out, const float *in, const void *W,
							   const float *bias, int M, int K, int N, int accumulate);
void		cpu_matmul_backward(dl_backend *be, float *din, float *dW, float *dbias,
								const float *dout, const float *in, const void *W, int M, int K,
								int N);

/* cpu_lora.c */
void		cpu_lora_forward(dl_backend *be, float *out, int ldo, float *u, const float *in,
							 int K, const dl_lora_seg *segs, int nseg, float *workspace);
void		cpu_lora_backward(dl_backend *be, float *din, const float *dout, int ldo, float *u,
							  const float *in, const dl_lora_mats *w, int M, int K, int N,
							  float *workspace);

/* cpu_rotary.c */
void		cpu_rotary_forward(dl_backend *be, float *x, int stride, int T, int n_head,
							   int head_dim, int rot_dim, int interleaved, const int32_t *pos,
							   const float *cos_sin);
void		cpu_rotary_backward(dl_backend *be, float *dx, int stride, int T, int n_head,
								int head_dim, int rot_dim, int interleaved, const int32_t *pos,
								const float *cos_sin);

/* cpu_attention.c */
void		cpu_attention_forward(dl_backend *be, float *out, const float *qkv, void *k_cache,
								  void *v_cache, int max_ctx, const dl_spans *spans, int n_head,
								  int head_dim, float scale, void *workspace);
size_t		cpu_attention_workspace(dl_backend *be, int max_ctx);

/*
 * Causal softmax attention of one head for a block of nq queries, the last nq of nk
 * positions (cpu_attention.c; the training forward uses it too).
 */
void		cpu_attend_block(const float *q, int qs, const void *k, const void *v, int kvs,
							 float *o, int os, float *lse, int lses, int nq, int nk, int D,
							 float scale, float *S, float *wbuf);

/*
 * One task of an attention pass over spans. Tasks are numbered span by span; a span takes
 * one per head and block of ATTN_QBLOCK queries, head first, except that in a pass with
 * decode_groups > 0 a span of one token (a decode over the cache) takes decode_groups,
 * each a group of heads.
 */
typedef struct cpu_attn_task
{
	const dl_span *sp;
	int			index;			/* the task within its span (a decode: its group of heads) */
	int			h;				/* else head h of the block of queries [t0, t0 + nq) */
	int			t0;
	int			nq;
} cpu_attn_task;

/* Task `task` of a pass over spans. */
cpu_attn_task cpu_attn_task_of(const dl_spans *spans, int n_head, int decode_groups, int task);

/* Number of tasks of a pass over spans. */
int			cpu_attn_tasks(const dl_spans *spans, int n_head, int decode_groups);

/* cpu_attention_train.c */
void		cpu_attention_train_forward(dl_backend *be, float *out, float *lse, const float *qkv,
										const dl_spans *spans, int n_head, int head_dim,
										float scale, void *workspace);
size_t		cpu_attention_train_workspace(dl_backend *be, int max_len, int n_head);
void		cpu_attention_backward(dl_backend *be, float *dqkv, const float *dout,
								   const float *qkv, const float *out, const float *lse,
								   const dl_spans *spans, int n_head, int head_dim, float scale,
								   void *workspace);

/* cpu_activation.c */
void		cpu_gelu_forward(dl_backend *be, float *out, const float *in, size_t n, dl_gelu form);
void		cpu_gelu_backward(dl_backend *be, float *din, const float *in, const float *dout,
							  size_t n, dl_gelu form);

/* cpu_loss.c */
void		cpu_crossentropy_forward(dl_backend *be, float *losses, float *dlogits,
									 const float *logits, const int32_t *labels, int T, int V);

/* cpu_ranks.c */
void		cpu_sum_ranks(dl_backend *be, float *out, const void *const *src, int nsrc, size_t n,
						  int bf16, int accumulate);
void		cpu_to_bf16(dl_backend *be, uint16_t *dst, const float *src, size_t n);

/* cpu_optimizer.c */
dl_status	cpu_sum_squares(dl_backend *be, const float *x, size_t n, double *out, dl_error *err);
void		cpu_adamw_update(dl_backend *be, float *param, const float *grad, float *m, float *v,
							 size_t n, const dl_adamw *h);

/* cpu_sampling.c */
void		cpu_sample_forward(dl_backend *be, int32_t *tokens, const float *logits,
							   const dl_sample_row *rows, int R, int V, void *workspace);
size_t		cpu_sample_workspace(dl_backend *be, int R, int V);

#endif
