/*
 * threadpool.c: persistent worker threads for the CPU backend; see threadpool.h.
 *
 * The current job is one 64-bit word: its generation, its number of tasks and the next
 * task to hand out. Publishing a job is one store of that word; workers that are
 * spinning see it at once, sleeping ones are woken through the condition variable.
 * A task is claimed by a compare-and-swap on the word, so uneven tasks balance
 * themselves, and a claim can only succeed on the job that is current at that moment.
 *
 * The caller works too and then waits for the tasks to be finished, not for the workers
 * to check out: a worker that the scheduler has not run yet (the machine is busy, or
 * the worker went to sleep) costs nothing, the caller simply does more of the tasks.
 * That is safe because a worker reads the job's function and argument only after it has
 * claimed one of its tasks, and the caller cannot move on before that task is done.
 */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

/* How long an idle thread spins before sleeping: longer than the gap between two
 * operations of a forward pass, far shorter than the gap between requests. */
#define SPIN_NS 200000
/* Spins (a pause each) before a waiting thread starts to yield its core instead. */
#define PAUSE_SPINS 1024

/* The job word: generation (32 bits) | number of tasks (16) | next task (16). */
#define JOB_MAX_TASKS 0xFFFF
#define JOB_GEN(v) ((uint32_t) ((v) >> 32))
#define JOB_NTASKS(v) ((int) (((v) >> 16) & 0xFFFF))
#define JOB_NEXT(v) ((int) ((v) & 0xFFFF))

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
	pthread_cond_t done_cv;		/* a worker finished the last task of a job */
	_Atomic uint64_t job;
	atomic_int	done;			/* tasks of the current job finished */
	atomic_int	sleepers;		/* workers asleep on wake (or about to be) */
	atomic_int	stop;
	/* the current job: written before it is published, read after a claim */
	dl_task_fn	fn;
	void	   *arg;
	int			base;			/* index of its first task (long runs are several jobs) */
};

/* Monotonic time in nanoseconds. */
static long long
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/*
 * One step of a busy-wait: a pause at first; then the core is given up on each step,
 * so that on a busy machine a thread of ours that was preempted gets to run sooner.
 */
static inline void
spin_step(int spins)
{
	if (spins >= PAUSE_SPINS)
	{
		sched_yield();
		return;
	}
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

/* Whether a busy-wait that started (*deadline 0: now) has run past SPIN_NS. */
static int
spin_expired(int spins, long long *deadline)
{
	long long	t;

	if ((spins & 63) != 0)
		return 0;
	t = now_ns();
	if (*deadline == 0)
		*deadline = t + SPIN_NS;
	return t > *deadline;
}

/* Claim and run tasks of the current job until none are left. */
static void
run_tasks(dl_threadpool *pool, int thread)
{
	uint64_t	v = atomic_load_explicit(&pool->job, memory_order_acquire);

	while (JOB_NEXT(v) < JOB_NTASKS(v))
	{
		if (!atomic_compare_exchange_weak_explicit(&pool->job, &v, v + 1,
												   memory_order_acq_rel, memory_order_acquire))
			continue;			/* v was reloaded: someone else claimed, or a new job */
		/* the job cannot change until this task is done: fn, arg and base are its own */
		pool->fn(pool->arg, pool->base + JOB_NEXT(v), thread);
		if (atomic_fetch_add_explicit(&pool->done, 1, memory_order_acq_rel) + 1 == JOB_NTASKS(v) &&
			thread != 0)
		{
			/* the last task: the caller may be asleep waiting for it */
			pthread_mutex_lock(&pool->mu);
			pthread_cond_signal(&pool->done_cv);
			pthread_mutex_unlock(&pool->mu);
		}
		v = atomic_load_explicit(&pool->job, memory_order_acquire);
	}
}

/* Wait (spinning, then sleeping) until the generation differs from seen or stop is set. */
static uint32_t
wait_for_job(dl_threadpool *pool, uint32_t seen)
{
	long long	deadline = 0;
	uint32_t	g;

	for (int spins = 0;; spins++)
	{
		g = JOB_GEN(atomic_load_explicit(&pool->job, memory_order_acquire));
		if (g != seen || atomic_load(&pool->stop))
			return g;
		if (spin_expired(spins, &deadline))
			break;
		spin_step(spins);
	}
	pthread_mutex_lock(&pool->mu);
	/* seq_cst against the caller's publish-then-check: one of the two sees the other */
	atomic_fetch_add(&pool->sleepers, 1);
	while ((g = JOB_GEN(atomic_load(&pool->job))) == seen && !atomic_load(&pool->stop))
		pthread_cond_wait(&pool->wake, &pool->mu);
	atomic_fetch_sub(&pool->sleepers, 1);
	pthread_mutex_unlock(&pool->mu);
	return g;
}

/* Body of each worker thread. */
static void *
worker_main(void *p)
{
	worker	   *w = p;
	dl_threadpool *pool = w->pool;
	uint32_t	seen = 0;

	for (;;)
	{
		seen = wait_for_job(pool, seen);
		if (atomic_load(&pool->stop))
			break;
		run_tasks(pool, w->index);
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
	pthread_cond_init(&pool->done_cv, NULL);
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

/* Publish tasks [base, base + n) (n <= JOB_MAX_TASKS) as one job, work on it, wait. */
static void
run_job(dl_threadpool *pool, dl_task_fn fn, void *arg, int base, int n)
{
	uint64_t	gen = JOB_GEN(atomic_load_explicit(&pool->job, memory_order_relaxed)) + 1;
	long long	deadline = 0;

	pool->fn = fn;
	pool->arg = arg;
	pool->base = base;
	atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
	atomic_store(&pool->job, gen << 32 | (uint64_t) n << 16);
	if (atomic_load(&pool->sleepers) > 0)
	{
		pthread_mutex_lock(&pool->mu);
		pthread_cond_broadcast(&pool->wake);
		pthread_mutex_unlock(&pool->mu);
	}

	run_tasks(pool, 0);

	/* every task is claimed: wait for the ones still running on workers */
	for (int spins = 0; atomic_load_explicit(&pool->done, memory_order_acquire) < n; spins++)
	{
		if (spin_expired(spins, &deadline))
		{
			pthread_mutex_lock(&pool->mu);
			while (atomic_load_explicit(&pool->done, memory_order_acquire) < n)
				pthread_cond_wait(&pool->done_cv, &pool->mu);
			pthread_mutex_unlock(&pool->mu);
			break;
		}
		spin_step(spins);
	}
}

void
threadpool_run(dl_threadpool *pool, dl_task_fn fn, void *arg, int ntasks)
{
	/* one task, or no helpers: waking anybody would only cost time */
	if (ntasks <= 1 || pool->nthreads == 1)
	{
		for (int i = 0; i < ntasks; i++)
			fn(arg, i, 0);
		return;
	}
	for (int base = 0; base < ntasks; base += JOB_MAX_TASKS)
		run_job(pool, fn, arg, base, ntasks - base < JOB_MAX_TASKS ? ntasks - base : JOB_MAX_TASKS);
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
	pthread_cond_destroy(&pool->done_cv);
	free(pool->workers);
	free(pool);
}
