/*
 * test_finetune.c: the epoch loop (finetune_run) on a fixture model and a handful of
 * records: the loss goes down, the step count and progress reports are right, a stop
 * from the callback cancels, and two ranks with a summing all-reduce train the same
 * model as one rank. The trainer's arithmetic itself is tested in test_train.c.
 */
#include "harness.h"
#include "train.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static const char *const records[][3] = {
	{"Say hello.", NULL, "hello"},
	{"Add 2 and 3.", NULL, "5"},
	{"Repeat the word.", "apple", "apple apple"},
	{"Name a colour.", NULL, "blue"},
	{"Reverse the letters.", "abc", "cba"},
};
#define NREC 5

/* A fixture model with its tokenizer on a one-thread CPU backend, and the records' examples. */
typedef struct setup
{
	dl_backend *be;
	dl_model   *m;
	dl_tokenizer *tok;
	dl_example	ex[NREC];
} setup;

/* Load neox-par-f32 (its tables already have rows for Dolly's tokens) and the examples. */
static dl_status
setup_open(setup *s, dl_error *err)
{
	dl_status	st;

	memset(s, 0, sizeof(*s));
	st = backend_cpu_create(1, 0, &s->be, err);
	if (st == DL_OK)
		st = dl_model_load(fixture_path("neox-par-f32"), s->be, &s->m, err);
	if (st == DL_OK)
		st = tok_load(fixture_path("neox-par-f32/tokenizer.json"), &s->tok, err);
	if (st == DL_OK)
		st = model_add_dolly_tokens(&s->m, s->tok, err);
	for (int i = 0; i < NREC && st == DL_OK; i++)
		st = example_from_record(s->tok, records[i][0], records[i][1], records[i][2],
								 s->m->cfg.max_pos, &s->ex[i], err);
	return st;
}

/* Free what setup_open made. */
static void
setup_close(setup *s)
{
	for (int i = 0; i < NREC; i++)
		example_free(&s->ex[i]);
	tok_free(s->tok);
	dl_model_free(s->m);
	if (s->be)
		s->be->destroy(s->be);
}

/* Options for the tests: Dolly's optimiser with a rate a tiny model learns from fast. */
static dl_finetune_opts
test_opts(int epochs, int batch_size)
{
	dl_finetune_opts o;

	memset(&o, 0, sizeof(o));
	train_defaults(&o.cfg);
	o.cfg.lr = 3e-3f;
	o.cfg.warmup_steps = 0;
	o.epochs = epochs;
	o.batch_size = batch_size;
	o.nranks = 1;
	o.seed = 42;
	return o;
}

/* Every progress report of a run, and when to ask for a stop. */
typedef struct progress_log
{
	int			n;
	dl_train_progress p[64];
	int			stop_at;		/* stop after this many reports; 0 never */
} progress_log;

/* Progress callback: keep the report, stop when asked. */
static int
log_progress(void *arg, const dl_train_progress *p)
{
	progress_log *log = arg;

	if (log->n < 64)
		log->p[log->n] = *p;
	log->n++;
	return log->stop_at > 0 && log->n >= log->stop_at;
}

TEST(finetune_loss_decreases)
{
	setup		s;
	dl_error	err;
	dl_finetune_opts o = test_opts(8, 2);
	progress_log log = {0};
	dl_train_progress last;
	double		first_eval = NAN;
	int			train_reports = 0;

	CHECK_OK(setup_open(&s, &err), &err);
	o.progress = log_progress;
	o.progress_arg = &log;
	/* evaluate on the training records themselves: memorising them must show */
	CHECK_OK(finetune_run(s.m, s.ex, NREC, s.ex, NREC, &o, &last, &err), &err);
	/* 5 records in batches of 2: 3 steps an epoch, an evaluation at each epoch's end */
	CHECKF(log.n == 8 * 4, "%d reports", log.n);
	for (int i = 0; i < log.n; i++)
	{
		const dl_train_progress *p = &log.p[i];

		CHECK(p->total_steps == 24 && p->epoch == i / 4 + 1);
		if (strcmp(p->phase, "training") == 0)
		{
			CHECK(p->step == ++train_reports && isfinite(p->train_loss) && p->tokens_per_second > 0);
			CHECK(isfinite(p->grad_norm) && p->lr > 0);
		}
		else
		{
			CHECK(strcmp(p->phase, "evaluating") == 0 && i % 4 == 3 && isfinite(p->eval_loss));
			if (isnan(first_eval))
				first_eval = p->eval_loss;
		}
	}
	CHECK(train_reports == 24 && last.step == 24 && strcmp(last.phase, "evaluating") == 0);
	CHECKF(last.eval_loss < 0.5 * first_eval, "eval loss %g after the first epoch, %g at the end",
		   first_eval, last.eval_loss);
	setup_close(&s);
}

