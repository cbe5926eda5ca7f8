/*
 * memory.cu: device memory of the CUDA backend, copies in all directions, and
 * upload_tensor, which converts safetensors data (F32, F16, BF16) to the device formats
 * on the GPU.
 *
 * Every copy runs on the backend's stream, so it is ordered with the operations around
 * it. Uploads from pageable host memory return once the data has been staged, so the
 * caller may reuse its buffer at once. upload_tensor streams a tensor through two pinned
 * staging buffers: while the GPU copies (and converts) one chunk, the host gathers the
 * next, which is also where a row permutation is applied.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

/* Device memory, or NULL with DL_ENOMEM naming what was needed and what is free. */
void *
cuda_alloc(dl_backend *be, size_t bytes, dl_error *err)
{
	cuda_backend *cb = cuda_enter(be);
	void	   *p = NULL;
	cudaError_t e;

	/* cudaMalloc(0) gives NULL, which callers take for failure */
	e = cudaMalloc(&p, bytes ? bytes : 1);
	if (e == cudaSuccess)
		return p;
	cudaGetLastError();			/* not sticky: later calls must not see it */
	if (e == cudaErrorMemoryAllocation)
	{
		size_t		free_b = 0,
					total_b = 0;

		cudaMemGetInfo(&free_b, &total_b);
		dl_fail(err, DL_ENOMEM, "out of GPU memory on %s: %.1f MB needed, %.1f MB free of %.1f MB",
				be->name, bytes / 1048576.0, free_b / 1048576.0, total_b / 1048576.0);
		dl_hint(err, "use a smaller model, fewer sequences or a shorter context, or free the GPU");
	}
	else
		dl_fail(err, DL_EBACKEND, "cudaMalloc of %zu bytes on %s failed: %s", bytes, be->name,
				cudaGetErrorString(e));
	return NULL;
}

/* Free device memory, after the operations queued before (which may still use it). */
void
cuda_free(dl_backend *be, void *ptr)
{
	cuda_backend *cb = cuda_enter(be);
	cudaError_t e;

	if (ptr == NULL)
		return;
	cudaStreamSynchronize(cb->stream);
	if ((e = cudaFree(ptr)) != cudaSuccess)
		cuda_fail(cb, DL_EBACKEND, "cudaFree", cudaGetErrorString(e));
}

/* Zero bytes of device memory, in stream order. */
void
cuda_zero(dl_backend *be, void *dst, size_t bytes)
{
	cuda_backend *cb = cuda_enter(be);
	cudaError_t e = cudaMemsetAsync(dst, 0, bytes, cb->stream);

	if (e != cudaSuccess)
		cuda_fail(cb, DL_EBACKEND, "cudaMemsetAsync", cudaGetErrorString(e));
}

/* Copy within the device, in stream order. */
void
cuda_copy(dl_backend *be, void *dst, const void *src, size_t bytes)
{
	cuda_backend *cb = cuda_enter(be);
	cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cb->stream);

	if (e != cudaSuccess)
		cuda_fail(cb, DL_EBACKEND, "cudaMemcpyAsync (device to device)", cudaGetErrorString(e));
}

/* Host to device, in stream order; src may be reused when this returns. */
dl_status
cuda_upload(dl_backend *be, void *dst, const void *src, size_t bytes, dl_error *err)
{
	cuda_backend *cb = cuda_enter(be);
	dl_status	st = cuda_take_pending(cb, err);

	if (st != DL_OK)
		return st;
	CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cb->stream), err);
	return DL_OK;
}

/* Device to host after everything queued before; reports any failure of those. */
dl_status
cuda_download(dl_backend *be, void *dst, const void *src, size_t bytes, dl_error *err)
{
	cuda_backend *cb = cuda_enter(be);
	dl_status	st = cuda_take_pending(cb, err);

	if (st != DL_OK)
		return st;
	CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cb->stream), err);
	CUDA_TRY(cudaStreamSynchronize(cb->stream), err);
	return DL_OK;
}

dl_status
cuda_stream_wait(cuda_backend *cb, cudaStream_t stream, dl_error *err)
{
	dl_status	st = cuda_take_pending(cb, err);

	if (st != DL_OK)
		return st;
	CUDA_TRY(cudaStreamSynchronize(stream), err);
	return DL_OK;
}

/* Wait for the stream; a kernel that failed while running surfaces here. */
dl_status
cuda_synchronize(dl_backend *be, dl_error *err)
{
	cuda_backend *cb = cuda_enter(be);

	return cuda_stream_wait(cb, cb->stream, err);
}

/* Launch the conversion of n elements from safetensors dtype sd to float32 or bfloat16. */
template <typename D>
static void
convert_launch(D *dst, const void *src, st_dtype sd, size_t n, cudaStream_t stream)
{
	unsigned	grid = grid_for(n);

	if (sd == ST_F32)
		convert_kernel<<<grid, DL_BLOCK, 0, stream>>>(dst, (const float *) src, n);
	else if (sd == ST_F16)
		convert_kernel<<<grid, DL_BLOCK, 0, stream>>>(dst, (const __half *) src, n);
	else
		convert_kernel<<<grid, DL_BLOCK, 0, stream>>>(dst, (const __nv_bfloat16 *) src, n);
}

/*
 * Staging buffers, on the first upload_tensor: pinned host memory, so that copies from it
 * run while the host fills the other one; plain memory where pinning is refused (a
 * locked-memory limit), which is slower but equally correct.
 */
