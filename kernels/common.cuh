/* common.cuh: error plumbing shared by the CUDA plugin's files. */
#ifndef DOLLY_KERNELS_COMMON_CUH
#define DOLLY_KERNELS_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>

extern "C" {
#include "error.h"
}

/* Turn a failed CUDA runtime call into a dl_error naming the call, and return. */
#define CUDA_TRY(call, err) do { \
	cudaError_t e_ = (call); \
	if (e_ != cudaSuccess) \
		return dl_fail((err), DL_EBACKEND, "%s failed: %s", #call, cudaGetErrorString(e_)); \
	} while (0)

/* The same for cuBLAS. */
#define CUBLAS_TRY(call, err) do { \
	cublasStatus_t s_ = (call); \
	if (s_ != CUBLAS_STATUS_SUCCESS) \
		return dl_fail((err), DL_EBACKEND, "%s failed: %s", #call, cublasGetStatusString(s_)); \
	} while (0)

/* Elementwise kernels launch this many threads a block. */
#define DL_BLOCK 256

/* Launch the GELU (tanh form, "gelu_new") kernel: out[i] = gelu(in[i]) for n floats. */
void		gelu_tanh_forward_launch(float *out, const float *in, long n, cudaStream_t stream);

#endif
