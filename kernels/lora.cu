/*
 * lora.cu: LoRA's low-rank update of a product, forward and backward (backend.h's
 * lora_forward, lora_backward), as cpu_lora.c computes it: cuBLAS products on strided
 * views (out's rows ldo floats apart), with dropout's factors drawn by dropout.h in a
 * kernel into the workspace (the same mask as the CPU's).
 *
 * The products are float32 in every mode (cuda_gemm_f32): adapters are float32, PEFT
 * casts the input to the adapter's dtype, and with r <= 256 they cost r / N of the base
 * product, too little to round to bfloat16 for.
 */
#include "common.cuh"
#include "dropout.h"

/*
 * dst[M, K] = src * drop, or dst += src * drop with accumulate: drop(m, k) is dropout.h's
 * factor of element (m, k) under seed and p.
 */
__global__ static void
dropout_kernel(float *dst, const float *src, int M, int K, uint64_t seed, float p, int accumulate)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < (size_t) M * K;
		 i += (size_t) gridDim.x * blockDim.x)
	{
		float		v = src[i] * dropout_factor(seed, (uint32_t) (i / K), (uint32_t) (i % K), p);

		dst[i] = accumulate ? dst[i] + v : v;
	}
}

static void
dropout_launch(cuda_backend *cb, float *dst, const float *src, int M, int K, const dl_lora_mats *w,
			   int accumulate, const char *op)
{
	dropout_kernel<<<grid_for((size_t) M * K), DL_BLOCK, 0, cb->stream>>>(dst, src, M, K, w->seed,
																		  w->dropout, accumulate);
	cuda_check_launch(cb, op);
}

/*
 * Per segment: u[M, r] = drop(in[M, K]) A^T; out[:, col0 .. col0 + N) += scale u B^T,
 * out's rows ldo apart; the segments' u one after another. A pair of products a segment
 * (a decode step has a few segments of a few rows: one grouped kernel would save their
 * launches, not bandwidth).
 */
void
cuda_lora_forward(dl_backend *be, float *out, int ldo, float *u, const float *in, int K,
				  const dl_lora_seg *segs, int nseg, float *workspace)
{
	cuda_backend *cb = cuda_enter(be);
	size_t		row_off = 0;

	for (int s = 0; s < nseg && K > 0; s++)
	{
		const dl_lora_mats *w = &segs[s].w;
		const float *src = in + (size_t) segs[s].first * K;
		float	   *o = out + (size_t) segs[s].first * ldo + segs[s].col0;
		int			M = segs[s].M,
					N = segs[s].N,
					r = w->r;

		if (M <= 0 || N <= 0)
			continue;
		if (w->dropout > 0.0f)
		{
			dropout_launch(cb, workspace + row_off * K, src, M, K, w, 0, "lora_forward (dropout)");
			src = workspace + row_off * K;
		}
		cuda_gemm_f32(cb, "lora_forward (A)", M, r, K, 1.0f, f32_mat(src, K, 0), f32_mat(w->A, K, 1),
					  0.0f, u, r, 0, 1);
		cuda_gemm_f32(cb, "lora_forward (B)", M, N, r, w->scale, f32_mat(u, r, 0),
					  f32_mat(w->B, r, 1), 1.0f, o, ldo, 0, 1);
		u += (size_t) M * r;
		row_off += M;
	}
}

/*
 * dB[N, r] += scale dout^T u; u = du = scale dout B; dA[r, K] += du^T drop(in);
 * din[M, K] += drop'(du A). With dropout the workspace holds drop(in) for dA, then du A.
 */
void
cuda_lora_backward(dl_backend *be, float *din, const float *dout, int ldo, float *u,
				   const float *in, const dl_lora_mats *w, int M, int K, int N, float *workspace)
{
	cuda_backend *cb = cuda_enter(be);
	int			dropped = w->dropout > 0.0f,
				r = w->r;

	if (M <= 0 || K <= 0 || N <= 0)
		return;
	if (w->dB)
		cuda_gemm_f32(cb, "lora_backward (dB)", N, r, M, w->scale, f32_mat(dout, ldo, 1),
					  f32_mat(u, r, 0), 1.0f, w->dB, r, 0, 1);
	cuda_gemm_f32(cb, "lora_backward (du)", M, r, N, w->scale, f32_mat(dout, ldo, 0),
				  f32_mat(w->B, r, 0), 0.0f, u, r, 0, 1);
	if (w->dA)
	{
		if (dropped)
			dropout_launch(cb, workspace, in, M, K, w, 0, "lora_backward (dropout)");
		cuda_gemm_f32(cb, "lora_backward (dA)", r, K, M, 1.0f, f32_mat(u, r, 1),
					  f32_mat(dropped ? workspace : in, K, 0), 1.0f, w->dA, K, 0, 1);
	}
	if (din == NULL)
		return;
	/* without dropout du A adds straight into din */
	cuda_gemm_f32(cb, "lora_backward (din)", M, K, r, 1.0f, f32_mat(u, r, 0), f32_mat(w->A, K, 0),
				  dropped ? 0.0f : 1.0f, dropped ? workspace : din, K, 0, 1);
	if (dropped)
		dropout_launch(cb, din, workspace, M, K, w, 1, "lora_backward (dropout)");
}
