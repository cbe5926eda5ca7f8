/*
 * matmul.cu: out[M,N] (+)= in[M,K] @ W[N,K]^T + bias, W in weight format (nn.Linear).
 *
 * A product of few rows (decode: M <= SKINNY_MAX_M) is bound by reading W once, so it
 * runs in a kernel of our own: blocks stream SKINNY_ROWS rows of W with 16-byte loads,
 * multiply them by the float32 input as it is (activations are never rounded here) and
 * add the bias and, with accumulate, the residual in the same pass. More rows go to
 * cuBLAS: cublasSgemm for float32 weights (pedantic math mode, no TF32: exact float32 for
 * the tests), cublasGemmEx with bfloat16 operands and float32 accumulation and output
 * otherwise, after rounding the input to bfloat16 as torch computes in bf16.
 */
#include "common.cuh"

#define SKINNY_MAX_M 8
#define SKINNY_ROWS 4
#define SKINNY_THREADS 256

/*
 * Rows [n0, n0 + SKINNY_ROWS) of W against all M input rows: the threads stride over K in
 * 16-byte pieces of each row, then the block sums its partial products. A row past N
 * repeats row N - 1 so that loads stay in bounds; its result is not written.
 */
template <typename T, int M>
__global__ static void __launch_bounds__(SKINNY_THREADS)
skinny_kernel(float *out, const float *__restrict__ in, const T *__restrict__ W,
			  const float *__restrict__ bias, int K, int N, int accumulate)
{
	constexpr int VEC = 16 / sizeof(T);
	__shared__ float red[SKINNY_THREADS / 32][SKINNY_ROWS * M];
	int			n0 = blockIdx.x * SKINNY_ROWS;
	int			nvec = K / VEC;
	int			lane = threadIdx.x & 31,
				warp = threadIdx.x >> 5;
	float		acc[SKINNY_ROWS][M];
	const T    *w[SKINNY_ROWS];

#pragma unroll
	for (int r = 0; r < SKINNY_ROWS; r++)
	{
		w[r] = W + (size_t) min(n0 + r, N - 1) * K;
#pragma unroll
		for (int m = 0; m < M; m++)
			acc[r][m] = 0.0f;
	}
#pragma unroll 2
	for (int j = threadIdx.x; j < nvec; j += SKINNY_THREADS)
	{
		float		wv[SKINNY_ROWS][VEC];

#pragma unroll
		for (int r = 0; r < SKINNY_ROWS; r++)
			load_vec<T, VEC>(w[r] + (size_t) j * VEC, wv[r]);
#pragma unroll
		for (int m = 0; m < M; m++)
		{
			const float4 *xp = (const float4 *) (in + (size_t) m * K + (size_t) j * VEC);
			float		xv[VEC];

#pragma unroll
			for (int q = 0; q < VEC / 4; q++)
			{
				float4		v = xp[q];

				xv[4 * q] = v.x;
				xv[4 * q + 1] = v.y;
				xv[4 * q + 2] = v.z;
				xv[4 * q + 3] = v.w;
			}
#pragma unroll
			for (int r = 0; r < SKINNY_ROWS; r++)
#pragma unroll
				for (int e = 0; e < VEC; e++)
					acc[r][m] = fmaf(wv[r][e], xv[e], acc[r][m]);
		}
	}
#pragma unroll
	for (int r = 0; r < SKINNY_ROWS; r++)
#pragma unroll
		for (int m = 0; m < M; m++)
		{
			float		v = warp_sum(acc[r][m]);

			if (lane == 0)
				red[warp][r * M + m] = v;
		}
	__syncthreads();
	if (threadIdx.x < SKINNY_ROWS * M)
	{
		int			r = threadIdx.x / M,
					m = threadIdx.x % M,
					n = n0 + r;

		if (n < N)
		{
			float		v = 0.0f;
			float	   *o = out + (size_t) m * N + n;

			for (int k = 0; k < SKINNY_THREADS / 32; k++)
				v += red[k][threadIdx.x];
			if (bias)
				v += bias[n];
			*o = accumulate ? *o + v : v;
		}
	}
}

