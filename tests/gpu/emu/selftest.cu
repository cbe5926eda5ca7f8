/*
 * selftest.cu: kernels broken on purpose, each of which a check of the emulation must
 * catch as a GPU would (or as compute-sanitizer would): a launch with more dynamic shared
 * memory than the kernel opted in to, an opt-in beyond the device's limit, a grid too
 * tall, a 16-byte load from an address that is not 16-byte aligned, a block reading
 * shared memory that only an earlier block wrote. Built and run by
 * `make emutest` before the operations' tests; prints one line a check and exits nonzero
 * when a broken kernel got through.
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

__global__ static void
writes_z(float *out)
{
	out[0] = (float) blockIdx.z;
}

static int	failures;

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

	/* a misaligned 16-byte load aborts the process (UBSan), in a child */
	fflush(stdout);
	{
		pid_t		pid = fork();
		int			status = 0;

		if (pid == 0)
		{
			/* the sanitizer's report is the proof; keep it off the test output */
			freopen("/dev/null", "w", stderr);
			loads_float4<<<1, 32>>>(out, in + 1);
			_exit(0);
		}
		waitpid(pid, &status, 0);
		expect(!(WIFEXITED(status) && WEXITSTATUS(status) == 0), "faults on a 16-byte load from an address 4 bytes off");
	}
	cudaFree(out);
	cudaFree(in);
	printf("emulator self-test: %d of its checks missed a broken kernel\n", failures);
	return failures != 0;
}
