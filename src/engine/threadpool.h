/*
 * threadpool.h: a persistent pool of pthreads for the CPU backend's operations.
 *
 * threadpool_run(pool, fn, arg, n) calls fn(arg, i, thread) for every i in [0, n), spread
 * over the pool's threads and the caller, and returns when all are done; thread (0 for the
 * caller, up to size - 1) lets a task use per-thread scratch space. Workers spin briefly
 * between jobs (the operations of one forward pass come back to back) and then sleep,
 * so an idle pool costs nothing. The caller waits only for tasks that workers have
 * started: a worker that the scheduler keeps off a busy machine leaves its share to the
 * threads that run. Task functions are plain C: they never call back into
 * PostgreSQL or anything that may longjmp.
 */
#ifndef DOLLY_THREADPOOL_H
#define DOLLY_THREADPOOL_H

#include "error.h"

typedef struct dl_threadpool dl_threadpool;

typedef void (*dl_task_fn) (void *arg, int task, int thread);

/* Start a pool of `threads` threads in all, the caller included (1: no extra thread). */
dl_status	threadpool_create(int threads, dl_threadpool **out, dl_error *err);

/* Run fn(arg, i, thread) for i in [0, ntasks) and wait for all of them. */
void		threadpool_run(dl_threadpool *pool, dl_task_fn fn, void *arg, int ntasks);

/* Number of threads, the caller included. */
int			threadpool_size(const dl_threadpool *pool);

/* Stop and join the workers; NULL is accepted. */
void		threadpool_free(dl_threadpool *pool);

#endif
