/*
 * common.cuh: what the CUDA plugin's files share: the backend's state, error plumbing,
 * number conversions and reductions used by the kernels, and the entry points each file
 * gives to the backend table (assembled in backend.cu).
 *
 * Operations of backend.h that return void run asynchronously on the backend's stream;
 * a failure to launch them is kept in cuda_backend.pending and reported by the next
 * operation that returns a dl_status (upload, download, synchronize, upload_tensor).
 */
#ifndef DOLLY_KERNELS_COMMON_CUH
#define DOLLY_KERNELS_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <type_traits>

extern "C" {
#include "backend.h"
#include "error.h"
}

/* Turn a failed CUDA runtime call into a dl_error naming the call, and return. */
#define CUDA_TRY(call, err) do { \
	cudaError_t e_ = (call); \
	if (e_ != cudaSuccess) \
		return dl_fail((err), DL_EBACKEND, "%s failed: %s", #call, cudaGetErrorString(e_)); \
	} while (0)

/* The same for cuBLAS. */
#define CUBLAS_TRY(call, err) do { \
	cublasStatus_t s_ = (call); \
	if (s_ != CUBLAS_STATUS_SUCCESS) \
		return dl_fail((err), DL_EBACKEND, "%s failed: %s", #call, cublasGetStatusString(s_)); \
	} while (0)

/* Elementwise and row kernels launch this many threads a block. */
#define DL_BLOCK 256

/* upload_tensor moves tensors through two staging buffers of this size (host and device). */
#define STAGE_BYTES ((size_t) 16 << 20)

/*
 * Scratch buffers an operation uses while it runs (stream order keeps the next operation
 * from touching them early): the bfloat16 copies of a product's two operands, partial
 * sums of reductions, and the training attention's bfloat16 copies of a span's qkv and
 * dout (packed once for all its products).
 */
enum
{
	SCRATCH_A16, SCRATCH_B16, SCRATCH_PARTIAL, SCRATCH_QKV16, SCRATCH_DOUT16, CUDA_SCRATCH_SLOTS
};

typedef struct cuda_backend
{
	dl_backend	be;				/* first: a dl_backend * is a cuda_backend * */
	char		name[16];		/* "cuda:N" */
	int			dev;
	int			fp32;			/* weights and KV cache in float32 (fp32, mixed), else bfloat16 */
	int			bf16_math;		/* matrix products on bfloat16 tensor cores (bf16, mixed) */
	int			sm_count;
	int			smem_optin;		/* dynamic shared memory a kernel may opt in to, bytes */
	int			ln_smem_cols;	/* widest rows layernorm_backward sums in shared memory */
	cudaStream_t stream;		/* every operation runs on it, in order */
	cudaStream_t aside;			/* but sum_ranks_aside: the sums over ranks during backward */
	cublasHandle_t blas;
	dl_error	pending;		/* first failure of an asynchronous operation (code DL_OK: none) */
	void	   *host_stage[2];	/* upload_tensor: host buffers, made on first use, */
	int			host_pinned;	/* pinned unless the system refused (then malloc'd) */
	void	   *dev_stage[2];	/* and device buffers for data that needs converting */
	cudaEvent_t stage_done[2];	/* when the transfer out of each pair has completed */
	int			stage_turn;		/* the pair the next chunk goes through */
	struct cuda_profile *prof;	/* $DOLLY_CUDA_PROFILE: the operations' timings, else NULL */
	void	   *scratch[CUDA_SCRATCH_SLOTS];	/* grown on demand: cuda_scratch */
	size_t		scratch_bytes[CUDA_SCRATCH_SLOTS];
} cuda_backend;

/* The CUDA state behind a backend. */
static inline cuda_backend *
cuda_of(dl_backend *be)
{
	return (cuda_backend *) be;
}

/*
 * The same, at the start of an entry point: make the backend's device current for this
 * thread (the current device is per thread, and a process may hold backends on several).
 */
