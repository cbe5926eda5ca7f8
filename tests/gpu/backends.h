/*
 * backends.h: the backends that the tests in tests/gpu check against the CPU backend,
 * created once and shared by every test of the run.
 */
#ifndef DOLLY_TESTS_GPU_BACKENDS_H
#define DOLLY_TESTS_GPU_BACKENDS_H

#include "../../src/engine/backend.h"

/* A backend under test and how the output names it. */
typedef struct test_backend
{
	const char *label;			/* "cuda:0/bf16", "cuda:0/fp32", "cuda:0/mixed" */
	dl_backend *be;
	int			bf16_products;	/* rounds the operands of matrix products to bfloat16 */
} test_backend;

/*
 * The CUDA backends on device $DOLLY_CUDA_DEVICE (default 0), one per dl_cuda_mode (bf16,
 * fp32, mixed), from
 * the plugin at $DOLLY_CUDA_PLUGIN (default ./dolly_cuda.so). Returns how many; with
 * none, *why says what was missing (no plugin, no GPU, a driver error).
 */
int			test_backends(const test_backend **out, const char **why);

/* The CPU backend that computes the references (2 threads). */
dl_backend *reference_backend(void);

#endif
