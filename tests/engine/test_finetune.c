/*
 * test_finetune.c: the epoch loop (finetune_run) on a fixture model and a handful of
 * records: the loss goes down, the step count and progress reports are right, a stop
 * from the callback cancels, and 2 or 4 ranks in threads, at ZeRO stages 0, 1 and 2, train
 * the same model as one rank. The trainer's arithmetic itself is tested in test_train.c,
 * the sums over ranks in test_collective.c.
 */
#include "harness.h"
#include "lora.h"
#include "train.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
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
	dl_lora    *lora;			/* the adapter that trains; NULL: the model does */
} setup;

/*
 * Load neox-par-f32 (its tables already have rows for Dolly's tokens) and the examples;
 * with lora, a fresh adapter of it (seeded alike everywhere) to train.
 */
static dl_status
setup_open(setup *s, const dl_lora_config *lora, dl_error *err)
{
	char		dir[1024],
				tok[1100];
	dl_status	st;

	/* not fixture_path, whose one static buffer ranks in threads would share */
	snprintf(dir, sizeof(dir), "%s/neox-par-f32", fixture_dir());
	snprintf(tok, sizeof(tok), "%s/tokenizer.json", dir);
	memset(s, 0, sizeof(*s));
	st = backend_cpu_create(1, 0, &s->be, err);
	if (st == DL_OK)
		st = dl_model_load(dir, s->be, &s->m, err);
	if (st == DL_OK)
		st = tok_load(tok, &s->tok, err);
	if (st == DL_OK)
		st = model_add_dolly_tokens(&s->m, s->tok, err);
	for (int i = 0; i < NREC && st == DL_OK; i++)
		st = example_from_record(s->tok, records[i][0], records[i][1], records[i][2],
								 s->m->cfg.max_pos, &s->ex[i], err);
	if (st == DL_OK && lora)
		st = dl_lora_create(s->m, lora, 5, &s->lora, err);
	return st;
}

