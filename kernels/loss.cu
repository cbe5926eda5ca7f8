/*
 * loss.cu: softmax cross-entropy of rows of logits against labels, with the gradient of
 * the summed loss written over (or beside) the logits: where the backward pass starts.
 * One block per row, three passes over it (max, sum of exponentials, the gradient).
 */
#include "common.cuh"

/*
 * Row blockIdx.x: losses[t] = logsumexp(x) - x[y], d = softmax(x) - onehot(y); a masked
 * row (y < 0) has loss 0 and gradient 0. d may be x itself: x[y] is read first, and each
 * thread rewrites only the elements it read.
 */
__global__ static void
crossentropy_kernel(float *losses, float *dlogits, const float *logits, const int32_t *labels,
					int V)
{
	__shared__ float red[32];
	const float *x = logits + (size_t) blockIdx.x * V;
	float	   *d = dlogits ? dlogits + (size_t) blockIdx.x * V : NULL;
	int			y = labels[blockIdx.x];
	float		m = -INFINITY,
				s = 0.0f,
				xy,
				lse;

	if (y < 0)
	{
		if (threadIdx.x == 0)
			losses[blockIdx.x] = 0.0f;
		for (int j = threadIdx.x; d && j < V; j += blockDim.x)
			d[j] = 0.0f;
		return;
	}
	xy = x[y];
	for (int j = threadIdx.x; j < V; j += blockDim.x)
		m = fmaxf(m, x[j]);
	m = block_reduce(m, red, [](float a, float b) { return fmaxf(a, b); });
	for (int j = threadIdx.x; j < V; j += blockDim.x)
		s += expf(x[j] - m);
	lse = m + logf(block_sum(s, red));
	if (threadIdx.x == 0)
		losses[blockIdx.x] = lse - xy;
	for (int j = threadIdx.x; d && j < V; j += blockDim.x)
		d[j] = expf(x[j] - lse) - (j == y ? 1.0f : 0.0f);
}

void
cuda_crossentropy_forward(dl_backend *be, float *losses, float *dlogits, const float *logits,
						  const int32_t *labels, int T, int V)
{
	cuda_backend *cb = cuda_enter(be);

	if (T <= 0 || V <= 0)
		return;
	crossentropy_kernel<<<T, 512, 0, cb->stream>>>(losses, dlogits, logits, labels, V);
	cuda_check_launch(cb, "crossentropy_forward");
}
