/*
 * selftest.cu: kernels broken on purpose, each of which a check of the emulation must
 * catch as a GPU would (or as compute-sanitizer would): a launch with more dynamic shared
 * memory than the kernel opted in to, an opt-in beyond the device's limit, a grid too
 * tall, a 16-byte load from an address that is not 16-byte aligned, a block reading
 * shared memory that only an earlier block wrote, blocks taking another block's global
 * memory writes as done, shuffles whose masks are wrong; and that EMU_SEED changes the
 * order the blocks start in. Built and run by `make emutest` before the operations'
 * tests; prints one line a check and exits nonzero when a broken kernel got through.
 */
#include <cuda_runtime.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

__global__ static void
uses_smem(float *out)
{
	extern __shared__ float buf[];

	buf[threadIdx.x] = (float) threadIdx.x;
	__syncthreads();
	out[threadIdx.x] = buf[31 - threadIdx.x];
}

__global__ static void
loads_float4(float *out, const float *in)
{
	float4		v = *(const float4 *) in;	/* in is 4 bytes past an aligned address */

	out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

/* Block 1 reads what only block 0 wrote: a GPU's block 1 has its own shared memory. */
__global__ static void
stale_shared(float *out)
{
	__shared__ float carry[1];

	if (blockIdx.x == 0 && threadIdx.x == 0)
		carry[0] = 42.0f;
	__syncthreads();
	if (threadIdx.x == 0)
		out[blockIdx.x] = carry[0];
}

/*
 * Block 1 reads, before its barrier, what block 0 writes after its own: with one block
 * after the other it always finds it, on a GPU only if block 0 happened to get there first.
 */
__global__ static void
reads_late_write(float *out)
{
	if (blockIdx.x == 1 && threadIdx.x == 0)
		out[1] = out[0];
	__syncthreads();
	if (blockIdx.x == 0 && threadIdx.x == 0)
		out[0] = 42.0f;
}

/* The last block takes the first block's write as done: nothing orders the blocks of a launch. */
__global__ static void
reads_first_block(float *out)
{
	if (blockIdx.x == 0 && threadIdx.x == 0)
		out[0] = 42.0f;
	if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0)
		out[1] = out[0];
}

/* Each block notes its place in the order the blocks started in. */
__global__ static void
notes_start(float *out)
{
	if (threadIdx.x == 0)
		out[1 + blockIdx.x] = atomicAdd(&out[0], 1.0f);
}

/*
 * A warp's shuffles by kind: 0 to 4 are undefined on a GPU (a mask without the calling
 * lane; half the warp naming the other half, which uses another mask; lanes named that
 * exit; lanes named that wait at a barrier; a read across the two halves' masks), 5 is
 * two half-warps each shuffling among its own lanes.
 */
__global__ static void
shuffles(float *out, int kind)
{
	unsigned	lane = threadIdx.x & 31,
				half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
	float		v = (float) lane;

	if (kind == 0)
		v = __shfl_xor_sync(0xfffffffeu, v, 1);
	if (kind == 1)
		v = __shfl_xor_sync(lane < 16 ? 0xffffffffu : half, v, 1);
	if (kind == 2 && lane < 16)
		v = __shfl_xor_sync(0xffffffffu, v, 1);
	if (kind == 3)
	{
		if (lane < 16)
			v = __shfl_xor_sync(0xffffffffu, v, 1);
		__syncthreads();
	}
	if (kind == 4)
		v = __shfl_xor_sync(half, v, 16);
	if (kind == 5)
		v = __shfl_xor_sync(half, v, 1);
	out[threadIdx.x] = v;
}

__global__ static void
writes_z(float *out)
{
	out[0] = (float) blockIdx.z;
}

static int	failures;