static inline cuda_backend *
cuda_enter(dl_backend *be)
{
	cudaSetDevice(((cuda_backend *) be)->dev);
	return (cuda_backend *) be;
}

/*
 * Scratch slot `slot` with room for bytes (grown by powers of two), or NULL with the
 * failure kept under op's name.
 */
void	   *cuda_scratch(cuda_backend *cb, int slot, size_t bytes, const char *op);

/* Keep the first failure of an asynchronous operation: op names it, what says why. */
void		cuda_fail(cuda_backend *cb, dl_status code, const char *op, const char *what);

/* After a kernel launch: keep a launch failure of op. */
void		cuda_check_launch(cuda_backend *cb, const char *op);

/* Move the kept failure into err and forget it; DL_OK when there was none. */
dl_status	cuda_take_pending(cuda_backend *cb, dl_error *err);

/* --- conversions --- */

/* float32 from either storage format. */
static __device__ __forceinline__ float
to_f32(float x)
{
	return x;
}

static __device__ __forceinline__ float
to_f32(__nv_bfloat16 x)
{
	return __bfloat162float(x);
}

static __device__ __forceinline__ float
to_f32(__half x)
{
	return __half2float(x);
}

/* A storage format from float32, rounding to nearest even. */
template <typename T> static __device__ __forceinline__ T from_f32(float x);

template <> __device__ __forceinline__ float
from_f32<float>(float x)
{
	return x;
}

template <> __device__ __forceinline__ __nv_bfloat16
from_f32<__nv_bfloat16>(float x)
{
	return __float2bfloat16_rn(x);
}

/*
 * Load VEC consecutive elements of type T as float32: one 16-byte load when VEC fills
 * 16 bytes (p must then be 16-byte aligned), else element by element.
 */
template <typename T, int VEC>
static __device__ __forceinline__ void
load_vec(const T *p, float (&f)[VEC])
{
	if constexpr (VEC * sizeof(T) == 16 && std::is_same<T, float>::value)
	{
		float4		u = *(const float4 *) p;

		f[0] = u.x;
		f[1] = u.y;
		f[2] = u.z;
		f[3] = u.w;
	}
	else if constexpr (VEC * sizeof(T) == 16 && std::is_same<T, __nv_bfloat16>::value)
	{
		/* eight bfloat16: element 2i in the low half of word i, as memory orders them */
		uint4		u = *(const uint4 *) p;
		uint32_t	w[4] = {u.x, u.y, u.z, u.w};

#pragma unroll
		for (int i = 0; i < 4; i++)
		{
			f[2 * i] = __uint_as_float(w[i] << 16);
			f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
		}
	}
	else
	{
#pragma unroll
		for (int i = 0; i < VEC; i++)
			f[i] = to_f32(p[i]);
	}
}

/* Blocks of DL_BLOCK threads for a grid-stride loop over n elements. */
static inline unsigned
grid_for(size_t n)
{
	size_t		blocks = (n + DL_BLOCK - 1) / DL_BLOCK;

	return (unsigned) (blocks < 65535 ? blocks : 65535);
}

/* dst[i] = src[i] converted between storage formats, n elements. */
template <typename S, typename D>
__global__ static void
convert_kernel(D *dst, const S *src, size_t n)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n;
		 i += (size_t) gridDim.x * blockDim.x)
		dst[i] = from_f32<D>(to_f32(src[i]));
}

/* --- reductions --- */

/* v from the lane whose index differs by lane_mask; any type of whole 32-bit words. */
template <typename T>
static __device__ __forceinline__ T
shfl_xor(T v, int lane_mask)
{
	uint32_t	w[sizeof(T) / 4];

	static_assert(sizeof(T) % 4 == 0, "shuffled types are whole words");
	memcpy(w, &v, sizeof(T));
	for (int i = 0; i < (int) (sizeof(T) / 4); i++)
		w[i] = __shfl_xor_sync(0xffffffffu, w[i], lane_mask);
	memcpy(&v, w, sizeof(T));
	return v;
}

