/*
 * rotary.cu: rotary position embedding in place on the q and k heads of each row, in
 * GPT-J's interleaved layout (pairs 2j, 2j+1) or GPT-NeoX's halves (pairs j, j + rot/2),
 * with the model's float32 cos | sin table. The backward is the rotation by the opposite
 * angle (the same kernel with the sine negated).
 */
#include "common.cuh"

/* Rotate row blockIdx.x by sign x its angles: its threads share the (head, pair) rotations. */
__global__ static void
rotary_kernel(float *x, int stride, int n_head, int head_dim, int rot_dim, int interleaved,
			  const int32_t *pos, const float *cos_sin, float sign)
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
					x1 = xh[i1],
					sn = sign * s[j];

		xh[i0] = x0 * c[j] - x1 * sn;
		xh[i1] = x1 * c[j] + x0 * sn;
	}
}

/* The rotation of T rows by sign x their angles; op names it in failures. */
static void
rotary_launch(dl_backend *be, float *x, int stride, int T, int n_head, int head_dim, int rot_dim,
			  int interleaved, const int32_t *pos, const float *cos_sin, float sign, const char *op)
{
	cuda_backend *cb = cuda_enter(be);

	if (T <= 0 || rot_dim < 2 || n_head <= 0)
		return;
	rotary_kernel<<<T, 128, 0, cb->stream>>>(x, stride, n_head, head_dim, rot_dim, interleaved,
											 pos, cos_sin, sign);
	cuda_check_launch(cb, op);
}

/* Rotary embedding of T rows. */
void
cuda_rotary_forward(dl_backend *be, float *x, int stride, int T, int n_head, int head_dim,
					int rot_dim, int interleaved, const int32_t *pos, const float *cos_sin)
{
	rotary_launch(be, x, stride, T, n_head, head_dim, rot_dim, interleaved, pos, cos_sin, 1.0f,
				  "rotary_forward");
}

/* Its backward on the gradient, in place. */
void
cuda_rotary_backward(dl_backend *be, float *dx, int stride, int T, int n_head, int head_dim,
					 int rot_dim, int interleaved, const int32_t *pos, const float *cos_sin)
{
	rotary_launch(be, dx, stride, T, n_head, head_dim, rot_dim, interleaved, pos, cos_sin, -1.0f,
				  "rotary_backward");
}
