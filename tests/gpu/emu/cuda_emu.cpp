/*
 * cuda_emu.cpp: the emulation behind cuda_emu.h.
 *
 * A launch runs its blocks one after another; the threads of a block are fibers on one
 * OS thread (a stack each, switched by emu_swap below), each running until it reaches a
 * barrier or a warp shuffle. A barrier opens when every thread still running waits at
 * one; a shuffle completes when all 32 lanes of the warp wait at one, and aborts when a
 * lane has exited (undefined on a GPU). Anything else that leaves no thread runnable is
 * a deadlock and aborts. Device memory is host memory filled with 0x5a bytes, dynamic
 * shared memory with 0xa5, so that reads of what nothing wrote show up.
 */
#include "cuda_emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <map>
#include <string>
#include <vector>

namespace emu
{
	uint3		block_idx, block_dim, grid_dim;
	void	   *dynamic_smem;

	enum state
	{
		RUNNABLE, AT_BARRIER, AT_SHUFFLE, EXITED
	};

	struct fiber
	{
		void	   *sp;			/* saved stack pointer while switched out */
		uint3		idx;
		state		st;
		unsigned	value;		/* a shuffle's operand, */
		int			lane_mask;	/* its xor, */
		unsigned	result;		/* and what the partner lane gave */
	};

	static std::vector<fiber> fibers;
	static std::vector<char *> stacks;
	static void *scheduler_sp;
	static fiber *current;
	static std::function<void()> *kernel_body;
	/* each kernel's dynamic shared memory limit: 48 KB unless it opted in to more */
	static std::map<std::string, size_t> smem_allowed;
	static const size_t SMEM_DEFAULT = 48 * 1024;
	static cudaError_t last_error = cudaSuccess;
	/*
	 * A fault that breaks the context ($EMU_FAIL_STICKY with $EMU_FAIL_ONCE): every call
	 * fails with it from then on, as on a GPU, until the stream of its backend is destroyed
	 */
	static cudaError_t sticky = cudaSuccess;
	/* blocks run so far, and the block in which each __shared__ variable was last poisoned */
	static uint64_t block_serial;
	static std::map<void *, uint64_t> shared_block;
	static const size_t STACK_BYTES = 128 * 1024;
}

using namespace emu;

/*
 * Save the callee-saved registers and the stack pointer to *save_sp, load those of
 * load_sp, return into that fiber (System V x86-64).
 */
extern "C" void emu_swap(void **save_sp, void *load_sp);
asm(".text\n.globl emu_swap\n.type emu_swap,@function\nemu_swap:\n"
	"pushq %rbp\npushq %rbx\npushq %r12\npushq %r13\npushq %r14\npushq %r15\n"
	"movq %rsp, (%rdi)\nmovq %rsi, %rsp\n"
	"popq %r15\npopq %r14\npopq %r13\npopq %r12\npopq %rbx\npopq %rbp\nret\n");

uint3 &
emu::thread_idx(void)
{
	return current->idx;
}

/* Hand control back to the scheduler in state st. */
static void
suspend(state st)
{
	current->st = st;
	emu_swap(&current->sp, scheduler_sp);
}

void
emu::barrier(void)
{
	suspend(AT_BARRIER);
}

unsigned
emu::shuffle_xor(unsigned v, int lane_mask)
{
	current->value = v;
	current->lane_mask = lane_mask;
	suspend(AT_SHUFFLE);
	return current->result;
}

/* Where a new fiber starts: the kernel call, then exit for good. */
static void
fiber_main(void)
{
	(*kernel_body) ();
	suspend(EXITED);
	abort();
}

/* Complete the shuffle of warp w if all its lanes wait at one; 1 if it did. */
static int
complete_shuffle(int w, int nthreads)
{
	int			lo = w * 32,
				hi = lo + 32 < nthreads ? lo + 32 : nthreads,
				waiting = 0,
				live = 0;

	for (int i = lo; i < hi; i++)
	{
		live += fibers[i].st != EXITED;
		waiting += fibers[i].st == AT_SHUFFLE;
	}
	if (waiting == 0 || waiting != live)
		return 0;
	if (live != 32)
	{
		fprintf(stderr, "cuda_emu: shuffle in warp %d of block (%u,%u,%u) with exited or missing lanes\n",
				w, block_idx.x, block_idx.y, block_idx.z);
		abort();
	}
	for (int i = lo; i < hi; i++)
		fibers[i].result = fibers[lo + ((i - lo) ^ fibers[i].lane_mask)].value;
	for (int i = lo; i < hi; i++)
		fibers[i].st = RUNNABLE;
	return 1;
}

/*
 * Whether threads run last to first between barriers ($EMU_ORDER=reverse): a thread that
 * reads what another writes without a barrier between them then reads before the write
 * in one of the two orders, so running the tests both ways finds such races.
 */
