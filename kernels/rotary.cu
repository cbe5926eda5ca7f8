/*
 * rotary.cu: rotary position embedding in place on the q and k heads of each row, in
 * GPT-J's interleaved layout (pairs 2j, 2j+1) or GPT-NeoX's halves (pairs j, j + rot/2),
 * with the model's float32 cos | sin table.
 */
#include "common.cuh"

/* Rotate row blockIdx.x: its threads share the (head, pair) rotations of the row. */
__global__ static void
rotary_kernel(float *x, int stride, int n_head, int head_dim, int rot_dim, int interleaved,
			  const int32_t *pos, const float *cos_sin)
{
	int			half = rot_dim / 2;
	const float *c = cos_sin + (size_t) pos[blockIdx.x] * rot_dim;
	const float *s = c + half;
	float	   *row = x + (size_t) blockIdx.x * stride;

	for (int i = threadIdx.x; i < n_head * half; i += blockDim.x)
	{
		int			j = i % half;
		float	   *xh = row + (size_t) (i / half) * head_dim;
		int			i0 = interleaved ? 2 * j : j;
		int			i1 = interleaved ? 2 * j + 1 : j + half;
		float		x0 = xh[i0],
					x1 = xh[i1];

		xh[i0] = x0 * c[j] - x1 * s[j];
		xh[i1] = x1 * c[j] + x0 * s[j];
	}
}

/* Rotary embedding of T rows. */
void
cuda_rotary_forward(dl_backend *be, float *x, int stride, int T, int n_head, int head_dim,
					int rot_dim, int interleaved, const int32_t *pos, const float *cos_sin)
{
	cuda_backend *cb = cuda_enter(be);

	if (T <= 0 || rot_dim < 2 || n_head <= 0)
		return;
	rotary_kernel<<<T, 128, 0, cb->stream>>>(x, stride, n_head, head_dim, rot_dim, interleaved,
											 pos, cos_sin);
	cuda_check_launch(cb, "rotary_forward");
}
