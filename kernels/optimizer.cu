/*
 * optimizer.cu: one AdamW step over float32 parameters (the master copy: in mixed mode
 * the products round them to bfloat16 as they go, the updates never are), in torch's
 * order and roundings as the CPU backend applies them.
 */
#include "common.cuh"

/* The step's constants, computed on the host in double as torch does in Python. */
typedef struct adamw_consts
{
	float		decay;			/* 1 - lr wd */
	float		beta1,
				one_minus_beta1,
				beta2,
				one_minus_beta2;
	float		neg_step_size;	/* -lr / (1 - beta1^step) */
	float		bc2_sqrt;		/* sqrt(1 - beta2^step) */
	float		eps;
	float		grad_scale;
} adamw_consts;

/* decay, m.lerp_(g, 1 - beta1), v = beta2 v + (1 - beta2) g^2, p += -step m / (sqrt(v) / bc2 + eps) */
__global__ static void
adamw_kernel(float *param, const float *grad, float *m, float *v, size_t n, adamw_consts k)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n;
		 i += (size_t) gridDim.x * blockDim.x)
	{
		float		g = grad[i] * k.grad_scale;
		float		mi = m[i] + k.one_minus_beta1 * (g - m[i]);
		float		vi = v[i] * k.beta2 + k.one_minus_beta2 * g * g;
		float		denom = sqrtf(vi) / k.bc2_sqrt + k.eps;

		m[i] = mi;
		v[i] = vi;
		param[i] = param[i] * k.decay + k.neg_step_size * mi / denom;
	}
}

void
cuda_adamw_update(dl_backend *be, float *param, const float *grad, float *m, float *v, size_t n,
				  const dl_adamw *h)
{
	cuda_backend *cb = cuda_enter(be);
	adamw_consts k = {
		(float) (1.0 - (double) h->lr * h->weight_decay),
		h->beta1, (float) (1.0 - (double) h->beta1),
		h->beta2, (float) (1.0 - (double) h->beta2),
		(float) (-(double) h->lr / (1.0 - pow(h->beta1, h->step))),
		(float) sqrt(1.0 - pow(h->beta2, h->step)),
		h->eps, h->grad_scale
	};

	if (n == 0)
		return;
	adamw_kernel<<<grid_for(n), DL_BLOCK, 0, cb->stream>>>(param, grad, m, v, n, k);
	cuda_check_launch(cb, "adamw_update");
}
