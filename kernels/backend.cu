/*
 * backend.cu: the CUDA backend's life: creating it on a device (stream, cuBLAS handle,
 * the table of backend.h filled with the other files' operations), keeping the failures
 * of asynchronous operations until they can be reported, and destroying it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

void
cuda_fail(cuda_backend *cb, dl_status code, const char *op, const char *what)
{
	if (cb->pending.code == DL_OK)
		dl_fail(&cb->pending, code, "CUDA %s failed on %s: %s", op, cb->name, what);
}

void
cuda_check_launch(cuda_backend *cb, const char *op)
{
	cudaError_t e = cudaGetLastError();

	if (e != cudaSuccess)
		cuda_fail(cb, DL_EBACKEND, op, cudaGetErrorString(e));
}

void *
cuda_scratch(cuda_backend *cb, int slot, size_t bytes, const char *op)
{
	size_t		want = 1 << 20;
	cudaError_t e;

	if (bytes <= cb->scratch_bytes[slot])
		return cb->scratch[slot];
	while (want < bytes)
		want *= 2;
	/* the operations queued before may still use the old buffer */
	e = cudaStreamSynchronize(cb->stream);
	if (e == cudaSuccess)
	{
		cudaFree(cb->scratch[slot]);
		cb->scratch[slot] = NULL;
		cb->scratch_bytes[slot] = 0;
		e = cudaMalloc(&cb->scratch[slot], want);
	}
	if (e != cudaSuccess)
	{
		/*
		 * Out of memory, or a context broken by an earlier fault (sticky: every call
		 * fails from then on), which the model server must not take for a full GPU
		 */
		cudaGetLastError();
		if (e == cudaErrorMemoryAllocation)
		{
			cb->scratch[slot] = NULL;
			cuda_fail(cb, DL_ENOMEM, op, "out of GPU memory for its scratch buffer");
		}
		else
			cuda_fail(cb, DL_EBACKEND, op, cudaGetErrorString(e));
		return NULL;
	}
	cb->scratch_bytes[slot] = want;
	return cb->scratch[slot];
}

dl_status
cuda_take_pending(cuda_backend *cb, dl_error *err)
{
	dl_status	code = cb->pending.code;

	if (code == DL_OK)
		return DL_OK;
	if (err)
		*err = cb->pending;
	cb->pending.code = DL_OK;
	return code;
}

/* Release whatever a (possibly half-made) backend holds. */
static void
cuda_destroy(dl_backend *be)
{
	cuda_backend *cb = cuda_enter(be);

	if (cb->stream)
		cudaStreamSynchronize(cb->stream);
	cuda_profile_report(cb);
	cuda_stage_free(cb);
	for (int i = 0; i < 2; i++)
		if (cb->stage_done[i])
			cudaEventDestroy(cb->stage_done[i]);
	for (int i = 0; i < CUDA_SCRATCH_SLOTS; i++)
		cudaFree(cb->scratch[i]);
	if (cb->blas)
		cublasDestroy(cb->blas);
	if (cb->aside)
	{
		cudaStreamSynchronize(cb->aside);
		cudaStreamDestroy(cb->aside);
	}
	if (cb->stream)
		cudaStreamDestroy(cb->stream);
	free(cb);
}

