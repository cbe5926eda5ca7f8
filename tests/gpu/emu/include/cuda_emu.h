/*
 * cuda_emu.h: the part of the CUDA runtime, cuBLAS and the device language that
 * kernels/ uses, emulated on the CPU (tests/gpu/emu/README.md). A test aid: it runs the
 * plugin's kernels for their logic (indexing, masking, reductions, barriers, shuffles),
 * never for speed, and knows no memory model beyond "one thread at a time".
 *
 * The files named as CUDA's headers in this directory include this one, so the kernels
 * compile unchanged once transform.py has rewritten their launches.
 */
#ifndef CUDA_EMU_H
#define CUDA_EMU_H

#include <functional>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static		/* each block in flight keeps its own copy (cuda_emu.cpp) */
#define __launch_bounds__(...)
#define CUDART_VERSION 13000

struct dim3
{
	unsigned	x, y, z;
	dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3
{
	unsigned	x, y, z;
};
struct alignas(16) float4
{
	float		x, y, z, w;
};
struct alignas(16) uint4
{
	unsigned	x, y, z, w;
};

/* --- runtime --- */

typedef struct emu_stream *cudaStream_t;
typedef struct emu_event *cudaEvent_t;
enum cudaError_t
{
	cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2,
	cudaErrorInvalidConfiguration = 9, cudaErrorInsufficientDriver = 35, cudaErrorNoDevice = 100,
	cudaErrorMapBufferObjectFailed = 205, cudaErrorPeerAccessUnsupported = 217,
	cudaErrorLaunchFailure = 719, cudaErrorNotSupported = 801
};
enum cudaMemcpyKind
{
	cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice
};
enum cudaFuncAttribute
{
	cudaFuncAttributeMaxDynamicSharedMemorySize
};
#define cudaStreamNonBlocking 1
#define cudaEventDefault 0
#define cudaEventDisableTiming 2
#define cudaHostAllocDefault 0
struct cudaDeviceProp
{
	char		name[256];
	int			major, minor, multiProcessorCount;
	size_t		totalGlobalMem;
};

cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int dev);
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b);
cudaError_t cudaMalloc(void **p, size_t bytes);
template <class T> cudaError_t cudaMalloc(T **p, size_t bytes) { return cudaMalloc((void **) p, bytes); }
cudaError_t cudaFree(void *p);
cudaError_t cudaHostAlloc(void **p, size_t bytes, unsigned flags);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t s);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind k, cudaStream_t s);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind k);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaGetLastError(void);
const char *cudaGetErrorString(cudaError_t e);

/* IPC between processes, and the device memory behind it (cuda_emu_ipc.cpp) */
struct cudaIpcMemHandle_t
{
	char		reserved[64];
};
#define cudaIpcMemLazyEnablePeerAccess 1
cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t *h, void *p);
cudaError_t cudaIpcOpenMemHandle(void **p, cudaIpcMemHandle_t h, unsigned flags);
cudaError_t cudaIpcCloseMemHandle(void *p);
cudaError_t cudaDeviceCanAccessPeer(int *can, int dev, int peer);
/* bytes of emulated device memory, which other processes can map; NULL when none is left */
void	   *emu_device_memory(size_t bytes);
void		emu_device_release(void *p);
/* the device cudaSetDevice made current */
int			emu_current_device(void);
enum cudaDeviceAttr
{
	cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int dev);
/*
 * cudaFuncSetAttribute(kernel, attribute, bytes), rewritten by transform.py so that the
 * kernel comes with its name as written, the name its launches give (args: all three
 * arguments as text, the kernel's name first).
 */
cudaError_t emu_allow_dynamic_smem(const char *args, int bytes);
#define EMU_FUNC_SET_ATTRIBUTE(...) emu_func_set_attribute(#__VA_ARGS__, __VA_ARGS__)
template <class F> cudaError_t
emu_func_set_attribute(const char *args, F, cudaFuncAttribute, int bytes)
{
	return emu_allow_dynamic_smem(args, bytes);
}

/* --- number formats --- */

struct __nv_bfloat16
{
	uint16_t	x;
};
struct __half
{
	uint16_t	x;
};

static inline float
__uint_as_float(unsigned u)
{
	float		f;

	memcpy(&f, &u, 4);
	return f;
}

static inline unsigned
__float_as_uint(float f)
{
	unsigned	u;

	memcpy(&u, &f, 4);
	return u;
}

