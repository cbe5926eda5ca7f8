/*
 * cuda_emu.cpp: the emulation behind cuda_emu.h.
 *
 * A launch keeps 2 to RESIDENT blocks in flight and switches between them each time
 * every thread of the running one has stopped, so that a block does not see another's
 * global memory writes in launch order; the threads of a block are fibers on one OS
 * thread (a stack each, switched by emu_swap below), each running until it reaches a
 * barrier or a warp shuffle. A barrier opens when every thread still running waits at
 * one; a shuffle completes when every lane its mask names waits at one with that mask,
 * and aborts when the mask leaves out the calling lane, names a lane that has exited or
 * does not exist, differs from the mask of a lane it names, or the lane read is outside
 * it (all undefined on a GPU). Anything else that leaves no thread runnable is a
 * deadlock and aborts. Device memory is host memory filled with 0x5a bytes, dynamic
 * shared memory with 0xa5, so that reads of what nothing wrote show up.
 */
#include "cuda_emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <algorithm>
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
		unsigned	mask;		/* a shuffle's lanes, */
		unsigned	value;		/* its operand, */
		int			lane_mask;	/* its xor, */
		unsigned	result;		/* and what the partner lane gave */
	};

	/*
	 * A block in flight: its threads, its dynamic shared memory, and its __shared__
	 * variables while another block runs (the variables themselves are static).
	 */
	struct block
	{
		uint3		idx;
		uint64_t	serial;
		std::vector<fiber> fibers;
		std::vector<char> smem;
		std::map<void *, std::vector<char>> saved;
	};

	/*
	 * Blocks in flight at once, as on a few multiprocessors: RESIDENT, or fewer when
	 * their threads pass FIBERS_IN_FLIGHT (each switch to a fiber touches a page of its
	 * stack; past about 2048 pages, the TLB's reach, the emulation slows down twofold),
	 * but 2 at least
	 */
	static const int RESIDENT = 4;
	static const int FIBERS_IN_FLIGHT = 2048;
	static std::vector<char *> stacks;	/* blocks in flight x threads of a block */
	static void *scheduler_sp;
	static fiber *current;
	static block *running;
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
	/*
	 * The running block's serial, the blocks started so far; every __shared__ variable
	 * by address: its size and the serial of the block whose contents it holds (it is
	 * poisoned at a block's first use); the block in flight whose variables they are
	 */
	static uint64_t block_serial,
				blocks_started;
	struct shared_var
	{
		size_t		size;
		uint64_t	owner;
	};
	static std::map<void *, shared_var> shared_vars;
	static block *holder;
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

/* Report a shuffle the hardware leaves undefined, and stop. */
static void
shuffle_fault(int lane, const char *what, unsigned mask)
{
	fprintf(stderr, "cuda_emu: shuffle in block (%u,%u,%u), thread %d: %s (mask 0x%08x)\n",
			block_idx.x, block_idx.y, block_idx.z, lane, what, mask);
	abort();
}

