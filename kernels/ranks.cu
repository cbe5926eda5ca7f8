/*
 * ranks.cu: the CUDA backend's part in the sums over data-parallel ranks (collective.c):
 * device memory exported to the other ranks' processes and mapped from theirs (CUDA IPC),
 * the rank-order sum of the ranks' buffers read from their GPUs' memory (on the backend's
 * stream, or on a second one that runs alongside backward), and the rounding to bfloat16
 * for bf16_communication, all on the device.
 */
#include <string.h>

#include "common.cuh"

/* The ranks' buffers, by value: a kernel's arguments may hold 4 KB, these are 512 bytes. */
struct rank_sources
{
	const void *at[DL_MAX_RANK_SOURCES];
};

/*
 * out[i] (+)= the sum of the sources' element i, added in rank order in float32, each
 * thread an element at a time: the order, and so the bits, of the host's sums.
 */
template <typename T>
__global__ static void
sum_ranks_kernel(float *out, rank_sources src, int nsrc, size_t n, int accumulate)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n;
		 i += (size_t) gridDim.x * blockDim.x)
	{
		float		s = to_f32(((const T *) src.at[0])[i]);

		for (int r = 1; r < nsrc; r++)
			s += to_f32(((const T *) src.at[r])[i]);
		out[i] = accumulate ? out[i] + s : s;
	}
}

/* The sum of the ranks' buffers, on stream. */
static void
sum_ranks_on(cuda_backend *cb, cudaStream_t stream, float *out, const void *const *src, int nsrc,
			 size_t n, int bf16, int accumulate)
{
	rank_sources s;

	if (n == 0)
		return;
	if (nsrc < 1 || nsrc > DL_MAX_RANK_SOURCES)
	{
		cuda_fail(cb, DL_EINVAL, "sum_ranks", "the number of ranks is out of range");
		return;
	}
	memcpy(s.at, src, nsrc * sizeof(*src));
	if (bf16)
		sum_ranks_kernel<__nv_bfloat16><<<grid_for(n), DL_BLOCK, 0, stream>>>(out, s, nsrc, n, accumulate);
	else
		sum_ranks_kernel<float><<<grid_for(n), DL_BLOCK, 0, stream>>>(out, s, nsrc, n, accumulate);
	cuda_check_launch(cb, "sum_ranks");
}

/* On the backend's stream, in order with everything else. */
void
cuda_sum_ranks(dl_backend *be, float *out, const void *const *src, int nsrc, size_t n, int bf16,
			   int accumulate)
{
	cuda_backend *cb = cuda_enter(be);

	sum_ranks_on(cb, cb->stream, out, src, nsrc, n, bf16, accumulate);
}

/* On the second stream: backward's kernels go on meanwhile, on the first. */
void
cuda_sum_ranks_aside(dl_backend *be, float *out, const void *const *src, int nsrc, size_t n,
					 int bf16, int accumulate)
{
	cuda_backend *cb = cuda_enter(be);

	sum_ranks_on(cb, cb->aside, out, src, nsrc, n, bf16, accumulate);
}

/* Wait for the second stream's sums. */
dl_status
cuda_sum_ranks_wait(dl_backend *be, dl_error *err)
{
	cuda_backend *cb = cuda_enter(be);

	return cuda_stream_wait(cb, cb->aside, err);
}

/* bfloat16 bits, rounded to nearest even (as the host's float_to_bf16). */
void
cuda_to_bf16(dl_backend *be, uint16_t *dst, const float *src, size_t n)
{
	cuda_backend *cb = cuda_enter(be);

	if (n == 0)
		return;
	convert_kernel<<<grid_for(n), DL_BLOCK, 0, cb->stream>>>((__nv_bfloat16 *) dst, src, n);
	cuda_check_launch(cb, "to_bf16");
}

/* The IPC handle of an allocation, and the device it lives on (for the peer access check). */
dl_status
cuda_peer_export(dl_backend *be, void *mem, dl_peer_handle *h, dl_error *err)
{
	cuda_backend *cb = cuda_enter(be);
	cudaIpcMemHandle_t ipc;
	cudaError_t e = cudaIpcGetMemHandle(&ipc, mem);

	static_assert(sizeof(ipc) <= sizeof(h->bytes), "a CUDA IPC handle fits dl_peer_handle");
	if (e != cudaSuccess)
	{
		cudaGetLastError();		/* not sticky: the backend goes on */
		return dl_fail(err, DL_EUNSUPPORTED, "cudaIpcGetMemHandle on %s failed: %s", be->name,
					   cudaGetErrorString(e));
	}
	memset(h, 0, sizeof(*h));
	memcpy(h->bytes, &ipc, sizeof(ipc));
	h->device = cb->dev;
	return DL_OK;
}

/*
 * Map another process's allocation. Ranks on one GPU always can; on two GPUs only with
 * peer access between them (NVLink or a PCIe switch), which the mapping then enables.
 */
dl_status
cuda_peer_open(dl_backend *be, const dl_peer_handle *h, void **mem, dl_error *err)
{
	cuda_backend *cb = cuda_enter(be);
	cudaIpcMemHandle_t ipc;
	int			can = 1;
	cudaError_t e = cudaSuccess;

	*mem = NULL;
	if (h->device != cb->dev)
		e = cudaDeviceCanAccessPeer(&can, cb->dev, h->device);
	if (e == cudaSuccess && !can)
		return dl_fail(err, DL_EUNSUPPORTED, "%s has no peer access to cuda:%d", be->name, (int) h->device);
	memcpy(&ipc, h->bytes, sizeof(ipc));
	if (e == cudaSuccess)
		e = cudaIpcOpenMemHandle(mem, ipc, cudaIpcMemLazyEnablePeerAccess);
	if (e != cudaSuccess)
	{
		cudaGetLastError();
		*mem = NULL;
		return dl_fail(err, DL_EUNSUPPORTED, "%s cannot map cuda:%d's memory: %s", be->name,
					   (int) h->device, cudaGetErrorString(e));
	}
	return DL_OK;
}

/* Unmap, once the operations queued before (which may read it) are done, on both streams. */
void
cuda_peer_close(dl_backend *be, void *mem)
{
	cuda_backend *cb = cuda_enter(be);
	cudaError_t e;

	cudaStreamSynchronize(cb->stream);
	cudaStreamSynchronize(cb->aside);
	if ((e = cudaIpcCloseMemHandle(mem)) != cudaSuccess)
		cuda_fail(cb, DL_EBACKEND, "cudaIpcCloseMemHandle", cudaGetErrorString(e));
}