/* op over the first `width` lanes (a power of two), every one of them gets it. */
template <typename T, typename Op>
static __device__ __forceinline__ T
warp_reduce(T v, Op op, int width)
{
	for (int off = width / 2; off > 0; off >>= 1)
		v = op(v, shfl_xor(v, off));
	return v;
}

/*
 * op (associative and commutative) over the block, every thread gets it: blockDim.x a
 * power-of-two multiple of 32, at most 1024; red: blockDim.x / 32 elements of shared
 * memory.
 */
template <typename T, typename Op>
static __device__ __forceinline__ T
block_reduce(T v, T *red, Op op)
{
	int			lane = threadIdx.x & 31,
				warp = threadIdx.x >> 5,
				nwarps = blockDim.x >> 5;

	v = warp_reduce(v, op, 32);
	__syncthreads();			/* red may still be read from a previous call */
	if (lane == 0)
		red[warp] = v;
	__syncthreads();
	if (warp == 0)
	{
		/* lanes past the warps exchange only among themselves */
		v = warp_reduce(red[lane % nwarps], op, nwarps);
		if (lane == 0)
			red[0] = v;
	}
	__syncthreads();
	return red[0];
}

/* a + b, for the reductions. */
template <typename T>
static __device__ __forceinline__ T
add(T a, T b)
{
	return a + b;
}

/* Sum over the 32 lanes of a warp, every lane gets it. */
static __device__ __forceinline__ float
warp_sum(float v)
{
	return warp_reduce(v, add<float>, 32);
}

/* Sum over the block (as block_reduce); red: 32 floats of shared memory. */
static __device__ __forceinline__ float
block_sum(float v, float *red)
{
	return block_reduce(v, red, add<float>);
}

/*
 * The compute operations of the table, whose entry point is cuda_<name>: backend.cu
 * fills the table from this list and profile.cu times them.
 */
#define CUDA_COMPUTE_OPS(X) \
	X(embedding_forward) X(gather_rows_forward) X(layernorm_forward) X(matmul_forward) \
	X(rotary_forward) X(attention_forward) X(gelu_forward) X(crossentropy_forward) \
	X(embedding_backward) X(layernorm_backward) X(matmul_backward) X(rotary_backward) \
	X(gelu_backward) X(adamw_update) X(attention_train_forward) X(attention_backward) \
	X(sample_forward) X(lora_forward) X(lora_backward)

/* profile.cu: with $DOLLY_CUDA_PROFILE set, time every compute operation (at create). */
dl_status	cuda_profile_install(cuda_backend *cb, dl_error *err);
/* Print where the GPU time went on stderr and free the profile (at destroy). */
void		cuda_profile_report(cuda_backend *cb);

/* --- entry points of the backend table, by file --- */

/* memory.cu */
void	   *cuda_alloc(dl_backend *be, size_t bytes, dl_error *err);
void		cuda_free(dl_backend *be, void *ptr);
void		cuda_zero(dl_backend *be, void *dst, size_t bytes);
void		cuda_copy(dl_backend *be, void *dst, const void *src, size_t bytes);
dl_status	cuda_upload(dl_backend *be, void *dst, const void *src, size_t bytes, dl_error *err);
dl_status	cuda_download(dl_backend *be, void *dst, const void *src, size_t bytes,
						  dl_error *err);
dl_status	cuda_synchronize(dl_backend *be, dl_error *err);
/* Report a kept failure, else wait for stream and report what failed on it. */
dl_status	cuda_stream_wait(cuda_backend *cb, cudaStream_t stream, dl_error *err);
dl_status	cuda_upload_tensor(dl_backend *be, void *dst, dl_fmt fmt, const st_tensor *t,
							   const int32_t *rows, dl_error *err);