/* The device's checks and objects, into a zeroed cb; on failure the caller destroys cb. */
static dl_status
cuda_backend_init(cuda_backend *cb, int dev, dl_error *err)
{
	cudaDeviceProp prop;
	dl_status	st;
	int			n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);

	if (e == cudaErrorNoDevice || (e == cudaSuccess && n == 0))
		return dl_fail(err, DL_EBACKEND, "no CUDA GPU is visible");
	if (e != cudaSuccess)
	{
		dl_fail(err, DL_EBACKEND, "the CUDA driver cannot be used: %s", cudaGetErrorString(e));
		return dl_hint(err, "check that the NVIDIA driver is installed and nvidia-smi sees the GPU");
	}
	if (dev < 0 || dev >= n)
		return dl_fail(err, DL_EINVAL, "CUDA device %d does not exist (%d visible)", dev, n);
	CUDA_TRY(cudaSetDevice(dev), err);
	CUDA_TRY(cudaGetDeviceProperties(&prop, dev), err);
	if (prop.major < 8)
	{
		dl_fail(err, DL_EUNSUPPORTED, "GPU %d (%s) has compute capability %d.%d", dev, prop.name,
				prop.major, prop.minor);
		return dl_hint(err, "the CUDA backend needs compute capability 8.0 (Ampere) or newer");
	}
	cb->sm_count = prop.multiProcessorCount;
	/* 227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86 and sm_89: kernels size themselves */
	CUDA_TRY(cudaDeviceGetAttribute(&cb->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), err);
	CUDA_TRY(cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking), err);
	CUDA_TRY(cudaStreamCreateWithFlags(&cb->aside, cudaStreamNonBlocking), err);
	for (int i = 0; i < 2; i++)
		CUDA_TRY(cudaEventCreateWithFlags(&cb->stage_done[i], cudaEventDisableTiming), err);
	CUBLAS_TRY(cublasCreate(&cb->blas), err);
	CUBLAS_TRY(cublasSetStream(cb->blas, cb->stream), err);
	/* fp32 mode exists to match float32 references: no TF32, whatever the environment says */
	if (!cb->bf16_math)
		CUBLAS_TRY(cublasSetMathMode(cb->blas, CUBLAS_PEDANTIC_MATH), err);
	st = cuda_layernorm_init(cb, err);
	return st != DL_OK ? st : cuda_attention_init(cb, err);
}

dl_status
cuda_backend_create(int dev, int mode, dl_backend **out, dl_error *err)
{
	cuda_backend *cb;
	dl_status	st;

	*out = NULL;
	if (mode != DL_CUDA_BF16 && mode != DL_CUDA_FP32 && mode != DL_CUDA_MIXED)
		return dl_fail(err, DL_EINVAL, "unknown CUDA backend mode %d", mode);
	if ((cb = (cuda_backend *) calloc(1, sizeof(*cb))) == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating the CUDA backend");
	cb->dev = dev;
	cb->fp32 = mode != DL_CUDA_BF16;
	cb->bf16_math = mode != DL_CUDA_FP32;
	snprintf(cb->name, sizeof(cb->name), "cuda:%d", dev);
	if ((st = cuda_backend_init(cb, dev, err)) != DL_OK)
	{
		cudaGetLastError();
		cuda_destroy(&cb->be);
		return st;
	}

	cb->be.name = cb->name;
	cb->be.weight_elem_size = cb->fp32 ? 4 : 2;
	cb->be.kv_elem_size = cb->fp32 ? 4 : 2;
	cb->be.alignment = 256;		/* cudaMalloc's; keeps every vector load aligned */
	cb->be.threads = 0;
	cb->be.alloc = cuda_alloc;
	cb->be.free = cuda_free;
	cb->be.zero = cuda_zero;
	cb->be.copy = cuda_copy;
	cb->be.upload = cuda_upload;
	cb->be.download = cuda_download;
	cb->be.synchronize = cuda_synchronize;
	cb->be.upload_tensor = cuda_upload_tensor;
#define SET_OP(op) cb->be.op = cuda_##op;
	CUDA_COMPUTE_OPS(SET_OP)
#undef SET_OP
	cb->be.attention_workspace = cuda_attention_workspace;
	cb->be.attention_train_workspace = cuda_attention_train_workspace;
	cb->be.sum_squares = cuda_sum_squares;
	cb->be.sample_workspace = cuda_sample_workspace;
	cb->be.sum_ranks = cuda_sum_ranks;
	cb->be.sum_ranks_aside = cuda_sum_ranks_aside;
	cb->be.sum_ranks_wait = cuda_sum_ranks_wait;
	cb->be.to_bf16 = cuda_to_bf16;
	cb->be.peer_export = cuda_peer_export;
	cb->be.peer_open = cuda_peer_open;
	cb->be.peer_close = cuda_peer_close;
	cb->be.destroy = cuda_destroy;
	if ((st = cuda_profile_install(cb, err)) != DL_OK)
	{
		cuda_destroy(&cb->be);
		return st;
	}
	*out = &cb->be;
	return DL_OK;
}