/* Free what setup_open made. */
static void
setup_close(setup *s)
{
	for (int i = 0; i < NREC; i++)
		example_free(&s->ex[i]);
	tok_free(s->tok);
	dl_lora_free(s->lora);
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

	CHECK_OK(setup_open(&s, NULL, &err), &err);
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

	CHECK_OK(setup_open(&s, NULL, &err), &err);
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

	CHECK_OK(setup_open(&s, NULL, &err), &err);
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

	CHECK_OK(setup_open(&s, NULL, &err), &err);
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

/*
 * Ranks in threads of one process: a group over a staging area in plain memory, with a
 * small chunk so that a step takes many rounds and slices end mid-round.
 */
#define MAX_RANKS 4
#define TEST_CHUNK (64 * MAX_RANKS)

typedef struct ranks
{
	pthread_barrier_t barrier;
	void	   *stage;
	int			nranks;
	int			stage_zero;		/* the ZeRO stage */
	int			bf16;
	int			batch_size;
	int			max_tokens;
	int			epochs;
	float	   *peer[MAX_RANKS];	/* with peer_n: gradient buffers every rank reads */
	size_t		peer_n;
	const dl_lora_config *lora;	/* the ranks train an adapter of this; NULL: the model */
} ranks;

/* One rank's thread: its own backend and model, its share of every batch. */
typedef struct rank_arg
{
	ranks	   *shared;
	int			rank;
	setup		s;
	dl_train_progress last;
	dl_status	st;
	dl_error	err;
} rank_arg;

static int
thread_barrier(void *arg)
{
	pthread_barrier_wait(arg);
	return 0;
}

/* Thread body of one rank. */
static void *
rank_main(void *p)
{
	rank_arg   *a = p;
	ranks	   *sh = a->shared;
	dl_finetune_opts o = test_opts(sh->epochs, sh->batch_size);
	dl_group	g = {
		.rank = a->rank, .nranks = sh->nranks, .stage = sh->stage, .chunk = TEST_CHUNK,
		.bf16 = sh->bf16, .barrier = thread_barrier, .barrier_arg = &sh->barrier,
		.peers = sh->peer_n ? sh->peer : NULL, .peer_n = sh->peer_n,
	};

	o.cfg.eps = 1e-3f;
	o.cfg.max_tokens = sh->max_tokens;
	o.rank = a->rank;
	o.nranks = sh->nranks;
	o.group = &g;
	o.zero_stage = sh->stage_zero;
	a->st = setup_open(&a->s, sh->lora, &a->err);
	o.lora = a->s.lora;
	if (a->st == DL_OK)
		a->st = finetune_run(a->s.m, a->s.ex, 4, a->s.ex + 4, 1, &o, &a->last, &a->err);
	group_release(&g);
	return NULL;
}

/* Largest |x - y| over what two setups trained (their models', or adapters', with the same map). */
static double
param_diff(const setup *sa, const setup *sb)
{
	dl_trained	a = sa->lora ? dl_lora_trained(sa->lora) : dl_model_trained(sa->m),
				b = sb->lora ? dl_lora_trained(sb->lora) : dl_model_trained(sb->m);
	size_t		n = a.bytes / sizeof(float);
	float	   *x = malloc(a.bytes),
			   *y = malloc(b.bytes);
	double		d = INFINITY;

	if (x && y && a.bytes == b.bytes &&
		sa->be->download(sa->be, x, a.mem, a.bytes, NULL) == DL_OK &&
		sb->be->download(sb->be, y, b.mem, b.bytes, NULL) == DL_OK)
	{
		d = 0;
		/* only the tensors: alignment padding between them is never written */
		for (int i = 0; i < a.nmap; i++)
		{
			const dl_tensor_map *e = &a.map[i];
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

/* Train with sh's ranks, each in a thread; a[r] keeps rank r's model for comparison. */
static dl_status
train_ranks(ranks *sh, rank_arg *a, dl_error *err)
{
	pthread_t	th[MAX_RANKS];

	sh->stage = calloc(1, group_stage_bytes(sh->nranks, TEST_CHUNK));
	if (sh->stage == NULL)
		return dl_fail(err, DL_ENOMEM, "no staging area");
	pthread_barrier_init(&sh->barrier, NULL, sh->nranks);
	for (int r = 0; r < sh->nranks; r++)
	{
		memset(&a[r], 0, sizeof(a[r]));
		a[r].shared = sh;
		a[r].rank = r;
		if (pthread_create(&th[r], NULL, rank_main, &a[r]) != 0)
			abort();
	}
	for (int r = 0; r < sh->nranks; r++)
		pthread_join(th[r], NULL);
	pthread_barrier_destroy(&sh->barrier);
	free(sh->stage);
	for (int r = 0; r < sh->nranks; r++)
		if (a[r].st != DL_OK)
		{
			*err = a[r].err;
			return a[r].st;
		}
	return DL_OK;
}

static void
close_ranks(ranks *sh, rank_arg *a)
{
	for (int r = 0; r < sh->nranks; r++)
		setup_close(&a[r].s);
}

/* The longest example's tokens: as max_tokens, every example is a micro-batch alone. */
static int
longest_example(const setup *s)
{
	int			longest = 0;

	for (int i = 0; i < NREC; i++)
		longest = s->ex[i].n > longest ? s->ex[i].n : longest;
	return longest;
}

/*
 * 1, 2 and 4 ranks at ZeRO stages 0, 1 and 2 on the same batches of two examples, one
 * example per micro-batch (with 4 ranks, two ranks have none and run empty ones): the
 * ranks of a run end bit-identical; with as many ranks, the stages give bit-identical
 * parameters (the gradients are summed in rank order, element by element, whichever
 * rank sums them; the norm slice by slice in rank order at every stage). Against one
 * rank only the order of float additions differs (a rank's sum is added to the other's
 * instead of token by token), so parameters agree to float rounding carried through
 * four AdamW steps: 1e-6 against weights of about 0.25. AdamW's eps is raised to 1e-3 for
 * this: the key bias's gradient is zero in exact arithmetic (a softmax ignores a shift of
 * all its scores), so what both runs see there is rounding noise, which eps 1e-8 would
 * turn into steps of +-lr; real gradients (1e-3 and up here) still train.
 */
TEST(finetune_ranks_and_zero_stages_match_one_rank)
{
	setup		one;
	dl_error	err;
	dl_finetune_opts o = test_opts(2, 2);
	dl_train_progress last;
	int			longest;
	double		d;

	CHECK_OK(setup_open(&one, NULL, &err), &err);
	longest = longest_example(&one);
	/* no two examples fit together: one per micro-batch, as each rank has */
	for (int i = 0; i < NREC; i++)
		CHECK(2 * one.ex[i].n > longest);
	o.cfg.max_tokens = longest;
	o.cfg.eps = 1e-3f;
	CHECK_OK(finetune_run(one.m, one.ex, 4, one.ex + 4, 1, &o, &last, &err), &err);

	for (int nranks = 2; nranks <= MAX_RANKS; nranks *= 2)
	{
		rank_arg	a[3][MAX_RANKS];
		size_t		grads = one.m->param_bytes;

		for (int stage = 0; stage <= 2; stage++)
		{
			ranks		sh = {.nranks = nranks, .stage_zero = stage, .batch_size = 2,
			.max_tokens = longest, .epochs = 2};

			CHECK_OK(train_ranks(&sh, a[stage], &err), &err);
			for (int r = 0; r < nranks; r++)
				CHECKF(a[stage][r].last.step == 4 && a[stage][r].last.train_loss == a[stage][0].last.train_loss &&
					   a[stage][r].last.eval_loss == a[stage][0].last.eval_loss,
					   "%d ranks, stage %d: rank %d's progress differs", nranks, stage, r);
			CHECKF(fabs(a[stage][0].last.train_loss - last.train_loss) < 1e-5 * last.train_loss &&
				   fabs(a[stage][0].last.eval_loss - last.eval_loss) < 1e-5 * last.eval_loss,
				   "losses: %d ranks at stage %d %g / %g, one rank %g / %g", nranks, stage,
				   a[stage][0].last.train_loss, a[stage][0].last.eval_loss, last.train_loss, last.eval_loss);
			for (int r = 1; r < nranks; r++)
				CHECKF((d = param_diff(&a[stage][0].s, &a[stage][r].s)) == 0,
					   "%d ranks, stage %d: ranks 0 and %d differ by %g", nranks, stage, r, d);
			CHECKF((d = param_diff(&a[stage][0].s, &one)) < 1e-6,
				   "%d ranks at stage %d and one rank differ by %g", nranks, stage, d);
			if (stage > 0)
				CHECKF((d = param_diff(&a[stage][0].s, &a[0][0].s)) == 0,
					   "%d ranks: stage %d and stage 0 differ by %g", nranks, stage, d);
		}
		/* the optimizer state: a 1/nranks slice of AdamW's moments from stage 1 on */
		CHECKF(a[1][0].last.state_bytes - grads <= (a[0][0].last.state_bytes - grads) / nranks + 2 * sizeof(float) &&
			   a[1][0].last.state_bytes - grads >= (a[0][0].last.state_bytes - grads) / nranks,
			   "%d ranks: AdamW state %zu bytes at stage 1, %zu at stage 0", nranks,
			   a[1][0].last.state_bytes - grads, a[0][0].last.state_bytes - grads);
		for (int stage = 0; stage <= 2; stage++)
		{
			ranks		sh = {.nranks = nranks};

			close_ranks(&sh, a[stage]);
		}
	}
	setup_close(&one);
}

/*
 * An uneven split of tokens: batches of three examples over two ranks, one example per
 * micro-batch, so rank 0 runs two micro-batches a step and rank 1 one (and an empty one
 * at stage 2). Stages 0 and 1 stay bit-identical; stage 2 sums each micro-batch over the
 * ranks as it goes, rank 0's two gradients reaching the sum separately ((a + c) + b
 * where stage 0 adds (a + b) + c), a float rounding apart: 1e-6 as above. bfloat16
 * communication rounds every staged gradient to 8 bits of mantissa: the ranks still
 * agree bit for bit, and the parameters stay within 1e-4 of float32's after four steps
 * of lr 3e-3 (AdamW normalises the gradients, so their rounding moves each step by a
 * fraction of lr at most). Summing straight from the peers' gradient buffers gives the
 * staged sums bit for bit.
 */
TEST(finetune_zero_stages_uneven_split_and_bf16)
{
	rank_arg	a[6][MAX_RANKS];
	dl_error	err;
	int			longest;
	double		d;
	setup		probe;

	CHECK_OK(setup_open(&probe, NULL, &err), &err);
	longest = longest_example(&probe);
	/* runs 4 and 5: stages 0 and 1 summing straight from each other's gradient buffers */
	for (int run = 0; run < 6; run++)
	{
		ranks		sh = {.nranks = 2, .stage_zero = run < 3 ? run : run == 3 ? 2 : run - 4,
		.bf16 = run == 3, .batch_size = 3, .max_tokens = longest, .epochs = 2,
		.peer_n = run >= 4 ? probe.m->param_bytes / sizeof(float) : 0};

		for (int r = 0; r < 2 && sh.peer_n; r++)
			CHECK((sh.peer[r] = malloc(probe.m->param_bytes)) != NULL);
		CHECK_OK(train_ranks(&sh, a[run], &err), &err);
		for (int r = 0; r < 2 && sh.peer_n; r++)
			free(sh.peer[r]);
		CHECKF((d = param_diff(&a[run][0].s, &a[run][1].s)) == 0, "run %d: the ranks differ by %g", run, d);
	}
	CHECKF((d = param_diff(&a[1][0].s, &a[0][0].s)) == 0, "stage 1 and stage 0 differ by %g", d);
	CHECKF((d = param_diff(&a[2][0].s, &a[0][0].s)) < 1e-6, "stage 2 and stage 0 differ by %g", d);
	CHECKF((d = param_diff(&a[3][0].s, &a[2][0].s)) < 1e-4 && d > 0,
		   "bfloat16 communication moves the parameters by %g", d);
	CHECKF((d = param_diff(&a[4][0].s, &a[0][0].s)) == 0, "stage 0 from peers differs by %g", d);
	CHECKF((d = param_diff(&a[5][0].s, &a[0][0].s)) == 0, "stage 1 from peers differs by %g", d);
	setup_close(&probe);
	for (int run = 0; run < 6; run++)
	{
		ranks		sh = {.nranks = 2};

		close_ranks(&sh, a[run]);
	}
}

/*
 * An adapter (every linear module of GPT-NeoX, rank 4, and the rows of Dolly's tokens, so
 * that the head's and the embedding's spans hold some of it too) trained by 2 and 4 ranks
 * at ZeRO stages 0, 1 and 2: the ranks' adapters end bit-identical, the stages too, and within
 * float rounding of one rank's (as above); the model itself does not move.
 */
TEST(finetune_lora_ranks_and_zero_stages_match_one_rank)
{
	dl_lora_config lc = {.r = 4, .alpha = 8.0f, .dropout = 0.0f, .ntargets = 4,
	.targets = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}, .tok0 = 512, .ntok = 3};
	setup		one,
				frozen;			/* the model and a fresh adapter, untrained */
	dl_error	err;
	dl_finetune_opts o = test_opts(2, 2);
	dl_train_progress last;
	double		d;

	CHECK_OK(setup_open(&one, &lc, &err), &err);
	CHECK_OK(setup_open(&frozen, &lc, &err), &err);
	o.cfg.max_tokens = longest_example(&one);
	o.cfg.eps = 1e-3f;
	o.lora = one.lora;
	CHECK_OK(finetune_run(one.m, one.ex, 4, one.ex + 4, 1, &o, &last, &err), &err);
	/* the adapter trained; the base is as loaded (compare the models, not the adapters) */
	CHECKF((d = param_diff(&one, &frozen)) > 1e-4, "the adapter moved by %g only", d);
	{
		dl_lora    *adapters[2] = {one.lora, frozen.lora};

		one.lora = frozen.lora = NULL;
		d = param_diff(&one, &frozen);
		one.lora = adapters[0];
		frozen.lora = adapters[1];
		CHECKF(d == 0, "LoRA training moved the base by %g", d);
	}
	for (int nranks = 2; nranks <= MAX_RANKS; nranks *= 2)
	{
		rank_arg	a[3][MAX_RANKS];

		for (int stage = 0; stage <= 2; stage++)
		{
			ranks		sh = {.nranks = nranks, .stage_zero = stage, .batch_size = 2,
			.max_tokens = o.cfg.max_tokens, .epochs = 2, .lora = &lc};

			CHECK_OK(train_ranks(&sh, a[stage], &err), &err);
			for (int r = 1; r < nranks; r++)
				CHECKF((d = param_diff(&a[stage][0].s, &a[stage][r].s)) == 0,
					   "LoRA, %d ranks, stage %d: ranks 0 and %d differ by %g", nranks, stage, r, d);
			CHECKF((d = param_diff(&a[stage][0].s, &one)) < 1e-6,
				   "LoRA, %d ranks at stage %d and one rank differ by %g", nranks, stage, d);
			if (stage > 0)
				CHECKF((d = param_diff(&a[stage][0].s, &a[0][0].s)) == 0,
					   "LoRA, %d ranks: stage %d and stage 0 differ by %g", nranks, stage, d);
		}
		for (int stage = 0; stage <= 2; stage++)
		{
			ranks		sh = {.nranks = nranks};

			close_ranks(&sh, a[stage]);
		}
	}
	setup_close(&one);
	setup_close(&frozen);
}