static inline float
__bfloat162float(__nv_bfloat16 b)
{
	return __uint_as_float((unsigned) b.x << 16);
}

static inline __nv_bfloat16
__float2bfloat16_rn(float f)
{
	unsigned	u = __float_as_uint(f);
	__nv_bfloat16 b;

	if ((u & 0x7fffffffu) > 0x7f800000u)
		u |= 0x400000u;			/* quiet NaN */
	else
		u += 0x7fffu + ((u >> 16) & 1);
	b.x = (uint16_t) (u >> 16);
	return b;
}

static inline float
__half2float(__half h)
{
	int			e = (h.x >> 10) & 31,
				m = h.x & 1023;
	float		v = e == 0 ? ldexpf((float) m, -24) : e == 31 ? (m ? NAN : INFINITY) :
		ldexpf((float) (m | 1024), e - 25);

	return h.x >> 15 ? -v : v;
}

static inline int
min(int a, int b)
{
	return a < b ? a : b;
}

/* --- threads, blocks, barriers, shuffles --- */

namespace emu
{
	extern uint3 block_idx, block_dim, grid_dim;
	extern void *dynamic_smem;
	uint3	   &thread_idx(void);
	/* a __shared__ variable of n bytes, poisoned (0xa5) when a block first reaches it */
	void		fresh_shared(void *p, size_t n);
	void		barrier(void);
	/* v from lane ^ lane_mask, among the lanes of mask (checked: cuda_emu.cpp) */
	unsigned	shuffle_xor(unsigned mask, unsigned v, int lane_mask);

	/* What <<<grid, block, smem, stream>>> said; run() executes the kernel call body per thread. */
	struct launch_cfg
	{
		dim3		grid, block;
		size_t		smem;
		launch_cfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = 0) : grid(g), block(b), smem(s) {}
		/* kernel: its name as the launch writes it, for its own shared memory limit */
		void		run(const char *kernel, std::function<void()> body);
	};
}

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

static inline void
__syncthreads(void)
{
	emu::barrier();
}

/* Threads run one at a time: an atomic add is a plain one. */
template <typename T>
static inline T
atomicAdd(T *p, T v)
{
	T			old = *p;

	*p = old + v;
	return old;
}

static inline float
__shfl_xor_sync(unsigned mask, float v, int lane_mask)
{
	return __uint_as_float(emu::shuffle_xor(mask, __float_as_uint(v), lane_mask));
}

static inline unsigned
__shfl_xor_sync(unsigned mask, unsigned v, int lane_mask)
{
	return emu::shuffle_xor(mask, v, lane_mask);
}

/* --- cuBLAS: the two products the plugin calls, in double --- */

typedef struct emu_blas *cublasHandle_t;
enum cublasStatus_t
{
	CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_SUPPORTED = 15
};
enum cublasOperation_t
{
	CUBLAS_OP_N, CUBLAS_OP_T
};
enum cublasMath_t
{
	CUBLAS_DEFAULT_MATH, CUBLAS_PEDANTIC_MATH = 2
};
enum cudaDataType
{
	CUDA_R_32F, CUDA_R_16BF
};
enum cublasComputeType_t
{
	CUBLAS_COMPUTE_32F
};
enum cublasGemmAlgo_t
{
	CUBLAS_GEMM_DEFAULT
};
cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m);
const char *cublasGetStatusString(cublasStatus_t s);
cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
						   int k, const float *alpha, const float *A, int lda, const float *B,
						   int ldb, const float *beta, float *C, int ldc);
cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
										 int m, int n, int k, const float *alpha, const float *A,
										 int lda, long long sa, const float *B, int ldb, long long sb,
										 const float *beta, float *C, int ldc, long long sc, int batch);
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
										  int m, int n, int k, const void *alpha, const void *A,
										  cudaDataType at, int lda, long long sa, const void *B,
										  cudaDataType bt, int ldb, long long sb, const void *beta,
										  void *C, cudaDataType ct, int ldc, long long sc, int batch,
										  cublasComputeType_t compute, cublasGemmAlgo_t algo);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
							int n, int k, const void *alpha, const void *A, cudaDataType at,
							int lda, const void *B, cudaDataType bt, int ldb, const void *beta,
							void *C, cudaDataType ct, int ldc, cublasComputeType_t compute,
							cublasGemmAlgo_t algo);

#endif
