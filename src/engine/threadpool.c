/*
 * threadpool.c: persistent worker threads for the CPU backend; see threadpool.h.
 *
 * A job is published by bumping `generation`; workers that are spinning see it at once,
 * sleeping ones are woken through the condition variable. Tasks are handed out with an
 * atomic counter, so uneven tasks balance themselves. The caller works too and then
 * waits until every worker has checked out of the job, so that the next job never meets
 * a worker still reading the previous one.
 */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

/* How long an idle thread spins before sleeping: longer than the gap between two
 * operations of a forward pass, far shorter than the gap between requests. */
#define SPIN_NS 200000

typedef struct worker
{
	struct dl_threadpool *pool;
	int			index;			/* 1 .. nthreads - 1; the caller is 0 */
	pthread_t	thread;
} worker;

struct dl_threadpool
{
	int			nthreads;		/* the caller included */
	worker	   *workers;		/* nthreads - 1 */
	pthread_mutex_t mu;
	pthread_cond_t wake;		/* a job was published, or stop */
	pthread_cond_t done;		/* the last worker checked out */
	atomic_uint generation;
	atomic_int	next;			/* next task to hand out */
	atomic_int	active;			/* workers that have not finished the current job */
	atomic_int	stop;
	dl_task_fn	fn;
	void	   *arg;
	int			ntasks;
};

/* Monotonic time in nanoseconds. */
static long long
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A polite busy-wait step. */
static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

/* Take tasks of the current job until none are left. */
static void
run_tasks(dl_threadpool *pool, int thread)
{
	for (;;)
	{
		int			i = atomic_fetch_add_explicit(&pool->next, 1, memory_order_relaxed);

		if (i >= pool->ntasks)
			break;
		pool->fn(pool->arg, i, thread);
	}
}

/* Wait (spinning, then sleeping) until generation differs from seen or stop is set. */
static unsigned
wait_for_job(dl_threadpool *pool, unsigned seen)
{
	long long	deadline = 0;
	unsigned	g;

	for (int spins = 0;; spins++)
	{
		g = atomic_load_explicit(&pool->generation, memory_order_acquire);
		if (g != seen || atomic_load(&pool->stop))
			return g;
		if ((spins & 255) == 0)
		{
			long long	t = now_ns();

			if (deadline == 0)
				deadline = t + SPIN_NS;
			else if (t > deadline)
				break;
		}
		cpu_relax();
	}
	pthread_mutex_lock(&pool->mu);
	while ((g = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen &&
		   !atomic_load(&pool->stop))
		pthread_cond_wait(&pool->wake, &pool->mu);
	pthread_mutex_unlock(&pool->mu);
	return g;
}

/* Body of each worker thread. */
static void *
worker_main(void *p)
{
	worker	   *w = p;
	dl_threadpool *pool = w->pool;
	unsigned	seen = 0;

	for (;;)
	{
		seen = wait_for_job(pool, seen);
		if (atomic_load(&pool->stop))
			break;
		run_tasks(pool, w->index);
		if (atomic_fetch_sub_explicit(&pool->active, 1, memory_order_acq_rel) == 1)
		{
			pthread_mutex_lock(&pool->mu);
			pthread_cond_signal(&pool->done);
			pthread_mutex_unlock(&pool->mu);
		}
	}
	return NULL;
}

dl_status
threadpool_create(int threads, dl_threadpool **out, dl_error *err)
{
	dl_threadpool *pool;

	if (threads < 1)
		return dl_fail(err, DL_EINVAL, "thread count %d is out of range", threads);
	pool = calloc(1, sizeof(*pool));
	if (pool == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating a thread pool");
	pool->nthreads = 1;
	pthread_mutex_init(&pool->mu, NULL);
	pthread_cond_init(&pool->wake, NULL);
	pthread_cond_init(&pool->done, NULL);
	pool->workers = calloc(threads, sizeof(worker));
	if (pool->workers == NULL)
	{
		threadpool_free(pool);
		return dl_fail(err, DL_ENOMEM, "out of memory creating a thread pool");
	}
	for (int i = 1; i < threads; i++)
	{
		pool->workers[i - 1].pool = pool;
		pool->workers[i - 1].index = i;
		if (pthread_create(&pool->workers[i - 1].thread, NULL, worker_main, &pool->workers[i - 1]) != 0)
		{
			threadpool_free(pool);
			return dl_fail(err, DL_ENOMEM, "cannot start compute thread %d of %d", i + 1, threads);
		}
		pool->nthreads++;
	}
	*out = pool;
	return DL_OK;
}

void
threadpool_run(dl_threadpool *pool, dl_task_fn fn, void *arg, int ntasks)
{
	long long	deadline = 0;

	/* one task, or no helpers: waking anybody would only cost time */
	if (ntasks <= 1 || pool->nthreads == 1)
	{
		for (int i = 0; i < ntasks; i++)
			fn(arg, i, 0);
		return;
	}
	pool->fn = fn;
	pool->arg = arg;
	pool->ntasks = ntasks;
	atomic_store_explicit(&pool->next, 0, memory_order_relaxed);
	atomic_store_explicit(&pool->active, pool->nthreads - 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
	pthread_mutex_lock(&pool->mu);
	pthread_cond_broadcast(&pool->wake);
	pthread_mutex_unlock(&pool->mu);

	run_tasks(pool, 0);

	for (int spins = 0; atomic_load_explicit(&pool->active, memory_order_acquire) > 0; spins++)
	{
		if ((spins & 255) == 0)
		{
			long long	t = now_ns();

			if (deadline == 0)
				deadline = t + SPIN_NS;
			else if (t > deadline)
			{
				pthread_mutex_lock(&pool->mu);
				while (atomic_load_explicit(&pool->active, memory_order_acquire) > 0)
					pthread_cond_wait(&pool->done, &pool->mu);
				pthread_mutex_unlock(&pool->mu);
				break;
			}
		}
		cpu_relax();
	}
}

int
threadpool_size(const dl_threadpool *pool)
{
	return pool->nthreads;
}

void
threadpool_free(dl_threadpool *pool)
{
	if (pool == NULL)
		return;
	pthread_mutex_lock(&pool->mu);
	atomic_store(&pool->stop, 1);
	pthread_cond_broadcast(&pool->wake);
	pthread_mutex_unlock(&pool->mu);
	for (int i = 0; i < pool->nthreads - 1; i++)
		pthread_join(pool->workers[i].thread, NULL);
	pthread_mutex_destroy(&pool->mu);
	pthread_cond_destroy(&pool->wake);
	pthread_cond_destroy(&pool->done);
	free(pool->workers);
	free(pool);
}