TEST(finetune_eval_every_and_no_eval_set)
{
	setup		s;
	dl_error	err;
	dl_finetune_opts o = test_opts(2, 2);
	progress_log log = {0};
	dl_train_progress last;
	int			evals = 0;

	CHECK_OK(setup_open(&s, &err), &err);
	o.progress = log_progress;
	o.progress_arg = &log;
	/* 3 records in batches of 2: 2 steps an epoch, 4 in all */
	o.eval_every = 3;
	CHECK_OK(finetune_run(s.m, s.ex, 3, s.ex + 3, 2, &o, &last, &err), &err);
	for (int i = 0; i < log.n; i++)
		evals += strcmp(log.p[i].phase, "evaluating") == 0;
	/* after step 2 (epoch end), 3 (every 3rd) and 4 (epoch end) */
	CHECKF(last.step == 4 && evals == 3 && log.n == 7, "%d steps, %d evaluations", last.step, evals);
	/* an evaluation due at an epoch's end is not repeated */
	o.eval_every = 2;
	log.n = 0;
	evals = 0;
	CHECK_OK(finetune_run(s.m, s.ex, 3, s.ex + 3, 2, &o, &last, &err), &err);
	for (int i = 0; i < log.n; i++)
		evals += strcmp(log.p[i].phase, "evaluating") == 0;
	CHECKF(evals == 2 && log.n == 6, "%d evaluations", evals);
	/* without an evaluation set the loss stays NaN and only steps report */
	log.n = 0;
	CHECK_OK(finetune_run(s.m, s.ex, 3, NULL, 0, &o, &last, &err), &err);
	CHECK(log.n == 4 && isnan(last.eval_loss) && strcmp(last.phase, "training") == 0);
	setup_close(&s);
}

TEST(finetune_cancels_from_the_callback)
{
	setup		s;
	dl_error	err;
	dl_finetune_opts o = test_opts(3, 1);
	progress_log log = {.stop_at = 2};
	dl_train_progress last;

	CHECK_OK(setup_open(&s, &err), &err);
	o.progress = log_progress;
	o.progress_arg = &log;
	CHECK(finetune_run(s.m, s.ex, NREC, NULL, 0, &o, &last, &err) == DL_ECANCELLED);
	CHECKF(strstr(err.msg, "cancel") != NULL, "%s", err.msg);
	CHECK(log.n == 2 && last.step == 2 && last.total_steps == 15);
	setup_close(&s);
}

TEST(finetune_rejects_bad_input)
{
	setup		s;
	dl_error	err;
	dl_finetune_opts o = test_opts(1, 2);
	dl_train_progress last;
	int32_t		saved;

	CHECK_OK(setup_open(&s, &err), &err);
	saved = s.ex[1].ids[0];
	s.ex[1].ids[0] = s.m->cfg.vocab_size;
	CHECK(finetune_run(s.m, s.ex, NREC, NULL, 0, &o, &last, &err) == DL_EINVAL);
	CHECKF(strstr(err.msg, "example 1") != NULL, "%s", err.msg);
	s.ex[1].ids[0] = saved;
	o.nranks = 2;
	CHECK(finetune_run(s.m, s.ex, NREC, NULL, 0, &o, &last, &err) == DL_EINVAL);
	o.nranks = 1;
	o.batch_size = 0;
	CHECK(finetune_run(s.m, s.ex, NREC, NULL, 0, &o, &last, &err) == DL_EINVAL);
	setup_close(&s);
}

/* Two ranks in two threads of one process, summing through shared memory. */
typedef struct ranks
{
	pthread_barrier_t barrier;
	float	   *grads[2];
	double		loss[2];
	int64_t		labels[2];
} ranks;

/* One rank's thread: its own backend and model, its half of every batch. */
typedef struct rank_arg
{
	ranks	   *shared;
	int			rank;
	int			max_tokens;
	setup		s;
	dl_train_progress last;
	dl_status	st;
	dl_error	err;
} rank_arg;

