/*
 * profile.cu: where a backend's GPU time goes, when $DOLLY_CUDA_PROFILE is set (for the
 * benchmarks; nothing is timed otherwise). Each compute operation is bracketed by two
 * events on the stream, without synchronising, so the timing barely moves what it times;
 * the elapsed times are summed per operation whenever the events run out and when the
 * backend is destroyed, which prints one line per operation on stderr: calls,
 * milliseconds, share of the timed total.
 */
#include <stdio.h>
#include <stdlib.h>

#include "common.cuh"

#define PROF_EVENTS 4096		/* operations timed before their events are summed */

/* The operations, in CUDA_COMPUTE_OPS order. */
enum
{
#define OP_ENUM(op) PROF_##op,
	CUDA_COMPUTE_OPS(OP_ENUM)
#undef OP_ENUM
	PROF_OPS
};

static const char *const prof_names[PROF_OPS] = {
#define OP_NAME(op) #op,
	CUDA_COMPUTE_OPS(OP_NAME)
#undef OP_NAME
};

struct cuda_profile
{
	cudaEvent_t start[PROF_EVENTS];
	cudaEvent_t end[PROF_EVENTS];
	int			op[PROF_EVENTS];	/* what event pair i timed */
	int			n;				/* pairs recorded since the last sum */
	double		ms[PROF_OPS];
	long		calls[PROF_OPS];
};

/* Add the recorded pairs' times to their operations (waits for the last of them). */
static void
prof_drain(cuda_profile *p)
{
	if (p->n > 0 && cudaEventSynchronize(p->end[p->n - 1]) == cudaSuccess)
		for (int i = 0; i < p->n; i++)
		{
			float		ms = 0;

			if (cudaEventElapsedTime(&ms, p->start[i], p->end[i]) == cudaSuccess)
				p->ms[p->op[i]] += ms;
		}
	cudaGetLastError();
	p->n = 0;
}

/* Operation F (entry point of backend.h's table) timed as operation OP. */
template <int OP, auto F> struct timed;

template <int OP, typename... A, void (*F)(dl_backend *, A...)>
struct timed<OP, F>
{
	static void
	call(dl_backend *be, A... args)
	{
		cuda_profile *p = cuda_of(be)->prof;
		cudaStream_t stream = cuda_of(be)->stream;

		if (p->n == PROF_EVENTS)
			prof_drain(p);
		cudaEventRecord(p->start[p->n], stream);
		F(be, args...);
		cudaEventRecord(p->end[p->n], stream);
		p->op[p->n++] = OP;
		p->calls[OP]++;
	}
};

dl_status
cuda_profile_install(cuda_backend *cb, dl_error *err)
{
	const char *env = getenv("DOLLY_CUDA_PROFILE");
	cuda_profile *p;

	if (env == NULL || env[0] == '\0' || env[0] == '0')
		return DL_OK;
	if ((p = (cuda_profile *) calloc(1, sizeof(*p))) == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory for the CUDA profile");
	cb->prof = p;
	for (int i = 0; i < PROF_EVENTS; i++)
	{
		CUDA_TRY(cudaEventCreateWithFlags(&p->start[i], cudaEventDefault), err);
		CUDA_TRY(cudaEventCreateWithFlags(&p->end[i], cudaEventDefault), err);
	}
#define OP_TIMED(op) cb->be.op = timed<PROF_##op, cuda_##op>::call;
	CUDA_COMPUTE_OPS(OP_TIMED)
#undef OP_TIMED
	return DL_OK;
}

void
cuda_profile_report(cuda_backend *cb)
{
	cuda_profile *p = cb->prof;
	double		total = 0;
	int			order[PROF_OPS];

	if (p == NULL)
		return;
	prof_drain(p);
	for (int i = 0; i < PROF_OPS; i++)
	{
		total += p->ms[i];
		order[i] = i;
	}
	/* the most expensive first */
	for (int i = 1; i < PROF_OPS; i++)
		for (int j = i; j > 0 && p->ms[order[j]] > p->ms[order[j - 1]]; j--)
		{
			int			t = order[j];

			order[j] = order[j - 1];
			order[j - 1] = t;
		}
	fprintf(stderr, "CUDA profile of %s (DOLLY_CUDA_PROFILE): %.1f ms in timed operations\n",
			cb->name, total);
	for (int k = 0; k < PROF_OPS; k++)
	{
		int			i = order[k];

		if (p->calls[i] > 0)
			fprintf(stderr, "  %-24s %8ld calls %12.2f ms %6.1f%%\n", prof_names[i], p->calls[i],
					p->ms[i], total > 0 ? 100.0 * p->ms[i] / total : 0.0);
	}
	for (int i = 0; i < PROF_EVENTS; i++)
	{
		if (p->start[i])
			cudaEventDestroy(p->start[i]);
		if (p->end[i])
			cudaEventDestroy(p->end[i]);
	}
	free(p);
	cb->prof = NULL;
}
