/*
 * embedding.cu: row gathers into float32: the token embedding (a table in weight format)
 * and the selection of the rows whose logits are wanted; and their backward, a scatter
 * that adds rows of the gradient into the table's gradient.
 */
#include "common.cuh"

/* out[i, :] = table[rows[i], :] as float32; one block per output row. */
template <typename T>
__global__ static void
gather_kernel(float *out, const T *table, const int32_t *rows, int C)
{
	const T    *src = table + (size_t) rows[blockIdx.x] * C;
	float	   *dst = out + (size_t) blockIdx.x * C;

	for (int c = threadIdx.x; c < C; c += blockDim.x)
		dst[c] = to_f32(src[c]);
}

/* Token embeddings from the table in weight format. */
void
cuda_embedding_forward(dl_backend *be, float *out, const void *table, const int32_t *ids,
					   int T, int C)
{
	cuda_backend *cb = cuda_enter(be);

	if (T <= 0 || C <= 0)
		return;
	if (cb->fp32)
		gather_kernel<<<T, DL_BLOCK, 0, cb->stream>>>(out, (const float *) table, ids, C);
	else
		gather_kernel<<<T, DL_BLOCK, 0, cb->stream>>>(out, (const __nv_bfloat16 *) table, ids, C);
	cuda_check_launch(cb, "embedding_forward");
}

/* Rows of a float32 matrix. */
void
cuda_gather_rows_forward(dl_backend *be, float *out, const float *in, const int32_t *rows,
						 int n, int C)
{
	cuda_backend *cb = cuda_enter(be);

	if (n <= 0 || C <= 0)
		return;
	gather_kernel<<<n, DL_BLOCK, 0, cb->stream>>>(out, in, rows, C);
	cuda_check_launch(cb, "gather_rows_forward");
}

/*
 * dtable[ids[t], :] += dout[t, :]; one block per row of dout. Repeated ids meet in
 * atomic adds, so their order (and the last bits of the sum) may vary from run to run.
 */
__global__ static void
scatter_add_kernel(float *dtable, const float *dout, const int32_t *ids, int C)
{
	float	   *dst = dtable + (size_t) ids[blockIdx.x] * C;
	const float *src = dout + (size_t) blockIdx.x * C;

	for (int c = threadIdx.x; c < C; c += blockDim.x)
		atomicAdd(dst + c, src[c]);
}

void
cuda_embedding_backward(dl_backend *be, float *dtable, const float *dout, const int32_t *ids,
						int T, int C)
{
	cuda_backend *cb = cuda_enter(be);

	if (T <= 0 || C <= 0)
		return;
	scatter_add_kernel<<<T, DL_BLOCK, 0, cb->stream>>>(dtable, dout, ids, C);
	cuda_check_launch(cb, "embedding_backward");
}
