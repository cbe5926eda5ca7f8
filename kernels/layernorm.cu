/*
 * layernorm.cu: torch.nn.LayerNorm over the rows of a float32 matrix, one block per row,
 * in two passes (mean, then the centred variance) as the CPU backend computes it.
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