unsigned
emu::shuffle_xor(unsigned mask, unsigned v, int lane_mask)
{
	int			t = (int) (current - running->fibers.data());

	if (!(mask >> (t & 31) & 1))
		shuffle_fault(t, "its mask leaves out the calling lane", mask);
	current->mask = mask;
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

/*
 * Complete the shuffles of warp w whose lanes all wait at one; 1 if one did. Each lane
 * that waits names the lanes of its shuffle: each must exist, not have exited, and wait
 * with the same mask or still be on its way; the lane it reads must be one of them.
 */
static int
complete_shuffles(std::vector<fiber> &f, int w)
{
	int			lo = w * 32,
				n = (int) f.size() - lo < 32 ? (int) f.size() - lo : 32,
				progress = 0;
	unsigned	exists = n == 32 ? ~0u : (1u << n) - 1,
				waiting = 0,
				exited = 0,
				seen = 0;

	for (int l = 0; l < n; l++)
	{
		waiting |= (unsigned) (f[lo + l].st == AT_SHUFFLE) << l;
		exited |= (unsigned) (f[lo + l].st == EXITED) << l;
	}
	for (int i = 0; i < n; i++)
	{
		unsigned	mask = f[lo + i].mask;

		if (!(waiting >> i & 1) || (seen >> i & 1))
			continue;
		/* the lanes of this shuffle: each lane belongs to its own mask's */
		if (mask & (~exists | exited))
			shuffle_fault(lo + i, "its mask names a lane that has exited or does not exist", mask);
		for (int l = 0; l < 32; l++)
			if ((mask & waiting) >> l & 1 && f[lo + l].mask != mask)
				shuffle_fault(lo + i, "a lane its mask names shuffles with another mask", mask);
		seen |= mask;
		if ((mask & waiting) != mask)
			continue;
		for (int l = 0; l < 32; l++)
			if (mask >> l & 1)
			{
				int			src = l ^ f[lo + l].lane_mask;

				if (src > 31 || !(mask >> src & 1))
					shuffle_fault(lo + l, "it reads a lane outside its mask", mask);
				f[lo + l].result = f[lo + src].value;
			}
		for (int l = 0; l < 32; l++)
			if (mask >> l & 1)
				f[lo + l].st = RUNNABLE;
		progress = 1;
	}
	return progress;
}

/*
 * The order of a launch ($EMU_ORDER=reverse: blocks started last to first, threads run
 * last to first between barriers, so that a thread reading what another writes without
 * a barrier between them reads before the write in one of the two orders; $EMU_SEED=N:
 * blocks started and switched in an order drawn from N). Read at each launch.
 */
static bool reverse;
static uint64_t seed;

/* The next of a xorshift64 sequence (seed must not be 0). */
static uint64_t
next_random(void)
{
	seed ^= seed << 13;
	seed ^= seed >> 7;
	seed ^= seed << 17;
	return seed;
}

/*
 * Run the threads of block b until every one has stopped, then open what can open.
 * Returns 1 when all its threads have exited.
 */
static int
step_block(block &b)
{
	std::vector<fiber> &f = b.fibers;
	int			n = (int) f.size(),
				live = 0,
				at_barrier = 0,
				progress = 0;

	for (int k = 0; k < n; k++)
	{
		int			i = reverse ? n - 1 - k : k;

		if (f[i].st == RUNNABLE)
		{
			current = &f[i];
			emu_swap(&scheduler_sp, f[i].sp);
		}
	}
	for (int i = 0; i < n; i++)
	{
		live += f[i].st != EXITED;
		at_barrier += f[i].st == AT_BARRIER;
	}
	if (live == 0)
		return 1;
	for (int w = 0; w * 32 < n; w++)
		progress |= complete_shuffles(f, w);
	if (!progress && at_barrier == live)
	{
		for (int i = 0; i < n; i++)
			if (f[i].st == AT_BARRIER)
				f[i].st = RUNNABLE;
		progress = 1;
	}
	if (!progress)
	{
		for (int i = 0; i < n; i++)
			if (f[i].st == AT_SHUFFLE)
				shuffle_fault(i, "a lane its mask names waits at a barrier instead", f[i].mask);
		fprintf(stderr, "cuda_emu: deadlock in block (%u,%u,%u): %d threads live, %d at a barrier\n",
				block_idx.x, block_idx.y, block_idx.z, live, at_barrier);
		abort();
	}
	return 0;
}

/* Start block number id of the grid in b, its threads' stacks from slot's. */
static void
start_block(block &b, unsigned id, int slot, int nthreads, size_t smem)
{
	b.idx = {id % grid_dim.x, id / grid_dim.x % grid_dim.y, id / (grid_dim.x * grid_dim.y)};
	b.serial = ++blocks_started;
	if (holder == &b)
		holder = NULL;			/* what it held was its last block's */
	b.smem.assign(smem + 16, (char) 0xa5);
	b.saved.clear();
	b.fibers.resize(nthreads);
	for (int i = 0; i < nthreads; i++)
	{
		/* a first switch pops six zero registers and returns into fiber_main */
		uintptr_t	top = ((uintptr_t) stacks[slot * nthreads + i] + STACK_BYTES) & ~(uintptr_t) 15;
		void	  **sp = (void **) (top - 64);

		memset(sp, 0, 6 * sizeof(void *));
		sp[6] = (void *) fiber_main;
		b.fibers[i].sp = sp;
		b.fibers[i].idx = {(unsigned) i % block_dim.x, (unsigned) i / block_dim.x % block_dim.y,
		(unsigned) i / (block_dim.x * block_dim.y)};
		b.fibers[i].st = RUNNABLE;
	}
}

/*
 * Make b the running block: its index and shared memory; its __shared__ variables back
 * in place, those of the block that held them kept aside (only when another block held them).
 */
static void
switch_in(block &b)
{
	running = &b;
	block_idx = b.idx;
	block_serial = b.serial;
	dynamic_smem = b.smem.data();
	if (holder == &b)
		return;
	for (auto &v : shared_vars)
		if (holder && v.second.owner == holder->serial)
			holder->saved[v.first].assign((char *) v.first, (char *) v.first + v.second.size);
	for (auto &v : b.saved)
	{
		memcpy(v.first, v.second.data(), v.second.size());
		shared_vars[v.first].owner = b.serial;
	}
	holder = &b;
}

/* Run the grid: 2 to RESIDENT blocks in flight, the next started as one finishes. */
static void
run_grid(int nthreads, size_t smem)
{
	unsigned	nblocks = grid_dim.x * grid_dim.y * grid_dim.z,
				next = 0;
	std::vector<unsigned> order(nblocks);
	unsigned	resident = std::max(2, std::min(RESIDENT, FIBERS_IN_FLIGHT / nthreads));
	std::vector<block> slots(nblocks < resident ? nblocks : resident);
	std::vector<bool> busy(slots.size(), true);
	int			active = (int) slots.size(),
				s = -1;			/* round robin from the first */

	for (unsigned i = 0; i < nblocks; i++)
		order[i] = reverse ? nblocks - 1 - i : i;
	for (unsigned i = nblocks; seed && i > 1; i--)
		std::swap(order[i - 1], order[next_random() % i]);
	while (stacks.size() < slots.size() * nthreads)
		stacks.push_back((char *) malloc(STACK_BYTES));
	for (int k = 0; k < (int) slots.size(); k++)
		start_block(slots[k], order[next++], k, nthreads, smem);
	while (active > 0)
	{
		int			done;

		s = seed ? (int) (next_random() % slots.size()) : (s + 1) % (int) slots.size();
		if (!busy[s])
			continue;
		switch_in(slots[s]);
		done = step_block(slots[s]);
		if (done && next < nblocks)
			start_block(slots[s], order[next++], s, nthreads, smem);
		else if (done)
		{
			busy[s] = false;
			active--;
		}
	}
	holder = NULL;
}

void
emu::fresh_shared(void *p, size_t n)
{
	shared_var &v = shared_vars[p];

	v.size = n;
	if (v.owner != block_serial)
	{
		memset(p, 0xa5, n);
		v.owner = block_serial;
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

/*
 * Kernels launched so far, each cuBLAS call counted as one (a GPU runs at least one
 * kernel for it): what bench_cuda reads, by dlsym, as the launches a decode step makes.
 */
static unsigned long long launches;

extern "C" unsigned long long
emu_launches(void)
{
	return launches;
}

void
emu::launch_cfg::run(const char *kernel, std::function<void()> body)
{
	std::string name = kernel_name(kernel);

	int			nthreads = (int) (block.x * block.y * block.z);

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
	launches++;
	kernel_body = &body;
	block_dim = {block.x, block.y, block.z};
	grid_dim = {grid.x, grid.y, grid.z};
	reverse = getenv("EMU_ORDER") && strcmp(getenv("EMU_ORDER"), "reverse") == 0;
	seed = getenv("EMU_SEED") ? strtoull(getenv("EMU_SEED"), NULL, 10) : 0;
	run_grid(nthreads, smem);
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
	launches++;
	return gemm(ta, tb, m, n, k, *alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, *beta, C, ldc);
}

cublasStatus_t
cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
			 const void *alpha, const void *A, cudaDataType at, int lda, const void *B,
			 cudaDataType bt, int ldb, const void *beta, void *C, cudaDataType ct, int ldc,
			 cublasComputeType_t, cublasGemmAlgo_t)
{
	launches++;
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
	launches++;
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
	launches++;
	if (ct != CUDA_R_32F || at != bt)
		return CUBLAS_STATUS_NOT_SUPPORTED;
	for (int i = 0; i < batch; i++)
		gemm(ta, tb, m, n, k, *(const float *) alpha, (const char *) A + i * sa * type_size(at), at,
			 lda, (const char *) B + i * sb * type_size(bt), bt, ldb, *(const float *) beta,
			 (float *) C + i * sc, ldc);
	return CUBLAS_STATUS_SUCCESS;
}
