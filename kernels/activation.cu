/* activation.cu: GELU in both of its forms, elementwise on float32, and its backward. */
#include "common.cuh"

#define SQRT_2_OVER_PI 0.7978845608028654f
#define SQRT_HALF 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

/*
 * DL_GELU_TANH: gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-J's;
 * DL_GELU_ERF: 0.5 x (1 + erf(x / sqrt(2))), torch.nn.functional.gelu, GPT-NeoX's.
 */
static __device__ __forceinline__ float
gelu(float x, dl_gelu form)
{
	if (form == DL_GELU_TANH)
		return 0.5f * x * (1.0f + tanhf(SQRT_2_OVER_PI * (x + 0.044715f * x * x * x)));
	return 0.5f * x * (1.0f + erff(x * SQRT_HALF));
}

/* d gelu / dx in the same form. */
static __device__ __forceinline__ float
gelu_grad(float x, dl_gelu form)
{
	if (form == DL_GELU_TANH)
	{
		float		t = tanhf(SQRT_2_OVER_PI * (x + 0.044715f * x * x * x));

		return 0.5f * (1.0f + t) +
			0.5f * x * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 0.134145f * x * x);
	}
	return 0.5f * (1.0f + erff(x * SQRT_HALF)) + x * INV_SQRT_2PI * expf(-0.5f * x * x);
}

__global__ static void
gelu_kernel(float *out, const float *in, size_t n, dl_gelu form)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n;
		 i += (size_t) gridDim.x * blockDim.x)
		out[i] = gelu(in[i], form);
}

__global__ static void
gelu_backward_kernel(float *din, const float *in, const float *dout, size_t n, dl_gelu form)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n;
		 i += (size_t) gridDim.x * blockDim.x)
		din[i] += gelu_grad(in[i], form) * dout[i];
}

void
gelu_forward_launch(float *out, const float *in, size_t n, dl_gelu form, cudaStream_t stream)
{
	if (n > 0)
		gelu_kernel<<<grid_for(n), DL_BLOCK, 0, stream>>>(out, in, n, form);
}

/* GELU of n floats; out may equal in. */
void
cuda_gelu_forward(dl_backend *be, float *out, const float *in, size_t n, dl_gelu form)
{
	cuda_backend *cb = cuda_enter(be);

	gelu_forward_launch(out, in, n, form, cb->stream);
	cuda_check_launch(cb, "gelu_forward");
}

/* din[n] += gelu'(in) dout. */
void
cuda_gelu_backward(dl_backend *be, float *din, const float *in, const float *dout, size_t n,
				   dl_gelu form)
{
	cuda_backend *cb = cuda_enter(be);

	if (n == 0)
		return;
	gelu_backward_kernel<<<grid_for(n), DL_BLOCK, 0, cb->stream>>>(din, in, dout, n, form);
	cuda_check_launch(cb, "gelu_backward");
}
