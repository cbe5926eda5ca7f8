/*
 * backend.h: the compute backend seam (device buffers and the operations of the model).
 *
 * A backend owns memory on a device and runs the operations of the transformer on it.
 * The model code allocates, uploads and calls operations only through this table, so it
 * never knows which backend runs it. The CPU backend (backend_cpu.c and its cpu_*.c:
 * OpenBLAS and a pthread pool) is the reference; the CUDA plugin (kernels/) fills the
 * same table.
 *
 * Pointers marked "device" are addresses in the backend's memory: the host may not
 * dereference them (on the CPU backend, host_memory, it happens to be able to). Shapes
 * are written as [rows, cols], row-major, in elements. Activations are float32 on every
 * backend; matrices ("weight format", DL_FMT_WEIGHT) are float32 on the CPU by default and
 * may be narrower (bfloat16 on CUDA, and on the CPU when asked), so their size in bytes is
 * weight_elem_size per element.
 * The KV cache is in the backend's kv format, kv_elem_size bytes per element.
 *
 * Operations are named <op>_forward; training adds <op>_backward functions beside them,
 * which ACCUMULATE (+=) into gradient buffers (llm.c's convention, see the backward
 * section), and the optimizer step. Operations may run asynchronously: their failures
 * surface at the next call that returns a dl_status (download, synchronize).
 *
 * A backend is used by one thread at a time.
 *
 * See docs/ARCHITECTURE.md, the parts.
 */
#ifndef DOLLY_BACKEND_H
#define DOLLY_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "safetensors.h"
#include "sampler.h"