/* Whether launch(out, in, kind) stops the process, as a check of the emulation aborts it; in a child. */
static int
stops(void (*launch) (float *, float *, int), float *out, float *in, int kind)
{
	pid_t		pid;
	int			status = 0;

	fflush(stdout);
	if ((pid = fork()) == 0)
	{
		/* the check's report is the proof; keep it off the test output */
		freopen("/dev/null", "w", stderr);
		launch(out, in, kind);
		_exit(0);
	}
	waitpid(pid, &status, 0);
	return !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* One check: ok when the emulation did what a GPU does. */
static void
expect(int caught, const char *what)
{
	printf("  emulator %-70s %s\n", what, caught ? "ok" : "MISSED");
	failures += !caught;
}

int
main(void)
{
	float	   *out,
			   *in;

	cudaMalloc((void **) &out, 64 * sizeof(float));
	cudaMalloc((void **) &in, 64 * sizeof(float));

	/* shared memory: 64 KB without an opt-in, then with one, then an opt-in too large */
	uses_smem<<<1, 32, 64 * 1024>>>(out);
	expect(cudaGetLastError() == cudaErrorInvalidValue, "refuses a launch over 48 KB of shared memory without an opt-in");
	expect(cudaFuncSetAttribute(uses_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess,
		   "allows an opt-in to 64 KB");
	uses_smem<<<1, 32, 64 * 1024>>>(out);
	expect(cudaGetLastError() == cudaSuccess, "then runs the launch");
	uses_smem<<<1, 32, 80 * 1024>>>(out);
	expect(cudaGetLastError() == cudaErrorInvalidValue, "refuses a launch over the kernel's own opt-in");
	setenv("EMU_SMEM_OPTIN", "101376", 1);
	expect(cudaFuncSetAttribute(uses_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 128 * 1024) ==
		   cudaErrorInvalidValue, "refuses an opt-in to 128 KB on a 99 KB device (sm_86, sm_89)");
	unsetenv("EMU_SMEM_OPTIN");

	/* shared memory does not outlive its block */
	{
		float		got[2];

		stale_shared<<<2, 32>>>(out);
		cudaMemcpy(got, out, sizeof(got), cudaMemcpyDeviceToHost);
		expect(got[0] == 42.0f && got[1] != 42.0f, "starts each block with poisoned shared memory");
	}

	/* a grid of 65,536 in z */
	writes_z<<<dim3(1, 1, 65536), 32>>>(out);
	expect(cudaGetLastError() == cudaErrorInvalidConfiguration, "refuses a grid of 65,536 blocks in z");

	/* blocks in flight together, and started in either order */
	{
		float		got[2];

		cudaMemsetAsync(out, 0, 2 * sizeof(float), 0);
		reads_late_write<<<2, 32>>>(out);
		cudaMemcpy(got, out, sizeof(got), cudaMemcpyDeviceToHost);
		expect(got[0] == 42.0f && got[1] != 42.0f, "runs blocks interleaved, so one reads another's write before it");
		setenv("EMU_ORDER", "reverse", 1);
		cudaMemsetAsync(out, 0, 2 * sizeof(float), 0);
		reads_first_block<<<2, 32>>>(out);
		cudaMemcpy(got, out, sizeof(got), cudaMemcpyDeviceToHost);
		expect(got[0] == 42.0f && got[1] != 42.0f, "starts the last block first with EMU_ORDER=reverse");
		unsetenv("EMU_ORDER");
	}
	{
		float		got[33];
		int			in_order[2] = {1, 1};

		for (int seeded = 0; seeded < 2; seeded++)
		{
			if (seeded)
				setenv("EMU_SEED", "7", 1);
			cudaMemsetAsync(out, 0, sizeof(got), 0);
			notes_start<<<32, 32>>>(out);
			cudaMemcpy(got, out, sizeof(got), cudaMemcpyDeviceToHost);
			for (int b = 0; b < 32; b++)
				in_order[seeded] &= got[1 + b] == (float) b;
		}
		unsetenv("EMU_SEED");
		expect(in_order[0] && !in_order[1], "starts blocks in launch order, and in another with EMU_SEED");
	}

	/* shuffles: the allowed one gives the partner's value, the undefined ones stop the run */
	{
		static const char *what[] = {
			"stops a shuffle whose mask leaves out the calling lane",
			"stops a shuffle whose lanes name each other with different masks",
			"stops a shuffle whose mask names lanes that exit instead",
			"stops a shuffle whose mask names lanes that wait at a barrier instead",
			"stops a shuffle that reads a lane outside its mask",
		};
		float		got[32];
		int			right = 1;

		shuffles<<<1, 32>>>(out, 5);
		cudaMemcpy(got, out, sizeof(got), cudaMemcpyDeviceToHost);
		for (int l = 0; l < 32; l++)
			right &= got[l] == (float) (l ^ 1);
		expect(right, "shuffles within each half of a warp, with the halves' masks");
		for (int kind = 0; kind < 5; kind++)
			expect(stops([](float *o, float *, int k) { shuffles<<<1, 32>>>(o, k); }, out, in, kind),
				   what[kind]);
	}

	/* a misaligned 16-byte load aborts the process (UBSan) */
	expect(stops([](float *o, float *i, int) { loads_float4<<<1, 32>>>(o, i + 1); }, out, in, 0),
		   "faults on a 16-byte load from an address 4 bytes off");
	cudaFree(out);
	cudaFree(in);
	printf("emulator self-test: %d of its checks missed a broken kernel\n", failures);
	return failures != 0;
}
