/*
 * matmul.cu: out[M,N] (+)= in[M,K] @ W[N,K]^T + bias, W in weight format (nn.Linear).
 *
 * A product of few rows (decode: M <= SKINNY_MAX_M) is bound by reading W once, so it
 * runs in a kernel of our own: blocks stream SKINNY_ROWS rows of W with 16-byte loads,
 * multiply them by the float32 input as it is (activations are never rounded here) and
 * add the bias and, with accumulate, the residual in the same pass. More rows go to
 * cuBLAS through cuda_gemm, which every product of the plugin uses: float32 in fp32 mode
 * (pedantic math, no TF32: exact float32 for the tests), else bfloat16 operands with
 * float32 accumulation and output, float32 operands (activations; mixed mode's float32
 * weights) rounded to bfloat16 first, as torch computes in bf16. The backward products
 * (din = dout W, dW = dout^T in) go the same way.
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
/*
 * Two blocks a multiprocessor at least: without the bound, ptxas gives M = 5..8 148 to 178
 * registers a thread (one block of 8 warps a multiprocessor, too few loads in flight to
 * keep HBM busy); with it, 128 and no spills (4 bytes in float32 at M = 6), 16 warps.
 */
template <typename T, int M>
__global__ static void __launch_bounds__(SKINNY_THREADS, 2)
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

/*
 * Rows of a grid-stride loop in y, columns in x: elementwise kernels over [rows, cols]
 * locate an element without a division or modulo per element.
 */
static inline dim3
grid_rows(long long rows, int cols)
{
	unsigned	x = (unsigned) ((cols + DL_BLOCK - 1) / DL_BLOCK);

	return dim3(x < 1024 ? x : 1024, (unsigned) (rows < 65535 ? rows : 65535));
}

/* out = bias broadcast over the M rows, or out += bias: the product then adds with beta 1. */
__global__ static void
bias_kernel(float *out, const float *bias, int M, int N, int accumulate)
{
	for (int r = blockIdx.y; r < M; r += gridDim.y)
	{
		float	   *o = out + (size_t) r * N;

		for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < N; c += gridDim.x * blockDim.x)
			o[c] = accumulate ? o[c] + bias[c] : bias[c];
	}
}

/*
 * dst = the batch of [rows, cols] float32 matrices at src (leading dimension ld, stride),
 * packed as bfloat16: a row per y, four columns a thread where rows allow 16-byte loads.
 */
template <int V>
__global__ static void
pack_bf16_kernel(__nv_bfloat16 *dst, const float *src, int rows, int cols, int ld,
				 long long stride, int batch)
{
	for (long long q = blockIdx.y; q < (long long) rows * batch; q += gridDim.y)
	{
		long long	b = q / rows;
		const float *s = src + b * stride + (q - b * rows) * ld;
		__nv_bfloat16 *d = dst + q * cols;

		for (int c = (blockIdx.x * blockDim.x + threadIdx.x) * V; c < cols; c += gridDim.x * blockDim.x * V)
			if constexpr (V == 4)
			{
				float4		v = *(const float4 *) (s + c);

				d[c] = __float2bfloat16_rn(v.x);
				d[c + 1] = __float2bfloat16_rn(v.y);
				d[c + 2] = __float2bfloat16_rn(v.z);
				d[c + 3] = __float2bfloat16_rn(v.w);
			}
			else
				d[c] = __float2bfloat16_rn(s[c]);
	}
}

/* Whether p is 16-byte aligned (vector loads). */
static inline int
aligned16(const void *p)
{
	return ((uintptr_t) p & 15) == 0;
}

cuda_mat
cuda_as_bf16(cuda_backend *cb, cuda_mat m, int rows, int cols, int batch, int slot, const char *op)
{
	size_t		total = (size_t) rows * cols * batch;
	__nv_bfloat16 *dst;
	/* float4 loads need every row 16-byte aligned */
	int			wide = cols % 4 == 0 && m.ld % 4 == 0 && m.stride % 4 == 0 && aligned16(m.p);

	if (m.bf16)
		return m;
	dst = (__nv_bfloat16 *) cuda_scratch(cb, slot, total * sizeof(__nv_bfloat16), op);
	if (dst != NULL)
	{
		if (wide)
			pack_bf16_kernel<4><<<grid_rows((long long) rows * batch, cols / 4), DL_BLOCK, 0, cb->stream>>>(
				dst, (const float *) m.p, rows, cols, m.ld, m.stride, batch);
		else
			pack_bf16_kernel<1><<<grid_rows((long long) rows * batch, cols), DL_BLOCK, 0, cb->stream>>>(
				dst, (const float *) m.p, rows, cols, m.ld, m.stride, batch);
		cuda_check_launch(cb, op);
	}
	return cuda_mat {dst, 1, m.trans, cols, (long long) rows * cols};
}