/* Release upload_tensor's staging buffers (at destroy). */
void		cuda_stage_free(cuda_backend *cb);

/* embedding.cu */
void		cuda_embedding_forward(dl_backend *be, float *out, const void *table,
								   const int32_t *ids, int T, int C);
void		cuda_gather_rows_forward(dl_backend *be, float *out, const float *in,
									 const int32_t *rows, int n, int C);
void		cuda_embedding_backward(dl_backend *be, float *dtable, const float *dout,
									const int32_t *ids, int T, int C);

/* layernorm.cu */
void		cuda_layernorm_forward(dl_backend *be, float *out, float *mean, float *rstd,
								   const float *in, const float *w, const float *b, int T,
								   int C, float eps);
void		cuda_layernorm_backward(dl_backend *be, float *din, float *dw, float *db,
									const float *dout, const float *in, const float *mean,
									const float *rstd, const float *w, int T, int C);
/*
 * Raise the backward kernel's shared memory limit to what the device allows, up to what
 * it can use (at backend creation); wider rows sum in global memory.
 */
dl_status	cuda_layernorm_init(cuda_backend *cb, dl_error *err);

/* reduce.cu */
/* out[N] += the column sums of x[M, N], in a fixed order. */
void		cuda_add_column_sums(cuda_backend *cb, float *out, const float *x, int M, int N,
								 const char *op);
/* out[n] += sum over y < chunks of partial[y * ld + n], n < N: the second half of a sum. */
void		cuda_add_partials(cuda_backend *cb, float *out, const float *partial, int chunks,
							  int N, int ld, const char *op);
dl_status	cuda_sum_squares(dl_backend *be, const float *x, size_t n, double *out,
							 dl_error *err);

/* loss.cu */
void		cuda_crossentropy_forward(dl_backend *be, float *losses, float *dlogits,
									  const float *logits, const int32_t *labels, int T, int V);

/* ranks.cu */
void		cuda_sum_ranks(dl_backend *be, float *out, const void *const *src, int nsrc, size_t n,
						   int bf16, int accumulate);
void		cuda_sum_ranks_aside(dl_backend *be, float *out, const void *const *src, int nsrc,
								 size_t n, int bf16, int accumulate);
dl_status	cuda_sum_ranks_wait(dl_backend *be, dl_error *err);
void		cuda_to_bf16(dl_backend *be, uint16_t *dst, const float *src, size_t n);
dl_status	cuda_peer_export(dl_backend *be, void *mem, dl_peer_handle *h, dl_error *err);
dl_status	cuda_peer_open(dl_backend *be, const dl_peer_handle *h, void **mem, dl_error *err);
void		cuda_peer_close(dl_backend *be, void *mem);

/* optimizer.cu */
void		cuda_adamw_update(dl_backend *be, float *param, const float *grad, float *m,
							  float *v, size_t n, const dl_adamw *h);

/* matmul.cu */

/*
 * An operand of cuda_gemm: a row-major matrix at p, float32 or (bf16) bfloat16, with
 * leading dimension ld; trans: stored as the transpose of what the product uses;
 * stride: elements between the matrices of a batch.
 */
typedef struct cuda_mat
{
	const void *p;
	int			bf16;
	int			trans;
	int			ld;
	long long	stride;
} cuda_mat;

/* A float32 row-major operand with leading dimension ld (one matrix). */
static inline cuda_mat
f32_mat(const float *p, int ld, int trans)
{
	return cuda_mat {p, 0, trans, ld, 0};
}

/*
 * C[M,N] = alpha op(A)[M,K] op(B)[K,N] + beta C for `batch` products (C row-major, float32,
 * leading dimension ldc, stride strideC): in float32 (no TF32) in fp32 mode, else on
 * bfloat16 tensor cores with float32 accumulation, float32 operands rounded to bfloat16
 * first (as torch's bf16 autocast computes). op names the caller in failures.
 */