#ifdef __cplusplus
extern "C"
{
#endif

/* How a tensor is stored on the device. */
typedef enum dl_fmt
{
	DL_FMT_F32,					/* float32: vectors (norm weights, biases), activations */
	DL_FMT_WEIGHT				/* the backend's matrix format (weight_elem_size bytes) */
} dl_fmt;

/* GELU forms: config.h's dl_act values map onto these one to one. */
typedef enum dl_gelu
{
	DL_GELU_TANH,				/* 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))) */
	DL_GELU_ERF					/* 0.5x(1 + erf(x / sqrt(2))) */
} dl_gelu;

/*
 * The settings of one AdamW step (torch.optim.AdamW). The gradient it applies is
 * grad * grad_scale: the trainer folds the division by the label count and the
 * clipping factor into that one multiplication.
 */
typedef struct dl_adamw
{
	float		lr;
	float		beta1;
	float		beta2;
	float		eps;
	float		weight_decay;
	float		grad_scale;
	int			step;			/* 1 for the first step: bias correction 1 - beta^step */
} dl_adamw;

/*
 * The new tokens of one sequence in a batch: tokens [first, first + len) of the batch
 * rows, at positions [pos, pos + len) of cache slot `slot`. pos is also the number of
 * tokens of that sequence already in the cache.
 */
typedef struct dl_span
{
	int32_t		first;
	int32_t		len;
	int32_t		slot;
	int32_t		pos;
} dl_span;

/* The sequences of one forward pass: n spans, on the host and (the same) on the device. */
typedef struct dl_spans
{
	int			n;
	const dl_span *host;
	const dl_span *dev;			/* device */
} dl_spans;

/*
 * One adapter's low-rank pair on one matrix product (LoRA, Hu et al. 2021, as PEFT's
 * lora.Linear computes it), for lora_forward and lora_backward. Float32 whatever the
 * weight format: adapters are small.
 */
typedef struct dl_lora_mats
{
	const float *A;				/* [r, K] device: lora_A */
	const float *B;				/* [N, r] device: lora_B */
	float	   *dA;				/* backward: gradients accumulate (+=) here; NULL: none */
	float	   *dB;
	int			r;
	float		scale;			/* lora_alpha / r */
	float		dropout;		/* p of zeroing an input element (training); 0: none */
	uint64_t	seed;			/* of the dropout draws (dropout.h) */
} dl_lora_mats;

/* One adapter's product over a run of rows, for lora_forward. */
typedef struct dl_lora_seg
{
	dl_lora_mats w;
	int			first;			/* rows [first, first + M) of in and out */
	int			M;
	int			col0;			/* out's columns [col0, col0 + N) */
	int			N;
} dl_lora_seg;
/* Most sources of one sum_ranks: the ranks of a group. */
#define DL_MAX_RANK_SOURCES 64

/* An allocation exported to other processes (peer_export): CUDA's IPC handle and device. */
typedef struct dl_peer_handle
{
	unsigned char bytes[120];
	int32_t		device;
	int32_t		pad;
} dl_peer_handle;

typedef struct dl_backend dl_backend;

struct dl_backend
{
	const char *name;			/* "cpu", "cuda:0" */
	size_t		weight_elem_size;	/* bytes per element of DL_FMT_WEIGHT */
	size_t		kv_elem_size;	/* bytes per element of the KV cache */
	size_t		alignment;		/* sub-buffers carved from one allocation start at multiples */
	int			threads;		/* host threads it computes with (CPU), else 0 */
	int			host_memory;	/* its device pointers are host pointers (CPU) */

	/* --- memory --- */

	/* Allocate bytes of device memory (contents undefined); NULL and err on failure. */
	void	   *(*alloc) (dl_backend *be, size_t bytes, dl_error *err);
	/* Free what alloc returned; NULL is accepted. */
	void		(*free) (dl_backend *be, void *ptr);
	/* Set bytes of device memory to zero. */
	void		(*zero) (dl_backend *be, void *dst, size_t bytes);
	/* Copy bytes from the host to the device. */
	dl_status	(*upload) (dl_backend *be, void *dst, const void *src, size_t bytes,
						   dl_error *err);
	/* Copy bytes from the device to the host, after every operation queued before. */
	dl_status	(*download) (dl_backend *be, void *dst, const void *src, size_t bytes,
							 dl_error *err);
	/*
	 * Copy bytes within the device (the regions do not overlap); src may be another
	 * rank's memory mapped by peer_open.
	 */
	void		(*copy) (dl_backend *be, void *dst, const void *src, size_t bytes);
	/* Wait for every queued operation; reports a failure of any of them. */
	dl_status	(*synchronize) (dl_backend *be, dl_error *err);

	/*
	 * Convert a safetensors tensor (F32, F16 or BF16) seen as [rows, cols] (cols = its
	 * last dimension; a 1-D tensor is [numel, 1]) to format fmt at dst. Row r of dst is
	 * row rows[r] of t, or row r when rows is NULL (a permutation applied at load).
	 */
	dl_status	(*upload_tensor) (dl_backend *be, void *dst, dl_fmt fmt,
								  const st_tensor *t, const int32_t *rows, dl_error *err);

	/* --- forward operations (device pointers; int32 index arrays are device too) --- */

	/* out[T,C] = table[ids[t], :]; table [V,C] in weight format. */
	void		(*embedding_forward) (dl_backend *be, float *out, const void *table,
									  const int32_t *ids, int T, int C);

	/* out[n,C] = in[rows[i], :]; picks the rows whose logits are wanted. */
	void		(*gather_rows_forward) (dl_backend *be, float *out, const float *in,
										const int32_t *rows, int n, int C);

	/*
	 * out[T,C] = (in - mean) * rstd * w + b per row, rstd = 1/sqrt(var + eps) with the
	 * biased variance (torch.nn.LayerNorm). mean[T] and rstd[T] are written when not NULL
	 * (the training pass keeps them for layernorm_backward). out may equal in.
	 */
	void		(*layernorm_forward) (dl_backend *be, float *out, float *mean, float *rstd,
									  const float *in, const float *w, const float *b,
									  int T, int C, float eps);

	/*
	 * out[M,N] = in[M,K] @ W[N,K]^T + bias[N] (bias may be NULL); W in weight format
	 * (nn.Linear's [out, in]). With accumulate, the product is added to out instead
	 * (residual connections cost no extra pass).
	 */
	void		(*matmul_forward) (dl_backend *be, float *out, const float *in, const void *W,
								   const float *bias, int M, int K, int N, int accumulate);

	/*
	 * Rotary position embedding in place on n_head heads of head_dim floats per row of x
	 * (row stride `stride` floats), T rows, row t at position pos[t]: the first rot_dim
	 * dims of each head are rotated by angle pos * inv_freq[j], j < rot_dim/2.
	 * cos_sin [max_pos, rot_dim] holds cos(pos * inv_freq[j]) at [pos, j] and the sine at
	 * [pos, rot_dim/2 + j] (computed once by the model in float32 as transformers does).
	 * interleaved (GPT-J rotate_every_two): pairs (2j, 2j+1); otherwise (NeoX
	 * rotate_half): pairs (j, j + rot_dim/2).
	 */
	void		(*rotary_forward) (dl_backend *be, float *x, int stride, int T, int n_head,
								   int head_dim, int rot_dim, int interleaved,
								   const int32_t *pos, const float *cos_sin);

	/*
	 * Causal attention of a batch of sequences over the KV cache of one layer.
	 * qkv [T, 3C] (C = n_head * head_dim): q | k | v of each new token, heads contiguous
	 * within each, rotary applied. k_cache, v_cache: [n_slots, max_ctx, C] in kv format.
	 * First the k and v of every new token are stored at (slot, pos); then each new token
	 * at position p of span s attends to positions 0..p of its slot:
	 * out[t, h] = softmax(q_h . k_h[0..p] * scale) @ v_h[0..p], out [T, C].
	 * Prefill (len > 1, cached prefix or not) and decode (len 1) mix freely in one call.
	 * workspace: attention_workspace(be, max_ctx) bytes of device memory, owned by the
	 * caller (allocated once with the cache).
	 */
	void		(*attention_forward) (dl_backend *be, float *out, const float *qkv,
									  void *k_cache, void *v_cache, int max_ctx,
									  const dl_spans *spans, int n_head, int head_dim,
									  float scale, void *workspace);
	/* Bytes of workspace attention_forward needs for contexts of up to max_ctx. */
	size_t		(*attention_workspace) (dl_backend *be, int max_ctx);

	/* out[n] = gelu(in[n]) in the given form; out may equal in. */
	void		(*gelu_forward) (dl_backend *be, float *out, const float *in, size_t n,
								 dl_gelu form);

	/*
	 * tokens[R] = sampler.h's sample_draw of each row of logits [R, V] with rows[R] (its
	 * parameters and uniform): the first argmax when greedy, else the kept token where
	 * the uniform falls. Generation downloads these R ids instead of R * V logits.
	 * workspace: sample_workspace(be, R, V) bytes.
	 */
	void		(*sample_forward) (dl_backend *be, int32_t *tokens, const float *logits,
								   const dl_sample_row *rows, int R, int V, void *workspace);
	/* Bytes of workspace sample_forward needs for up to R rows of V logits. */
	size_t		(*sample_workspace) (dl_backend *be, int R, int V);

	/*
	 * LoRA's updates of a product out = in @ W^T, one per segment (Punica's SGMV: the
	 * sequences of a batch that share an adapter): for rows [first, first + M) of in and
	 * out, u = drop(in[M, K]) @ A^T, then out[:, col0 .. col0 + N) += scale * u @ B^T,
	 * out's rows ldo floats apart (an adapter of q_proj adds to q's columns of qkv). The
	 * segments' u [M, r] lie one after another in u, in segment order, and are kept for
	 * lora_backward. drop (p = w.dropout > 0) keeps element (m, k) of a segment's in when
	 * dropout.h's draw for (seed, m, k) says so, scaled by 1 / (1 - p): the same mask on
	 * every backend, drawn again by the backward instead of kept. workspace: M * K floats
	 * a segment, one after another, when p > 0, else unused. Segments may share rows when
	 * their columns differ; the backend runs them all as one operation.
	 */
	void		(*lora_forward) (dl_backend *be, float *out, int ldo, float *u, const float *in,
								 int K, const dl_lora_seg *segs, int nseg, float *workspace);

	/* --- training: forward operations that keep what backward needs --- */

	/*
	 * Causal self-attention of a batch of independent sequences, without a cache: span s
	 * is rows [first, first + len) of qkv [T, 3C] (laid out as for attention_forward,
	 * rotary applied at positions 0 .. len - 1; slot and pos are not used) and each row
	 * attends to the rows of its span up to itself. out [T, C] as attention_forward;
	 * lse [T, n_head] receives the log-sum-exp of each row's scaled scores, from which
	 * attention_backward rebuilds the probabilities (FlashAttention's trick: nothing of
	 * size T x T is kept). workspace: attention_train_workspace(be, longest span) bytes.
	 */
	void		(*attention_train_forward) (dl_backend *be, float *out, float *lse,
											const float *qkv, const dl_spans *spans,
											int n_head, int head_dim, float scale,
											void *workspace);
	/*
	 * Bytes of workspace attention_train_forward and attention_backward need for spans of
	 * up to max_len tokens and n_head heads.
	 */
	size_t		(*attention_train_workspace) (dl_backend *be, int max_len, int n_head);

	/*
	 * Softmax cross-entropy of each row of logits [T, V] (float32) against labels [T]:
	 * losses[t] = logsumexp(logits[t]) - logits[t, labels[t]], and 0 where labels[t] < 0
	 * (-100: masked). With dlogits (it may be logits itself), also the gradient of the
	 * SUM of the losses: softmax - onehot on counted rows, 0 on masked rows. dlogits is
	 * written, not accumulated: it is where the backward pass starts.
	 */
	void		(*crossentropy_forward) (dl_backend *be, float *losses, float *dlogits,
										 const float *logits, const int32_t *labels,
										 int T, int V);

	/*
	 * --- backward operations ---
	 *
	 * Each takes the gradient of a scalar loss with respect to an operation's output
	 * (dout) and ACCUMULATES (+=) the gradients with respect to its inputs and parameters
	 * into the buffers given (llm.c's convention): a tensor used twice (a normed input
	 * that feeds both attention and MLP, the residual stream) sums its gradients without
	 * extra passes, and the caller zeroes each buffer before its first use. The one
	 * exception is rotary_backward, which works in place like rotary_forward. Gradients,
	 * parameter gradients included, are float32 whatever the weight format.
	 */

	/* dtable[ids[t], :] += dout[t, :] (ids may repeat); also gather_rows_forward's backward. */
	void		(*embedding_backward) (dl_backend *be, float *dtable, const float *dout,
									   const int32_t *ids, int T, int C);

	/*
	 * Of layernorm_forward, from its input and saved mean and rstd [T]:
	 * din[T,C] += rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) with dxhat = dout w,
	 * dw[C] += sum over rows of dout xhat, db[C] += sum over rows of dout (both skipped
	 * when dw is NULL: a frozen norm).
	 */
	void		(*layernorm_backward) (dl_backend *be, float *din, float *dw, float *db,
									   const float *dout, const float *in, const float *mean,
									   const float *rstd, const float *w, int T, int C);

	/*
	 * Of out[M,N] = in[M,K] @ W[N,K]^T + bias: din[M,K] += dout @ W, dW[N,K] += dout^T @
	 * in, dbias[N] += the column sums of dout; each skipped when its buffer is NULL (a
	 * frozen W). W in weight format, dW float32.
	 */
	void		(*matmul_backward) (dl_backend *be, float *din, float *dW, float *dbias,
									const float *dout, const float *in, const void *W,
									int M, int K, int N);

	/*
	 * Of rotary_forward, in place on the gradient dx (same arguments): the rotation is
	 * orthogonal, so its backward is the rotation by the opposite angle.
	 */
	void		(*rotary_backward) (dl_backend *be, float *dx, int stride, int T, int n_head,
									int head_dim, int rot_dim, int interleaved,
									const int32_t *pos, const float *cos_sin);

	/*
	 * Of attention_train_forward: dqkv[T, 3C] += the gradients of q, k and v (same layout
	 * as qkv), from dout [T, C] and the forward's qkv, out and lse. workspace as for the
	 * forward.
	 */
	void		(*attention_backward) (dl_backend *be, float *dqkv, const float *dout,
									   const float *qkv, const float *out, const float *lse,
									   const dl_spans *spans, int n_head, int head_dim,
									   float scale, void *workspace);

	/*
	 * Of lora_forward, from dout (rows ldo floats apart), its in and u: dB[N, r] += scale
	 * dout^T u; then u becomes du = scale dout B; dA[r, K] += du^T drop(in); din[M, K] +=
	 * drop'(du A) (din may be NULL). workspace as for the forward.
	 */
	void		(*lora_backward) (dl_backend *be, float *din, const float *dout, int ldo, float *u,
								  const float *in, const dl_lora_mats *w, int M, int K, int N,
								  float *workspace);

	/* din[n] += gelu'(in[n]) * dout[n], in the given form (in: GELU's input). */
	void		(*gelu_backward) (dl_backend *be, float *din, const float *in,
								  const float *dout, size_t n, dl_gelu form);

	/* --- the optimizer --- */

	/* *out = sum of x[i]^2 over n floats, accumulated in double, after queued operations. */
	dl_status	(*sum_squares) (dl_backend *be, const float *x, size_t n, double *out,
								dl_error *err);

	/*
	 * One AdamW step on n float32 parameters, torch's order: param -= lr wd param;
	 * m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2;
	 * param -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps),
	 * with g = grad * grad_scale.
	 */
	void		(*adamw_update) (dl_backend *be, float *param, const float *grad, float *m,
								 float *v, size_t n, const dl_adamw *h);

	/* --- sums over ranks (collective.c) --- */

	/*
	 * out[i] = src[0][i] + src[1][i] + ... + src[nsrc - 1][i] for i < n, added in that
	 * order (rank order: every rank computes the same bits) in float32; with accumulate,
	 * out[i] + that sum. The src hold float32, or with bf16 bfloat16 bits, and may be
	 * other ranks' memory mapped by peer_open; out may be one of them (element i is read
	 * before it is written). nsrc <= DL_MAX_RANK_SOURCES.
	 */
	void		(*sum_ranks) (dl_backend *be, float *out, const void *const *src, int nsrc,
							  size_t n, int bf16, int accumulate);
	/*
	 * sum_ranks on a second queue, where the backend has one (NULL where not): it runs
	 * after the operations the caller has waited for (synchronize) and alongside those it
	 * queues next, until sum_ranks_wait, which waits for it and reports its failure.
	 */
	void		(*sum_ranks_aside) (dl_backend *be, float *out, const void *const *src, int nsrc,
									size_t n, int bf16, int accumulate);
	dl_status	(*sum_ranks_wait) (dl_backend *be, dl_error *err);
	/* dst[n] = src[n] rounded to bfloat16 (nearest even), as bits. */
	void		(*to_bf16) (dl_backend *be, uint16_t *dst, const float *src, size_t n);

	/*
	 * Device memory that other processes map (CUDA IPC), so that ranks sum from each
	 * other's buffers; NULL on a backend whose memory is the host's (its ranks share host
	 * memory through their caller). peer_export describes an allocation mem (what alloc
	 * returned) in a handle; another process's peer_open maps it, *mem its address there
	 * (for sum_ranks and copy, after the owner's writes that the ranks' barrier orders);
	 * peer_close unmaps it, before the owner frees it. A failure is DL_EUNSUPPORTED (this
	 * pair of devices cannot, or the driver refuses), and the caller sums another way.
	 */
	dl_status	(*peer_export) (dl_backend *be, void *mem, dl_peer_handle *h, dl_error *err);
	dl_status	(*peer_open) (dl_backend *be, const dl_peer_handle *h, void **mem, dl_error *err);
	void		(*peer_close) (dl_backend *be, void *mem);

	/* Release the backend and everything it holds; buffers must have been freed. */
	void		(*destroy) (dl_backend *be);
};

/*
 * The CPU backend with `threads` compute threads (>= 1): OpenBLAS for matrix products,
 * a persistent thread pool for the other operations. With bf16 its matrices and its KV
 * cache are bfloat16 (rounded to nearest even, widened to float32 in the products): half
 * the memory, and a faster decode, which reads every weight and the cache at every token;
 * inference only (training needs float32 weights).
 */
dl_status	backend_cpu_create(int threads, int bf16, dl_backend **out, dl_error *err);

/* What the CUDA backend stores and how it multiplies. */
typedef enum dl_cuda_mode
{
	DL_CUDA_BF16,				/* serving: bfloat16 weights and KV cache, bfloat16 products
								 * accumulated in float32 */
	DL_CUDA_FP32,				/* tests: float32 throughout, no TF32 (matches float32 references) */
	DL_CUDA_MIXED				/* training: float32 weights (the master copy AdamW updates, with
								 * gradients laid out alike), products on bfloat16 tensor cores */
} dl_cuda_mode;

/*
 * The CUDA backend on GPU `device` in the given mode, from the plugin at plugin_path
 * (dolly_cuda.so, loaded on first use: nothing that links the engine links CUDA). No
 * plugin is DL_EUNSUPPORTED; no GPU, a driver or device failure DL_EBACKEND.
 */
dl_status	backend_cuda_create(const char *plugin_path, int device, dl_cuda_mode mode,
								dl_backend **out, dl_error *err);

#ifdef __cplusplus
}
#endif

#endif