/* The skinny kernel for M rows (1 .. SKINNY_MAX_M). */
template <typename T>
static void
skinny_launch(cuda_backend *cb, float *out, const float *in, const T *W, const float *bias,
			  int M, int K, int N, int accumulate)
{
	typedef void (*kernel_fn) (float *, const float *, const T *, const float *, int, int, int);
	static const kernel_fn kernels[SKINNY_MAX_M] = {
		skinny_kernel<T, 1>, skinny_kernel<T, 2>, skinny_kernel<T, 3>, skinny_kernel<T, 4>,
		skinny_kernel<T, 5>, skinny_kernel<T, 6>, skinny_kernel<T, 7>, skinny_kernel<T, 8>
	};
	unsigned	grid = (unsigned) ((N + SKINNY_ROWS - 1) / SKINNY_ROWS);

	kernels[M - 1]<<<grid, SKINNY_THREADS, 0, cb->stream>>>(out, in, W, bias, K, N, accumulate);
}

/* out = bias broadcast over the rows, or out += bias: the product then adds with beta 1. */
__global__ static void
bias_kernel(float *out, const float *bias, size_t total, int N, int accumulate)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < total;
		 i += (size_t) gridDim.x * blockDim.x)
		out[i] = accumulate ? out[i] + bias[i % N] : bias[i % N];
}

/* Room for the bfloat16 copy of an input of bytes (grown by powers of two); 0 on failure. */
static int
act16_reserve(cuda_backend *cb, size_t bytes)
{
	size_t		want = 1 << 20;

	if (bytes <= cb->act16_bytes)
		return 1;
	while (want < bytes)
		want *= 2;
	cudaFree(cb->act16);		/* waits for the products still reading it */
	cb->act16 = NULL;
	cb->act16_bytes = 0;
	if (cudaMalloc(&cb->act16, want) != cudaSuccess)
	{
		cudaGetLastError();
		cb->act16 = NULL;
		cuda_fail(cb, DL_ENOMEM, "matmul_forward", "out of GPU memory for the bfloat16 copy of its input");
		return 0;
	}
	cb->act16_bytes = want;
	return 1;
}

/*
 * cuBLAS is column-major: our row-major out[M,N] is its [N,M] = W[N,K] (its [K,N],
 * transposed) times in (its [K,M]), every leading dimension the row length.
 */
static void
gemm(cuda_backend *cb, float *out, const float *in, const void *W, const float *bias,
	 int M, int K, int N, int accumulate)
{
	const float alpha = 1.0f;
	float		beta = accumulate ? 1.0f : 0.0f;
	cublasStatus_t s;

	if (bias)
	{
		bias_kernel<<<grid_for((size_t) M * N), DL_BLOCK, 0, cb->stream>>>(out, bias, (size_t) M * N,
																		   N, accumulate);
		cuda_check_launch(cb, "matmul_forward (bias)");
		beta = 1.0f;
	}
	if (cb->fp32)
		s = cublasSgemm(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, (const float *) W, K,
						in, K, &beta, out, N);
	else
	{
		size_t		n = (size_t) M * K;

		if (!act16_reserve(cb, n * sizeof(__nv_bfloat16)))
			return;
		convert_kernel<<<grid_for(n), DL_BLOCK, 0, cb->stream>>>((__nv_bfloat16 *) cb->act16, in, n);
		cuda_check_launch(cb, "matmul_forward (rounding the input to bfloat16)");
		s = cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, W, CUDA_R_16BF, K,
						 cb->act16, CUDA_R_16BF, K, &beta, out, CUDA_R_32F, N,
						 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
	}
	if (s != CUBLAS_STATUS_SUCCESS)
		cuda_fail(cb, DL_EBACKEND, "matmul_forward (cuBLAS)", cublasGetStatusString(s));
}

/* Whether p is 16-byte aligned (the skinny kernel's vector loads). */
static inline int
aligned16(const void *p)
{
	return ((uintptr_t) p & 15) == 0;
}

/* The matrix product: the skinny kernel for few rows when the loads line up, else cuBLAS. */
void
cuda_matmul_forward(dl_backend *be, float *out, const float *in, const void *W,
					const float *bias, int M, int K, int N, int accumulate)
{
	cuda_backend *cb = cuda_enter(be);
	int			vec = cb->fp32 ? 4 : 8;	/* elements of W in 16 bytes */

	if (M <= 0 || N <= 0 || K <= 0)
		return;
	if (M <= SKINNY_MAX_M && K % vec == 0 && aligned16(W) && aligned16(in))
	{
		if (cb->fp32)
			skinny_launch(cb, out, in, (const float *) W, bias, M, K, N, accumulate);
		else
			skinny_launch(cb, out, in, (const __nv_bfloat16 *) W, bias, M, K, N, accumulate);
		cuda_check_launch(cb, "matmul_forward");
		return;
	}
	gemm(cb, out, in, W, bias, M, K, N, accumulate);
}