static int
reverse_order(void)
{
	static int	reverse = -1;

	if (reverse < 0)
		reverse = getenv("EMU_ORDER") && strcmp(getenv("EMU_ORDER"), "reverse") == 0;
	return reverse;
}

/* Run the threads of the current block until all have exited. */
static void
run_block(int nthreads)
{
	for (int i = 0; i < nthreads; i++)
	{
		/* a first switch pops six zero registers and returns into fiber_main */
		uintptr_t	top = ((uintptr_t) stacks[i] + STACK_BYTES) & ~(uintptr_t) 15;
		void	  **sp = (void **) (top - 64);

		memset(sp, 0, 6 * sizeof(void *));
		sp[6] = (void *) fiber_main;
		fibers[i].sp = sp;
		fibers[i].idx = {(unsigned) i % block_dim.x, (unsigned) i / block_dim.x % block_dim.y,
		(unsigned) i / (block_dim.x * block_dim.y)};
		fibers[i].st = RUNNABLE;
	}
	for (;;)
	{
		int			live = 0,
					at_barrier = 0,
					progress = 0;

		for (int k = 0; k < nthreads; k++)
		{
			int			i = reverse_order() ? nthreads - 1 - k : k;

			if (fibers[i].st == RUNNABLE)
			{
				current = &fibers[i];
				emu_swap(&scheduler_sp, fibers[i].sp);
			}
		}
		for (int i = 0; i < nthreads; i++)
		{
			live += fibers[i].st != EXITED;
			at_barrier += fibers[i].st == AT_BARRIER;
		}
		if (live == 0)
			return;
		for (int w = 0; w * 32 < nthreads; w++)
			progress |= complete_shuffle(w, nthreads);
		if (!progress && at_barrier == live)
		{
			for (int i = 0; i < nthreads; i++)
				if (fibers[i].st == AT_BARRIER)
					fibers[i].st = RUNNABLE;
			progress = 1;
		}
		if (!progress)
		{
			fprintf(stderr, "cuda_emu: deadlock in block (%u,%u,%u): %d threads live, %d at a barrier\n",
					block_idx.x, block_idx.y, block_idx.z, live, at_barrier);
			abort();
		}
	}
}

void
emu::fresh_shared(void *p, size_t n)
{
	if (shared_block[p] != block_serial)
	{
		memset(p, 0xa5, n);
		shared_block[p] = block_serial;
	}
}

/* A kernel's name as written, up to the first comma outside <>, without spaces. */
static std::string
kernel_name(const char *text)
{
	std::string name;
	int			depth = 0;

	for (const char *c = text; *c && !(*c == ',' && depth == 0); c++)
	{
		depth += *c == '<' ? 1 : *c == '>' ? -1 : 0;
		if (*c != ' ')
			name += *c;
	}
	return name;
}

void
emu::launch_cfg::run(const char *kernel, std::function<void()> body)
{
	std::string name = kernel_name(kernel);

	int			nthreads = (int) (block.x * block.y * block.z);
	std::vector<char> smem_bytes(smem + 16, (char) 0xa5);

	if (nthreads < 1 || nthreads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
		grid.y > 65535 || grid.z > 65535)
	{
		last_error = cudaErrorInvalidConfiguration;
		return;
	}
	if (smem > (smem_allowed.count(name) ? smem_allowed[name] : SMEM_DEFAULT))
	{
		last_error = cudaErrorInvalidValue;
		return;
	}
	/* a fault on demand: the first launch after $EMU_FAIL_ONCE names an existing file fails */
	if (sticky != cudaSuccess)
	{
		last_error = sticky;
		return;
	}
	if (getenv("EMU_FAIL_ONCE") && unlink(getenv("EMU_FAIL_ONCE")) == 0)
	{
		last_error = cudaErrorLaunchFailure;
		if (getenv("EMU_FAIL_STICKY"))
			sticky = cudaErrorLaunchFailure;
		return;
	}
	while (stacks.size() < (size_t) nthreads)
		stacks.push_back((char *) malloc(STACK_BYTES));
	fibers.resize(nthreads > (int) fibers.size() ? nthreads : fibers.size());
	dynamic_smem = smem_bytes.data();
	kernel_body = &body;
	block_dim = {block.x, block.y, block.z};
	grid_dim = {grid.x, grid.y, grid.z};
	for (unsigned z = 0; z < grid.z; z++)
		for (unsigned y = 0; y < grid.y; y++)
			for (unsigned x = 0; x < grid.x; x++)
			{
				block_idx = {x, y, z};
				block_serial++;
				run_block(nthreads);
			}
}

/* --- runtime: one device of 80 GB with 132 multiprocessors, everything synchronous --- */