/*
 * cuBLAS is column-major: our row-major C[M,N] = op(A) op(B) is its C^T[N,M] =
 * op(B)^T op(A)^T, and a row-major matrix is its transpose with the same leading
 * dimension; so B goes first, each with its own trans flag.
 */
void
cuda_gemm(cuda_backend *cb, const char *op, int M, int N, int K, float alpha, cuda_mat A,
		  cuda_mat B, float beta, float *C, int ldc, long long strideC, int batch)
{
	cublasOperation_t ta = A.trans ? CUBLAS_OP_T : CUBLAS_OP_N,
				tb = B.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
	cublasStatus_t s;

	if (M <= 0 || N <= 0 || K <= 0 || batch <= 0)
		return;
	if (!cb->bf16_math)
	{
		cuda_gemm_f32(cb, op, M, N, K, alpha, A, B, beta, C, ldc, strideC, batch);
		return;
	}
	A = cuda_as_bf16(cb, A, A.trans ? K : M, A.trans ? M : K, batch, SCRATCH_A16, op);
	B = cuda_as_bf16(cb, B, B.trans ? N : K, B.trans ? K : N, batch, SCRATCH_B16, op);
	if (A.p == NULL || B.p == NULL)
		return;
	s = cublasGemmStridedBatchedEx(cb->blas, tb, ta, N, M, K, &alpha, B.p, CUDA_R_16BF, B.ld,
								   B.stride, A.p, CUDA_R_16BF, A.ld, A.stride, &beta, C,
								   CUDA_R_32F, ldc, strideC, batch, CUBLAS_COMPUTE_32F,
								   CUBLAS_GEMM_DEFAULT);
	if (s != CUBLAS_STATUS_SUCCESS)
		cuda_fail(cb, DL_EBACKEND, op, cublasGetStatusString(s));
}

/*
 * cuda_gemm's float32 product, in any mode: the handle's math mode keeps float32's
 * precision (pedantic in fp32 mode; the default, which never picks TF32 for float32, else).
 */
void
cuda_gemm_f32(cuda_backend *cb, const char *op, int M, int N, int K, float alpha, cuda_mat A,
			  cuda_mat B, float beta, float *C, int ldc, long long strideC, int batch)
{
	cublasStatus_t s;

	if (M <= 0 || N <= 0 || K <= 0 || batch <= 0)
		return;
	if (A.bf16 || B.bf16)
	{
		cuda_fail(cb, DL_EBACKEND, op, "a bfloat16 operand in a float32 product");
		return;
	}
	s = cublasSgemmStridedBatched(cb->blas, B.trans ? CUBLAS_OP_T : CUBLAS_OP_N,
								  A.trans ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha,
								  (const float *) B.p, B.ld, B.stride, (const float *) A.p, A.ld,
								  A.stride, &beta, C, ldc, strideC, batch);
	if (s != CUBLAS_STATUS_SUCCESS)
		cuda_fail(cb, DL_EBACKEND, op, cublasGetStatusString(s));
}

/* W in weight format as an operand: [N,K] stored, used transposed or not. */
static cuda_mat
weight_mat(const cuda_backend *cb, const void *W, int K, int trans)
{
	return cuda_mat {W, !cb->fp32, trans, K, 0};
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
	if (bias)
	{
		bias_kernel<<<grid_rows(M, N), DL_BLOCK, 0, cb->stream>>>(out, bias, M, N, accumulate);
		cuda_check_launch(cb, "matmul_forward (bias)");
	}
	cuda_gemm(cb, "matmul_forward", M, N, K, 1.0f, f32_mat(in, K, 0), weight_mat(cb, W, K, 1),
			  bias || accumulate ? 1.0f : 0.0f, out, N, 0, 1);
}

/*
 * din[M,K] += dout[M,N] @ W[N,K], dW[N,K] += dout^T @ in[M,K], dbias[N] += column sums of
 * dout, each when its buffer is given. With bfloat16 products dout is rounded once for both.
 */
void
cuda_matmul_backward(dl_backend *be, float *din, float *dW, float *dbias, const float *dout,
					 const float *in, const void *W, int M, int K, int N)
{
	cuda_backend *cb = cuda_enter(be);
	cuda_mat	g = f32_mat(dout, N, 0);

	if (M <= 0 || N <= 0 || K <= 0)
		return;
	if (dbias)
		cuda_add_column_sums(cb, dbias, dout, M, N, "matmul_backward (bias)");
	if (cb->bf16_math)
		g = cuda_as_bf16(cb, g, M, N, 1, SCRATCH_A16, "matmul_backward");
	if (g.p == NULL)
		return;
	if (din)
		cuda_gemm(cb, "matmul_backward (input)", M, K, N, 1.0f, g, weight_mat(cb, W, K, 0), 1.0f,
				  din, K, 0, 1);
	g.trans = 1;
	if (dW)
		cuda_gemm(cb, "matmul_backward (weights)", N, K, M, 1.0f, g, f32_mat(in, K, 0), 1.0f, dW,
				  K, 0, 1);
}
