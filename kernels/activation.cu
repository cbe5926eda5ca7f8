/* activation.cu: elementwise activation kernels of the CUDA backend. */
#include "common.cuh"

/* gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as GPT-J uses it */
__global__ static void
gelu_tanh_forward_kernel(float *out, const float *in, long n)
{
	const float k = 0.7978845608028654f;	/* sqrt(2/pi) */

	for (long i = blockIdx.x * (long) blockDim.x + threadIdx.x; i < n;
		 i += (long) gridDim.x * blockDim.x)
	{
		float		x = in[i];

		out[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
	}
}

void
gelu_tanh_forward_launch(float *out, const float *in, long n, cudaStream_t stream)
{
	long		blocks = (n + DL_BLOCK - 1) / DL_BLOCK;

	if (blocks > 65535)
		blocks = 65535;
	gelu_tanh_forward_kernel<<<(unsigned) blocks, DL_BLOCK, 0, stream>>>(out, in, n);
}
