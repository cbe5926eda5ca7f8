/*
 * layernorm.cu: torch.nn.LayerNorm over the rows of a float32 matrix, one block per row,
 * in two passes (mean, then the centred variance) as the CPU backend computes it; and
 * its backward, where blocks take rows in turn and sum their share of the weight and
 * bias gradients in shared memory (in their own rows of global memory where the device
 * has not that much shared memory), added up afterwards in a fixed order (reduce.cu).
 */
#include "common.cuh"

/* Normalise row blockIdx.x; out may equal in (each thread rewrites only what it read). */
__global__ static void
layernorm_kernel(float *out, float *mean, float *rstd, const float *in, const float *w,
				 const float *b, int C, float eps)
{
	__shared__ float red[32];
	const float *x = in + (size_t) blockIdx.x * C;
	float	   *y = out + (size_t) blockIdx.x * C;
	float		s = 0.0f,
				m,
				rs;

	for (int c = threadIdx.x; c < C; c += blockDim.x)
		s += x[c];
	m = block_sum(s, red) / C;
	s = 0.0f;
	for (int c = threadIdx.x; c < C; c += blockDim.x)
		s += (x[c] - m) * (x[c] - m);
	rs = 1.0f / sqrtf(block_sum(s, red) / C + eps);
	for (int c = threadIdx.x; c < C; c += blockDim.x)
		y[c] = (x[c] - m) * rs * w[c] + b[c];
	if (threadIdx.x == 0 && mean)
		mean[blockIdx.x] = m;
	if (threadIdx.x == 0 && rstd)
		rstd[blockIdx.x] = rs;
}

/* Layer norm of T rows of C floats. */
void
cuda_layernorm_forward(dl_backend *be, float *out, float *mean, float *rstd, const float *in,
					   const float *w, const float *b, int T, int C, float eps)
{
	cuda_backend *cb = cuda_enter(be);

	if (T <= 0 || C <= 0)
		return;
	layernorm_kernel<<<T, DL_BLOCK, 0, cb->stream>>>(out, mean, rstd, in, w, b, C, eps);
	cuda_check_launch(cb, "layernorm_forward");
}

/* The widest rows whose sums layernorm_backward keeps in shared memory: 128 KB a block. */
#define LN_BACKWARD_SMEM_C 16384

/*
 * Rows blockIdx.x, blockIdx.x + gridDim.x, ... of the backward: din += rstd (dxhat -
 * mean(dxhat) - xhat mean(dxhat xhat)) with dxhat = dout w; this block's sums of
 * dout xhat and dout per column go to partial[blockIdx.x] = [dw | db], [2C]: summed in
 * shared memory (in_smem), or in place there; none when partial is NULL (a frozen norm).
 * Either way column c is only ever touched by thread c mod blockDim.x, so the sums need
 * no atomics.
 */
__global__ static void
layernorm_backward_kernel(float *din, float *partial, const float *dout, const float *in,
						  const float *mean, const float *rstd, const float *w, int T, int C,
						  int in_smem)
{
	extern __shared__ float smem[];
	__shared__ float red[32];
	/* [2C]: dw | db; without partial in_smem is 0 */
	float	   *acc = in_smem ? smem : partial ? partial + (size_t) blockIdx.x * 2 * C : NULL;

	for (int c = threadIdx.x; acc && c < 2 * C; c += blockDim.x)
		acc[c] = 0.0f;
	/* the row loop's block sums order these zeroes before the first additions */
	for (int t = blockIdx.x; t < T; t += gridDim.x)
	{
		const float *x = in + (size_t) t * C,
				   *g = dout + (size_t) t * C;
		float	   *dx = din + (size_t) t * C;
		float		m = mean[t],
					rs = rstd[t],
					s1 = 0.0f,
					s2 = 0.0f;

		for (int c = threadIdx.x; c < C; c += blockDim.x)
		{
			float		dxhat = g[c] * w[c];

			s1 += dxhat;
			s2 += dxhat * (x[c] - m) * rs;
		}
		s1 = block_sum(s1, red) / C;
		s2 = block_sum(s2, red) / C;
		for (int c = threadIdx.x; c < C; c += blockDim.x)
		{
			float		xhat = (x[c] - m) * rs;

			dx[c] += rs * (g[c] * w[c] - s1 - xhat * s2);
			if (acc)
			{
				acc[c] += g[c] * xhat;
				acc[C + c] += g[c];
			}
		}
	}
	if (acc == NULL || !in_smem)
		return;
	__syncthreads();			/* acc[C + c] was added to by the thread of column c */
	for (int c = threadIdx.x; c < 2 * C; c += blockDim.x)
		partial[(size_t) blockIdx.x * 2 * C + c] = acc[c];
}

void
cuda_layernorm_backward(dl_backend *be, float *din, float *dw, float *db, const float *dout,
						const float *in, const float *mean, const float *rstd, const float *w,
						int T, int C)
{
	cuda_backend *cb = cuda_enter(be);
	int			blocks = T < 2 * cb->sm_count ? T : 2 * cb->sm_count,
				in_smem = dw && C <= cb->ln_smem_cols;
	float	   *partial = NULL;

	if (T <= 0 || C <= 0)
		return;
	if (dw)
	{
		partial = (float *) cuda_scratch(cb, SCRATCH_PARTIAL, (size_t) blocks * 2 * C * sizeof(float),
										 "layernorm_backward");
		if (partial == NULL)
			return;
	}
	layernorm_backward_kernel<<<blocks, DL_BLOCK, in_smem ? 2 * C * sizeof(float) : 0, cb->stream>>>(
		din, partial, dout, in, mean, rstd, w, T, C, in_smem);
	cuda_check_launch(cb, "layernorm_backward");
	if (dw == NULL)
		return;
	cuda_add_partials(cb, dw, partial, blocks, C, 2 * C, "layernorm_backward");
	cuda_add_partials(cb, db, partial + C, blocks, C, 2 * C, "layernorm_backward");
}

dl_status
cuda_layernorm_init(cuda_backend *cb, dl_error *err)
{
	int			bytes = (int) (2 * LN_BACKWARD_SMEM_C * sizeof(float));

	bytes = bytes < cb->smem_optin ? bytes : cb->smem_optin;
	cb->ln_smem_cols = bytes / (int) (2 * sizeof(float));
	CUDA_TRY(cudaFuncSetAttribute(layernorm_backward_kernel,
								  cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), err);
	return DL_OK;
}