static dl_status
stage_init(cuda_backend *cb, dl_error *err)
{
	if (cb->host_stage[0] == NULL)
	{
		cb->host_pinned = 1;
		for (int i = 0; i < 2 && cb->host_pinned; i++)
			if (cudaHostAlloc(&cb->host_stage[i], STAGE_BYTES, cudaHostAllocDefault) != cudaSuccess)
			{
				cudaGetLastError();
				cudaFreeHost(cb->host_stage[0]);
				cb->host_stage[0] = cb->host_stage[1] = NULL;
				cb->host_pinned = 0;
			}
		for (int i = 0; i < 2 && !cb->host_pinned; i++)
			if ((cb->host_stage[i] = malloc(STAGE_BYTES)) == NULL)
			{
				/* both or neither: the next upload sets them up again */
				free(cb->host_stage[0]);
				cb->host_stage[0] = NULL;
				return dl_fail(err, DL_ENOMEM, "out of host memory for upload buffers");
			}
	}
	for (int i = 0; i < 2; i++)
		if (cb->dev_stage[i] == NULL &&
			(cb->dev_stage[i] = cuda_alloc(&cb->be, STAGE_BYTES, err)) == NULL)
			return err->code;
	return DL_OK;
}

void
cuda_stage_free(cuda_backend *cb)
{
	for (int i = 0; i < 2; i++)
	{
		if (cb->host_pinned)
			cudaFreeHost(cb->host_stage[i]);
		else
			free(cb->host_stage[i]);
		cudaFree(cb->dev_stage[i]);
		cb->host_stage[i] = cb->dev_stage[i] = NULL;
	}
}

/*
 * Convert tensor t, seen as [nrows, cols], into dst (fmt), row r of dst from row rows[r]
 * of t (or row r). Chunks of whole rows go through the staging pairs in turn (across
 * calls too, so that a model loaded a slice at a time overlaps as well): wait until
 * that pair's previous transfer is done, gather the rows into its pinned buffer, then
 * queue either a copy straight into dst (same format) or a copy to the device staging
 * buffer and a conversion kernel from there into dst.
 */
dl_status
cuda_upload_tensor(dl_backend *be, void *dst, dl_fmt fmt, const st_tensor *t,
				   const int32_t *rows, dl_error *err)
{
	cuda_backend *cb = cuda_enter(be);
	size_t		src_es = t->dtype == ST_F32 ? 4 : 2;
	size_t		dst_es = fmt == DL_FMT_F32 ? 4 : be->weight_elem_size;
	int64_t		cols = t->ndim > 1 ? t->shape[t->ndim - 1] : 1;
	int64_t		nrows = cols ? t->numel / cols : 0;
	/* without a permutation rows are contiguous: move single elements as "rows" */
	int64_t		unit = rows ? cols : 1;
	int64_t		nunits = rows ? nrows : t->numel;
	size_t		unit_bytes = (size_t) unit * src_es;
	int			same = (t->dtype == ST_F32 && dst_es == 4) || (t->dtype == ST_BF16 && dst_es == 2);
	int64_t		per_chunk;
	dl_status	st;

	if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
		return dl_fail(err, DL_EUNSUPPORTED, "tensor \"%s\" is neither F32, F16 nor BF16", t->name);
	if ((st = cuda_take_pending(cb, err)) != DL_OK)
		return st;
	if (t->numel == 0)
		return DL_OK;
	if (unit_bytes > STAGE_BYTES)
		return dl_fail(err, DL_EUNSUPPORTED, "tensor \"%s\": rows of %lld elements are too long to upload",
					   t->name, (long long) cols);
	if ((st = stage_init(cb, err)) != DL_OK)
		return st;
	per_chunk = (int64_t) (STAGE_BYTES / unit_bytes);
	for (int64_t u0 = 0; u0 < nunits; u0 += per_chunk)
	{
		int			slot = cb->stage_turn;
		int64_t		n = nunits - u0 < per_chunk ? nunits - u0 : per_chunk;
		size_t		bytes = (size_t) n * unit_bytes;
		char	   *stage = (char *) cb->host_stage[slot];
		char	   *out = (char *) dst + (size_t) u0 * unit * dst_es;

		CUDA_TRY(cudaEventSynchronize(cb->stage_done[slot]), err);
		if (rows == NULL)
			memcpy(stage, t->data + (size_t) u0 * unit_bytes, bytes);
		else
			for (int64_t r = 0; r < n; r++)
			{
				int32_t		from = rows[u0 + r];

				if (from < 0 || from >= nrows)
					return dl_fail(err, DL_EINVAL, "tensor \"%s\": row %d of %lld does not exist",
								   t->name, from, (long long) nrows);
				memcpy(stage + (size_t) r * unit_bytes, t->data + (size_t) from * unit_bytes,
					   unit_bytes);
			}
		if (same)
			CUDA_TRY(cudaMemcpyAsync(out, stage, bytes, cudaMemcpyHostToDevice, cb->stream), err);
		else
		{
			CUDA_TRY(cudaMemcpyAsync(cb->dev_stage[slot], stage, bytes, cudaMemcpyHostToDevice,
									 cb->stream), err);
			if (dst_es == 4)
				convert_launch((float *) out, cb->dev_stage[slot], t->dtype, (size_t) n * unit,
							   cb->stream);
			else
				convert_launch((__nv_bfloat16 *) out, cb->dev_stage[slot], t->dtype,
							   (size_t) n * unit, cb->stream);
			CUDA_TRY(cudaGetLastError(), err);
		}
		CUDA_TRY(cudaEventRecord(cb->stage_done[slot], cb->stream), err);
		cb->stage_turn ^= 1;
	}
	return DL_OK;
}