/* The all-reduce: both post, both sum in rank order into scratch, then both copy back. */
static dl_status
sum_ranks(void *arg, float *grads, size_t n, double *loss_sum, int64_t *n_labels, dl_error *err)
{
	ranks	   *r = ((rank_arg *) arg)->shared;
	int			me = ((rank_arg *) arg)->rank;
	float	   *sum = malloc((n ? n : 1) * sizeof(float));
	double		loss;
	int64_t		labels;

	if (sum == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory in the test all-reduce");
	r->grads[me] = grads;
	r->loss[me] = *loss_sum;
	r->labels[me] = *n_labels;
	pthread_barrier_wait(&r->barrier);
	for (size_t i = 0; i < n; i++)
		sum[i] = r->grads[0][i] + r->grads[1][i];
	loss = r->loss[0] + r->loss[1];
	labels = r->labels[0] + r->labels[1];
	pthread_barrier_wait(&r->barrier);
	memcpy(grads, sum, n * sizeof(float));
	*loss_sum = loss;
	*n_labels = labels;
	free(sum);
	return DL_OK;
}

/* Thread body of one rank. */
static void *
rank_main(void *p)
{
	rank_arg   *a = p;
	dl_finetune_opts o = test_opts(2, 2);

	o.cfg.eps = 1e-3f;
	a->st = setup_open(&a->s, &a->err);
	if (a->st != DL_OK)
		return NULL;
	o.rank = a->rank;
	o.nranks = 2;
	o.allreduce = sum_ranks;
	o.allreduce_arg = a;
	o.cfg.max_tokens = a->max_tokens;
	a->st = finetune_run(a->s.m, a->s.ex, 4, a->s.ex + 4, 1, &o, &a->last, &a->err);
	return NULL;
}

/* Largest |x - y| over the parameters of two models with the same map. */
static double
param_diff(const dl_model *a, const dl_model *b)
{
	size_t		n = a->param_bytes / sizeof(float);
	float	   *x = malloc(a->param_bytes),
			   *y = malloc(b->param_bytes);
	double		d = INFINITY;

	if (x && y && a->param_bytes == b->param_bytes &&
		a->be->download(a->be, x, a->param_mem, a->param_bytes, NULL) == DL_OK &&
		b->be->download(b->be, y, b->param_mem, b->param_bytes, NULL) == DL_OK)
	{
		d = 0;
		/* only the tensors: alignment padding between them is never written */
		for (int i = 0; i < a->nmap; i++)
		{
			const dl_tensor_map *e = &a->map[i];
			size_t		k = e->offset / sizeof(float),
						end = k + (size_t) e->shape[0] * (e->ndim == 2 ? e->shape[1] : 1);

			for (; k < end && k < n; k++)
				d = fmax(d, fabs((double) x[k] - y[k]));
		}
	}
	free(x);
	free(y);
	return d;
}

/*
 * One rank and two ranks on the same batches of two examples: each rank takes one
 * example, and the one rank gets max_tokens of one example, so both accumulate the
 * same per-example gradients; only the order of float additions differs (a rank's sum
 * is added to the other's instead of token by token), so parameters agree to float
 * rounding carried through four AdamW steps: 1e-6 against weights of about 0.25.
 * AdamW's eps is raised to 1e-3 for this: the key bias's gradient is zero in exact
 * arithmetic (a softmax ignores a shift of all its scores), so what both runs see there
 * is rounding noise, which eps 1e-8 would turn into steps of +-lr; real gradients
 * (1e-3 and up here) still train.
 */
TEST(finetune_two_ranks_match_one)
{
	ranks		shared;
	rank_arg	a[2];
	pthread_t	th[2];
	setup		one;
	dl_error	err;
	dl_finetune_opts o = test_opts(2, 2);
	dl_train_progress last;
	int			longest = 0;
	double		d;

	CHECK_OK(setup_open(&one, &err), &err);
	for (int i = 0; i < NREC; i++)
		longest = one.ex[i].n > longest ? one.ex[i].n : longest;
	/* no two examples fit together: one per micro-batch, as each rank has */
	for (int i = 0; i < NREC; i++)
		CHECK(2 * one.ex[i].n > longest);
	o.cfg.max_tokens = longest;
	o.cfg.eps = 1e-3f;
	CHECK_OK(finetune_run(one.m, one.ex, 4, one.ex + 4, 1, &o, &last, &err), &err);

	memset(&shared, 0, sizeof(shared));
	pthread_barrier_init(&shared.barrier, NULL, 2);
	for (int r = 0; r < 2; r++)
	{
		memset(&a[r], 0, sizeof(a[r]));
		a[r].shared = &shared;
		a[r].rank = r;
		a[r].max_tokens = longest;
		CHECK(pthread_create(&th[r], NULL, rank_main, &a[r]) == 0);
	}
	for (int r = 0; r < 2; r++)
		pthread_join(th[r], NULL);
	pthread_barrier_destroy(&shared.barrier);
	for (int r = 0; r < 2; r++)
		CHECK_OK(a[r].st, &a[r].err);

	CHECK(a[0].last.step == 4 && a[1].last.step == 4 && last.step == 4);
	CHECK(a[0].last.train_loss == a[1].last.train_loss && a[0].last.eval_loss == a[1].last.eval_loss);
	CHECKF(fabs(a[0].last.train_loss - last.train_loss) < 1e-5 * last.train_loss &&
		   fabs(a[0].last.eval_loss - last.eval_loss) < 1e-5 * last.eval_loss,
		   "losses: two ranks %g / %g, one rank %g / %g", a[0].last.train_loss,
		   a[0].last.eval_loss, last.train_loss, last.eval_loss);
	/* the ranks stay bit-identical; against one rank, rounding only */
	CHECKF((d = param_diff(a[0].s.m, a[1].s.m)) == 0, "ranks differ by %g", d);
	CHECKF((d = param_diff(a[0].s.m, one.m)) < 1e-6, "two ranks and one differ by %g", d);
	for (int r = 0; r < 2; r++)
		setup_close(&a[r].s);
	setup_close(&one);
}