/*
 * The most dynamic shared memory a kernel may opt in to: $EMU_SMEM_OPTIN bytes (99 KB for
 * sm_86 and sm_89, 163 KB for sm_80), else an H100's 227 KB.
 */
static int
smem_optin(void)
{
	const char *env = getenv("EMU_SMEM_OPTIN");

	return env ? atoi(env) : 227 * 1024;
}

cudaError_t
cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int)
{
	if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin)
		return cudaErrorInvalidValue;
	*value = smem_optin();
	return cudaSuccess;
}

/* cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes), as a GPU refuses it */
cudaError_t
emu_allow_dynamic_smem(const char *args, int bytes)
{
	if (bytes < 0 || bytes > smem_optin())
		return cudaErrorInvalidValue;
	smem_allowed[kernel_name(args)] = bytes;
	return cudaSuccess;
}

/* How many GPUs to pretend: $EMU_GPUS (0 to 16), else 1. They share the host's memory. */
static int
emulated_gpus(void)
{
	const char *env = getenv("EMU_GPUS");
	int			n = env ? atoi(env) : 1;

	return n >= 0 && n <= 16 ? n : 1;
}

cudaError_t
cudaGetDeviceCount(int *n)
{
	*n = emulated_gpus();
	return *n ? cudaSuccess : cudaErrorNoDevice;
}

static int	current_device;

cudaError_t
cudaSetDevice(int dev)
{
	if (dev < 0 || dev >= emulated_gpus())
		return cudaErrorInvalidValue;
	current_device = dev;
	return cudaSuccess;
}

int
emu_current_device(void)
{
	return current_device;
}

/* Is the current GPU the one $EMU_GPU_FULL names, whose memory is all taken? */
static bool
device_full(void)
{
	const char *env = getenv("EMU_GPU_FULL");

	return env && atoi(env) == current_device;
}

cudaError_t
cudaGetDeviceProperties(cudaDeviceProp *p, int dev)
{
	memset(p, 0, sizeof(*p));
	snprintf(p->name, sizeof(p->name), "emulated GPU %d", dev);
	p->major = 9;
	p->multiProcessorCount = 132;
	p->totalGlobalMem = (size_t) 80 << 30;
	return cudaSuccess;
}

cudaError_t
cudaMemGetInfo(size_t *free_b, size_t *total_b)
{
	*free_b = device_full() ? (size_t) 1 << 20 : (size_t) 79 << 30;
	*total_b = (size_t) 80 << 30;
	return cudaSuccess;
}

cudaError_t
cudaMalloc(void **p, size_t bytes)
{
	if (sticky != cudaSuccess)
		return last_error = sticky;
	if (bytes > ((size_t) 64 << 30) || (device_full() && bytes > ((size_t) 1 << 20)))
		return last_error = cudaErrorMemoryAllocation;
	if ((*p = emu_device_memory(bytes)) == NULL)
		return last_error = cudaErrorMemoryAllocation;
	memset(*p, 0x5a, bytes);
	return cudaSuccess;
}

cudaError_t
cudaFree(void *p)
{
	emu_device_release(p);
	return cudaSuccess;
}

cudaError_t
cudaHostAlloc(void **p, size_t bytes, unsigned)
{
	*p = malloc(bytes);
	return cudaSuccess;
}

cudaError_t
cudaFreeHost(void *p)
{
	free(p);
	return cudaSuccess;
}

cudaError_t
cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t)
{
	if (sticky != cudaSuccess)
		return sticky;
	memset(p, v, bytes);
	return cudaSuccess;
}

cudaError_t
cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind, cudaStream_t)
{
	if (sticky != cudaSuccess)
		return sticky;
	memmove(dst, src, bytes);
	return cudaSuccess;
}

cudaError_t
cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind)
{
	if (sticky != cudaSuccess)
		return sticky;
	memmove(dst, src, bytes);
	return cudaSuccess;
}

cudaError_t
cudaStreamSynchronize(cudaStream_t)
{
	return sticky;
}

cudaError_t
cudaStreamCreateWithFlags(cudaStream_t *s, unsigned)
{
	*s = (cudaStream_t) malloc(1);
	return cudaSuccess;
}

cudaError_t
cudaStreamDestroy(cudaStream_t s)
{
	/* the faulted backend is going: the next one gets a working context */
	sticky = cudaSuccess;
	free(s);
	return cudaSuccess;
}

/* An event: the host time of its last record (everything runs synchronously). */
struct emu_event
{
	double		t;
};

cudaError_t
cudaEventCreateWithFlags(cudaEvent_t *e, unsigned)
{
	*e = (cudaEvent_t) calloc(1, sizeof(emu_event));
	return cudaSuccess;
}