void		cuda_gemm(cuda_backend *cb, const char *op, int M, int N, int K, float alpha,
					  cuda_mat A, cuda_mat B, float beta, float *C, int ldc, long long strideC,
					  int batch);
/*
 * The same product in float32 whatever the mode (float32 operands only): LoRA's, whose
 * adapters are float32 on every mode.
 */
void		cuda_gemm_f32(cuda_backend *cb, const char *op, int M, int N, int K, float alpha,
						  cuda_mat A, cuda_mat B, float beta, float *C, int ldc,
						  long long strideC, int batch);
/*
 * Operand m as bfloat16: m itself when it is, else packed (contiguous) into scratch slot
 * `slot`, so that an operand used by several products is rounded once. rows and cols are
 * its stored shape; p is NULL (the failure kept) when there was no room.
 */
cuda_mat	cuda_as_bf16(cuda_backend *cb, cuda_mat m, int rows, int cols, int batch, int slot,
						 const char *op);
void		cuda_matmul_forward(dl_backend *be, float *out, const float *in, const void *W,
								const float *bias, int M, int K, int N, int accumulate);
void		cuda_matmul_backward(dl_backend *be, float *din, float *dW, float *dbias,
								 const float *dout, const float *in, const void *W, int M, int K,
								 int N);

/* rotary.cu */
void		cuda_rotary_forward(dl_backend *be, float *x, int stride, int T, int n_head,
								int head_dim, int rot_dim, int interleaved, const int32_t *pos,
								const float *cos_sin);
void		cuda_rotary_backward(dl_backend *be, float *dx, int stride, int T, int n_head,
								 int head_dim, int rot_dim, int interleaved, const int32_t *pos,
								 const float *cos_sin);

/* attention.cu */
void		cuda_attention_forward(dl_backend *be, float *out, const float *qkv, void *k_cache,
								   void *v_cache, int max_ctx, const dl_spans *spans,
								   int n_head, int head_dim, float scale, void *workspace);
size_t		cuda_attention_workspace(dl_backend *be, int max_ctx);
/* Allow the prefill kernels the shared memory they need (at create). */
dl_status	cuda_attention_init(cuda_backend *cb, dl_error *err);

/* attention_train.cu */
void		cuda_attention_train_forward(dl_backend *be, float *out, float *lse, const float *qkv,
										 const dl_spans *spans, int n_head, int head_dim,
										 float scale, void *workspace);
size_t		cuda_attention_train_workspace(dl_backend *be, int max_len, int n_head);
void		cuda_attention_backward(dl_backend *be, float *dqkv, const float *dout,
									const float *qkv, const float *out, const float *lse,
									const dl_spans *spans, int n_head, int head_dim, float scale,
									void *workspace);

/* activation.cu */
void		cuda_gelu_forward(dl_backend *be, float *out, const float *in, size_t n,
							  dl_gelu form);
void		cuda_gelu_backward(dl_backend *be, float *din, const float *in, const float *dout,
							   size_t n, dl_gelu form);
/* Launch the GELU kernel of the given form on stream (also used by the self-test). */
void		gelu_forward_launch(float *out, const float *in, size_t n, dl_gelu form,
								cudaStream_t stream);

/* sampling.cu */
void		cuda_sample_forward(dl_backend *be, int32_t *tokens, const float *logits,
								const dl_sample_row *rows, int R, int V, void *workspace);
size_t		cuda_sample_workspace(dl_backend *be, int R, int V);

/* lora.cu */
void		cuda_lora_forward(dl_backend *be, float *out, int ldo, float *u, const float *in,
							  int K, const dl_lora_seg *segs, int nseg, float *workspace);
void		cuda_lora_backward(dl_backend *be, float *din, const float *dout, int ldo, float *u,
							   const float *in, const dl_lora_mats *w, int M, int K, int N,
							   float *workspace);

/* backend.cu */
dl_status	cuda_backend_create(int dev, int mode, dl_backend **out, dl_error *err);

#endif
