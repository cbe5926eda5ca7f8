/* activation.cu: GELU in both of its forms, elementwise on float32. */
#include "common.cuh"

/* gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as GPT-J uses it */
__global__ static void
gelu_tanh_kernel(float *out, const float *in, size_t n)
{
	const float k = 0.7978845608028654f;	/* sqrt(2/pi) */

	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n;
		 i += (size_t) gridDim.x * blockDim.x)
	{
		float		x = in[i];

		out[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
	}
}

/* gelu(x) = 0.5 x (1 + erf(x / sqrt(2))), torch.nn.functional.gelu, as GPT-NeoX uses it */
__global__ static void
gelu_erf_kernel(float *out, const float *in, size_t n)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n;
		 i += (size_t) gridDim.x * blockDim.x)
	{
		float		x = in[i];

		out[i] = 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
	}
}

void
gelu_forward_launch(float *out, const float *in, size_t n, dl_gelu form, cudaStream_t stream)
{
	unsigned	grid = grid_for(n);

	if (n == 0)
		return;
	if (form == DL_GELU_TANH)
		gelu_tanh_kernel<<<grid, DL_BLOCK, 0, stream>>>(out, in, n);
	else
		gelu_erf_kernel<<<grid, DL_BLOCK, 0, stream>>>(out, in, n);
}

/* GELU of n floats; out may equal in. */
void
cuda_gelu_forward(dl_backend *be, float *out, const float *in, size_t n, dl_gelu form)
{
	cuda_backend *cb = cuda_enter(be);

	gelu_forward_launch(out, in, n, form, cb->stream);
	cuda_check_launch(cb, "gelu_forward");
}
