/*
 * backend_cpu.c: the CPU backend, the reference implementation of backend.h: its life
 * (creation, the table of operations, destruction) and cpu_for_loops, which runs every
 * operation on its thread pool. The operations live in cpu_*.c, one family a file
 * (backend_cpu.h lists them).
 *
 * Device memory is host memory; weights, activations and the KV cache are float32, or
 * matrices and cache bfloat16 when asked. Matrix products with many rows go to OpenBLAS:
 * each pool thread multiplies its own slice of the weight's rows with a single-threaded
 * cblas_sgemm, so one set of threads does all the work and never competes with OpenBLAS's
 * own threads for the cores; those with a few rows (decode steps) to a kernel of our own
 * that streams the weights once. Everything else runs as ranges of rows, columns or
 * heads on the same pool.
 */
#include "backend_cpu.h"
#include "sysinfo.h"

#include <cblas.h>
#include <stdlib.h>

/* floats of work below which a task is not worth handing to another thread */
#define MIN_TASK_FLOATS 8192

/*
 * A few tasks per thread for balance, nor so many that a task has under MIN_TASK_FLOATS
 * (the few rows of a decode step take less time to do than to share out).
 */
int
cpu_row_tasks(dl_backend *be, size_t n, size_t per_row)
{
	size_t		t = (size_t) cpu_threads(be) * 4,
				by_size = (n * per_row + MIN_TASK_FLOATS - 1) / MIN_TASK_FLOATS;

	return (int) (by_size < t ? by_size : t);
}

/* One pass of the pool: the loops of an operation and its arguments. */
typedef struct cpu_pass
{
	const cpu_loop *loops;
	int			nloops;
	const void *ctx;
} cpu_pass;

/* Grains of a loop. */
static size_t
loop_grains(const cpu_loop *l)
{
	return (l->n + l->grain - 1) / l->grain;
}

/* Tasks of a loop: as asked, but never more than grains (a task with nothing to do). */
static int
loop_tasks(const cpu_loop *l)
{
	size_t		g = loop_grains(l);

	return l->ntasks <= 0 ? 0 : (size_t) l->ntasks < g ? l->ntasks : (int) g;
}

/*
 * Task `task` of a pass: its loop's range [lo, hi), the grains split into nearly equal
 * parts (task i of n gets grains [g i / n, g (i + 1) / n)).
 */
static void
pass_task(void *p, int task, int thread)
{
	const cpu_pass *a = p;
	const cpu_loop *l = a->loops;
	size_t		g,
				lo,
				hi;
	int			ntasks;

	while (task >= (ntasks = loop_tasks(l)))
	{
		task -= ntasks;
		l++;
	}
	g = loop_grains(l);
	lo = g * task / ntasks * l->grain;
	hi = g * (task + 1) / ntasks * l->grain;
	l->fn(a->ctx, lo, hi < l->n ? hi : l->n, thread);
}

void
cpu_for_loops(dl_backend *be, const void *ctx, const cpu_loop *loops, int nloops)
{
	cpu_pass	a = {loops, nloops, ctx};
	int			ntasks = 0;

	for (int i = 0; i < nloops; i++)
		ntasks += loop_tasks(&loops[i]);
	threadpool_run(cpu_of(be)->pool, pass_task, &a, ntasks);
}

/* Join the threads and free the backend. */
static void
cpu_destroy(dl_backend *be)
{
	cpu_backend *cb = cpu_of(be);

	threadpool_free(cb->pool);
	for (int i = 0; cb->widen && i < be->threads; i++)
		free(cb->widen[i]);
	free(cb->widen);
	free(cb);
}

dl_status
backend_cpu_create(int threads, int bf16, dl_backend **out, dl_error *err)
{
	cpu_backend *cb;
	dl_status	st;

	cb = calloc(1, sizeof(*cb));
	if (cb == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating the CPU backend");
	st = threadpool_create(threads, &cb->pool, err);
	if (st != DL_OK)
	{
		free(cb);
		return st;
	}
	cb->be.threads = threads;
	cb->bf16 = bf16;
	if (bf16)
	{
		int			ok = (cb->widen = calloc(threads, sizeof(float *))) != NULL;

		for (int i = 0; ok && i < threads; i++)
			ok = (cb->widen[i] = malloc(WIDEN_FLOATS * sizeof(float))) != NULL;
		if (!ok)
		{
			cpu_destroy(&cb->be);
			return dl_fail(err, DL_ENOMEM, "out of memory creating the CPU backend");
		}
	}
	/* the pool parallelises every product itself; OpenBLAS must not add threads */
	openblas_set_num_threads(1);
	sys_blas_tune();

	cb->be.name = "cpu";
	cb->be.weight_elem_size = bf16 ? sizeof(uint16_t) : sizeof(float);
	cb->be.kv_elem_size = bf16 ? sizeof(uint16_t) : sizeof(float);
	cb->be.alignment = CPU_ALIGN;
	cb->be.host_memory = 1;
	cb->be.alloc = cpu_alloc;
	cb->be.free = cpu_free;
	cb->be.zero = cpu_zero;
	cb->be.copy = cpu_copy;
	cb->be.upload = cpu_transfer;
	cb->be.download = cpu_transfer;
	cb->be.synchronize = cpu_synchronize;
	cb->be.upload_tensor = cpu_upload_tensor;
	cb->be.embedding_forward = cpu_embedding_forward;
	cb->be.gather_rows_forward = cpu_gather_rows_forward;
	cb->be.layernorm_forward = cpu_layernorm_forward;
	cb->be.matmul_forward = cpu_matmul_forward;
	cb->be.rotary_forward = cpu_rotary_forward;
	cb->be.attention_workspace = cpu_attention_workspace;
	cb->be.attention_forward = cpu_attention_forward;
	cb->be.gelu_forward = cpu_gelu_forward;
	cb->be.sample_forward = cpu_sample_forward;
	cb->be.sample_workspace = cpu_sample_workspace;
	cb->be.attention_train_forward = cpu_attention_train_forward;
	cb->be.attention_train_workspace = cpu_attention_train_workspace;
	cb->be.crossentropy_forward = cpu_crossentropy_forward;
	cb->be.embedding_backward = cpu_embedding_backward;
	cb->be.layernorm_backward = cpu_layernorm_backward;
	cb->be.matmul_backward = cpu_matmul_backward;
	cb->be.lora_forward = cpu_lora_forward;
	cb->be.lora_backward = cpu_lora_backward;
	cb->be.rotary_backward = cpu_rotary_backward;
	cb->be.attention_backward = cpu_attention_backward;
	cb->be.gelu_backward = cpu_gelu_backward;
	cb->be.sum_squares = cpu_sum_squares;
	cb->be.adamw_update = cpu_adamw_update;
	cb->be.sum_ranks = cpu_sum_ranks;
	cb->be.to_bf16 = cpu_to_bf16;
	cb->be.destroy = cpu_destroy;
	*out = &cb->be;
	return DL_OK;
}
