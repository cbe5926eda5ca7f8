/*
 * plugin.cu: the entry point of dolly_cuda.so (see src/engine/cuda_plugin.h): device probing,
 * a self-test that runs one of our kernels and one cuBLAS product against the host, and
 * the creation of the CUDA backend (backend.cu).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

extern "C" {
#include "cuda_plugin.h"
}

#define STR2(x) #x
#define STR(x) STR2(x)

/* Describe the visible GPUs; "no device" is not an error, a broken driver is. */
static dl_status
probe(dl_gpu_info *gpus, int max, int *ngpus, dl_error *err)
{
	int			n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);

	*ngpus = 0;
	if (e == cudaErrorNoDevice)
		return DL_OK;
	/* what a machine without the NVIDIA driver (or with an older one) answers */
	if (e == cudaErrorInsufficientDriver)
	{
		dl_fail(err, DL_EBACKEND, "no NVIDIA driver that supports CUDA %d.%d: %s",
				CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10, cudaGetErrorString(e));
		return dl_hint(err, "install the NVIDIA driver, or use dolly.device = cpu");
	}
	if (e != cudaSuccess)
		return dl_fail(err, DL_EBACKEND, "cudaGetDeviceCount failed: %s", cudaGetErrorString(e));
	for (int i = 0; i < n && i < max; i++)
	{
		cudaDeviceProp prop;

		CUDA_TRY(cudaGetDeviceProperties(&prop, i), err);
		snprintf(gpus[i].name, sizeof(gpus[i].name), "%s", prop.name);
		gpus[i].cc_major = prop.major;
		gpus[i].cc_minor = prop.minor;
		gpus[i].total_bytes = prop.totalGlobalMem;
		CUDA_TRY(cudaSetDevice(i), err);
		CUDA_TRY(cudaMemGetInfo(&gpus[i].free_bytes, &gpus[i].total_bytes), err);
	}
	*ngpus = n;
	return DL_OK;
}

/* Largest |a - b| / (1 + |b|) over n values. */
static double
max_rel_err(const float *a, const float *b, int n)
{
	double		worst = 0;

	for (int i = 0; i < n; i++)
	{
		double		d = fabs((double) a[i] - b[i]) / (1.0 + fabs((double) b[i]));

		worst = d > worst ? d : worst;
	}
	return worst;
}

/* The self-test's sizes: GELU on ST_N values, C[ST_M, ST_N2] = A[ST_M, ST_K] B[ST_N2, ST_K]^T. */
enum
{
	ST_N = 4096, ST_M = 33, ST_N2 = 17, ST_K = 64,
	/* host: x, y | a, b, c | ref (of the GELU, then of the product) */
	ST_HOST_FLOATS = 2 * ST_N + ST_M * ST_K + ST_N2 * ST_K + ST_M * ST_N2 + ST_N
};

/* GELU kernel on n values and C[M,N] = A[M,K] B[N,K]^T through cuBLAS, both vs the host. */
static dl_status
run_selftest(float *host, float *dev, cublasHandle_t blas, dl_error *err)
{
	enum { n = ST_N, M = ST_M, N = ST_N2, K = ST_K };
	float	   *x = host, *y = x + n, *a = y + n, *b = a + M * K, *c = b + N * K, *ref = c + M * N;
	float	   *dx = dev, *dy = dx + n, *da = dy + n, *db = da + M * K, *dc = db + N * K;
	const float one = 1.0f, zero = 0.0f;
	double		e;

	srand(1234);
	for (int i = 0; i < n + M * K + N * K; i++)
		x[i < n ? i : i + n] = (float) rand() / RAND_MAX * 8.0f - 4.0f;
	CUDA_TRY(cudaMemcpy(dx, x, n * sizeof(float), cudaMemcpyHostToDevice), err);
	CUDA_TRY(cudaMemcpy(da, a, (M * K + N * K) * sizeof(float), cudaMemcpyHostToDevice), err);

	gelu_forward_launch(dy, dx, n, DL_GELU_TANH, 0);
	CUDA_TRY(cudaGetLastError(), err);
	/* cuBLAS is column-major: C^T[N,M] = B[N,K] A^T[K,M] is our row-major C = A B^T */
	CUBLAS_TRY(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, db, K, da, K,
						   &zero, dc, N), err);
	CUDA_TRY(cudaMemcpy(y, dy, n * sizeof(float), cudaMemcpyDeviceToHost), err);
	CUDA_TRY(cudaMemcpy(c, dc, M * N * sizeof(float), cudaMemcpyDeviceToHost), err);

	for (int i = 0; i < n; i++)
		ref[i] = 0.5f * x[i] * (1.0f + tanhf(0.7978845608028654f * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
	if ((e = max_rel_err(y, ref, n)) > 1e-5)
		return dl_fail(err, DL_EBACKEND, "CUDA self-test: GELU kernel differs from the host by %.3g", e);
	for (int i = 0; i < M; i++)
		for (int j = 0; j < N; j++)
		{
			double		s = 0;

			for (int k = 0; k < K; k++)
				s += (double) a[i * K + k] * b[j * K + k];
			ref[i * N + j] = (float) s;
		}
	if ((e = max_rel_err(c, ref, M * N)) > 1e-4)
		return dl_fail(err, DL_EBACKEND, "CUDA self-test: cublasSgemm differs from the host by %.3g", e);
	return DL_OK;
}

/* Allocate, run the self-test on device dev, release whatever was allocated. */
static dl_status
selftest(int dev, dl_error *err)
{
	size_t		nfloats = ST_HOST_FLOATS;	/* the device needs fewer: no ref */
	float	   *host = (float *) malloc(nfloats * sizeof(float));
	float	   *devbuf = NULL;
	cublasHandle_t blas = NULL;
	dl_status	st;

	if (host == NULL)
		return dl_fail(err, DL_ENOMEM, "CUDA self-test: out of host memory");
	if (cudaSetDevice(dev) != cudaSuccess || cudaMalloc(&devbuf, nfloats * sizeof(float)) != cudaSuccess)
		st = dl_fail(err, DL_EBACKEND, "CUDA self-test: cannot allocate on device %d: %s", dev,
					 cudaGetErrorString(cudaGetLastError()));
	else if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS)
		st = dl_fail(err, DL_EBACKEND, "CUDA self-test: cublasCreate failed on device %d", dev);
	else
		st = run_selftest(host, devbuf, blas, err);
	if (blas)
		cublasDestroy(blas);
	cudaFree(devbuf);
	free(host);
	return st;
}

static const dl_cuda_plugin plugin = {
	DL_CUDA_PLUGIN_ABI,
	STR(CUDART_VERSION),
	probe,
	selftest,
	cuda_backend_create,
};

extern "C" __attribute__((visibility("default"))) const dl_cuda_plugin *
dolly_cuda_plugin(void)
{
	return &plugin;
}