cudaError_t
cudaEventRecord(cudaEvent_t e, cudaStream_t)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	e->t = ts.tv_sec + ts.tv_nsec * 1e-9;
	return cudaSuccess;
}

cudaError_t
cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end)
{
	*ms = (float) ((end->t - start->t) * 1e3);
	return cudaSuccess;
}

cudaError_t
cudaEventSynchronize(cudaEvent_t)
{
	return cudaSuccess;
}

cudaError_t
cudaEventDestroy(cudaEvent_t e)
{
	free(e);
	return cudaSuccess;
}

cudaError_t
cudaGetLastError(void)
{
	cudaError_t e = last_error;

	last_error = cudaSuccess;
	return e != cudaSuccess ? e : sticky;
}

const char *
cudaGetErrorString(cudaError_t e)
{
	static char buf[32];

	snprintf(buf, sizeof(buf), "emulated error %d", (int) e);
	return buf;
}

/* --- cuBLAS --- */

/* Element i of a matrix of type t, as float. */
static float
element(const void *p, cudaDataType t, size_t i)
{
	return t == CUDA_R_32F ? ((const float *) p)[i] : __bfloat162float(((const __nv_bfloat16 *) p)[i]);
}

/* C = alpha op(A) op(B) + beta C, column-major, sums in double. */
static cublasStatus_t
gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const void *A,
	 cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb, float beta, float *C, int ldc)
{
	for (int j = 0; j < n; j++)
		for (int i = 0; i < m; i++)
		{
			double		s = 0;
			float	   *c = C + i + (size_t) j * ldc;

			for (int p = 0; p < k; p++)
				s += (double) element(A, at, ta == CUBLAS_OP_N ? i + (size_t) p * lda : p + (size_t) i * lda) *
					element(B, bt, tb == CUBLAS_OP_N ? p + (size_t) j * ldb : j + (size_t) p * ldb);
			*c = alpha * (float) s + (beta != 0 ? beta * *c : 0.0f);
		}
	return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t
cublasCreate(cublasHandle_t *h)
{
	*h = (cublasHandle_t) malloc(1);
	return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t
cublasDestroy(cublasHandle_t h)
{
	free(h);
	return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t
cublasSetStream(cublasHandle_t, cudaStream_t)
{
	return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t
cublasSetMathMode(cublasHandle_t, cublasMath_t)
{
	return CUBLAS_STATUS_SUCCESS;
}

const char *
cublasGetStatusString(cublasStatus_t)
{
	return "emulated cuBLAS error";
}

cublasStatus_t
cublasSgemm(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
			const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
			float *C, int ldc)
{
	return gemm(ta, tb, m, n, k, *alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, *beta, C, ldc);
}

cublasStatus_t
cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
			 const void *alpha, const void *A, cudaDataType at, int lda, const void *B,
			 cudaDataType bt, int ldb, const void *beta, void *C, cudaDataType ct, int ldc,
			 cublasComputeType_t, cublasGemmAlgo_t)
{
	if (ct != CUDA_R_32F || at != bt)
		return CUBLAS_STATUS_NOT_SUPPORTED;
	return gemm(ta, tb, m, n, k, *(const float *) alpha, A, at, lda, B, bt, ldb,
				*(const float *) beta, (float *) C, ldc);
}

/* Element size of a matrix type, for the strides of a batch. */
static size_t
type_size(cudaDataType t)
{
	return t == CUDA_R_32F ? 4 : 2;
}

cublasStatus_t
cublasSgemmStridedBatched(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
						  int k, const float *alpha, const float *A, int lda, long long sa,
						  const float *B, int ldb, long long sb, const float *beta, float *C,
						  int ldc, long long sc, int batch)
{
	for (int i = 0; i < batch; i++)
		gemm(ta, tb, m, n, k, *alpha, A + i * sa, CUDA_R_32F, lda, B + i * sb, CUDA_R_32F, ldb,
			 *beta, C + i * sc, ldc);
	return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t
cublasGemmStridedBatchedEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
						   int k, const void *alpha, const void *A, cudaDataType at, int lda,
						   long long sa, const void *B, cudaDataType bt, int ldb, long long sb,
						   const void *beta, void *C, cudaDataType ct, int ldc, long long sc,
						   int batch, cublasComputeType_t, cublasGemmAlgo_t)
{
	if (ct != CUDA_R_32F || at != bt)
		return CUBLAS_STATUS_NOT_SUPPORTED;
	for (int i = 0; i < batch; i++)
		gemm(ta, tb, m, n, k, *(const float *) alpha, (const char *) A + i * sa * type_size(at), at,
			 lda, (const char *) B + i * sb * type_size(bt), bt, ldb, *(const float *) beta,
			 (float *) C + i * sc, ldc);
	return CUBLAS_STATUS_SUCCESS;
}
