/*
 * jobs.h: fine-tuning jobs: their live state in shared memory, shared by the session that
 * submits a job (jobs.c) and the worker that runs it (job_worker.c).
 */
#ifndef DOLLY_JOBS_H
#define DOLLY_JOBS_H

#include "postgres.h"

#include "storage/spin.h"

#include "error.h"

#define DOLLY_MAX_JOBS 8			/* jobs running at once, server-wide */

typedef struct DollyJobSlot
{
	int64		job_id;			/* 0: free */
	Oid			dboid;
	Oid			role;			/* who submitted it: who may see its progress */
	pid_t		pid;			/* the worker, once started */
	bool		cancel;			/* dolly_cancel_job asked it to stop */
	char		phase[64];
	int			epoch;
	int			step;
	int			total_steps;
	double		train_loss;
	double		eval_loss;
	double		tokens_per_second;
	int			records;
	int			skipped;
} DollyJobSlot;

typedef struct DollyJobs
{
	slock_t		mutex;
	DollyJobSlot slots[DOLLY_MAX_JOBS];
} DollyJobs;

extern DollyJobs *dolly_jobs;

extern Size dolly_jobs_shmem_size(void);
extern void dolly_jobs_shmem_init(void);

/* The worker's entry point (job_worker.c); main_arg is the job id. */
PGDLLEXPORT void dolly_job_main(Datum main_arg);

/* Data parallelism (job_ranks.c). */
#define DOLLY_MAX_RANKS 16
typedef struct DollyDP DollyDP;
struct dl_example;
struct dl_finetune_opts;
struct dl_train_progress;
struct dl_model;

/*
 * Rank 0: put the examples (eval first), options and the adapter's configuration (lora:
 * NULL when the whole model trains) in a new segment, and CPU ranks' gradient buffers
 * (trained_bytes each) in another, where the stage keeps all gradients; start ranks
 * 1..n-1.
 */
struct dl_lora_config;
extern DollyDP *dolly_dp_start(int nranks, const struct dl_example *ex, int ntrain, int neval,
							   const char *base_path, const struct dl_finetune_opts *opts,
							   const struct dl_lora_config *lora, Size trained_bytes,
							   int64 job_id);
/* Train as `rank` of the group (finetune_run with the group's all-reduce). */
extern dl_status dolly_dp_train(DollyDP *d, int rank, struct dl_model *m,
								const struct dl_example *ex, int ntrain, int neval,
								struct dl_finetune_opts *o, struct dl_train_progress *last,
								dl_error *err);
/* Make every rank stop at its next barrier (error NULL: a stop, not a failure). */
extern void dolly_dp_abort(DollyDP *d, const char *error);
/*
 * What rank `rank` of nranks trains from: GPU `rank` (mod the GPUs: ranks may share one)
 * in mixed mode when dolly.device asks for the GPU, else a CPU backend with its share
 * (1/nranks) of dolly.threads; the base model's tokenizer and weights, with Dolly's
 * special tokens added; or, with lora, the base as it is (it must have them) and a fresh
 * adapter of it in *adapter, from seed (every rank starts from the same). The load shows
 * its progress as activity and stops when stop(arg) says so (see dolly_open_model).
 */
struct dl_backend;
struct dl_pipeline;
struct dl_lora;
extern dl_status dolly_job_load_base(const char *base_path, int rank, int nranks,
									 const struct dl_lora_config *lora, uint64 seed,
									 const char *activity, bool (*stop) (void *arg), void *arg,
									 struct dl_backend **be, struct dl_pipeline **base,
									 struct dl_lora **adapter, dl_error *err);
/*
 * The ZeRO stage nranks ranks training m on be run: `wanted` (0, 1, 2) if >= 0, else the
 * smallest whose gradients and AdamW state fit each rank's share of the memory left (the
 * host's for CPU ranks, which all share it; the GPU's free memory for the ranks on a GPU), or 2
 * when none does. Logs the choice with the figures behind it.
 */
extern int	dolly_dp_choose_stage(const struct dl_model *m, const struct dl_lora *lora,
								  const struct dl_backend *be, int nranks, int wanted, int64 job_id);
/* Ranks 1..n-1 start here. */
PGDLLEXPORT void dolly_job_rank_main(Datum main_arg);

/*
 * Fill w for a fine-tuning worker of job_id: a database connection as the current role
 * (their OIDs first in bgw_extra, the caller's own arguments after them), never restarted,
 * entering `function` of dolly.so.
 */
struct BackgroundWorker;
extern void dolly_job_worker_init(struct BackgroundWorker *w, int64 job_id, const char *function);

#endif
