/*
 * finetune.c: the epoch loop of fine-tuning (train.h's finetune_run), shared by the job
 * worker and dolly-cli: shuffle, batches split over ranks and into micro-batches that
 * fit the trainer's activations, the sums over ranks between the parts of a step,
 * evaluation, progress and cancellation. The arithmetic is the trainer's (train.c).
 */
#include "sampler.h"
#include "sysinfo.h"
#include "train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* What one run carries from step to step. */
typedef struct run
{
	dl_trainer *tr;
	dl_backend *be;
	const dl_finetune_opts *o;
	dl_train_config cfg;
	dl_example *mine;			/* this rank's share of the current batch (shallow copies) */
	dl_example *eval_mine;		/* this rank's share of the evaluation set */
	int			neval_mine;
	dl_train_progress p;
	double		train_s;		/* seconds spent in training steps */
	double		tokens;			/* training tokens of all ranks so far */
} run;

/* Check that an example can be trained on: labels exist and every id has a row. */
static dl_status
check_example(const dl_example *ex, const char *set, int i, int vocab, dl_error *err)
{
	if (ex->ids == NULL || ex->n < 2 || ex->first_label < 1 || ex->first_label >= ex->n)
		return dl_fail(err, DL_EINVAL, "%s example %d has %d tokens and labels from %d: nothing to predict",
					   set, i, ex->n, ex->first_label);
	for (int t = 0; t < ex->n; t++)
		if (ex->ids[t] < 0 || ex->ids[t] >= vocab)
		{
			dl_fail(err, DL_EINVAL, "%s example %d has token id %d, outside the model's %d rows",
					set, i, ex->ids[t], vocab);
			return dl_hint(err, "Tokenize with the model's own tokenizer, after model_add_dolly_tokens.");
		}
	return DL_OK;
}

/* Descending order of ints, for qsort. */
static int
by_size_desc(const void *a, const void *b)
{
	return *(const int *) b - *(const int *) a;
}

/*
 * Size the trainer: max_length is the longest example given, and max_tokens is kept
 * between that (a micro-batch holds at least one example) and the most tokens a rank's
 * share of a batch can hold (the k longest examples), beyond which it buys nothing.
 */
static dl_status
size_config(dl_train_config *cfg, const dl_example *train, int ntrain,
			const dl_example *eval, int neval, int per_rank, dl_error *err)
{
	int		   *len = malloc(sizeof(int) * ntrain);
	int			longest = 0;
	long long	most = 0;

	if (len == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory sizing the trainer");
	for (int i = 0; i < neval; i++)
		longest = eval[i].n > longest ? eval[i].n : longest;
	for (int i = 0; i < ntrain; i++)
		len[i] = train[i].n;
	qsort(len, ntrain, sizeof(int), by_size_desc);
	longest = len[0] > longest ? len[0] : longest;
	for (int i = 0; i < per_rank && i < ntrain; i++)
		most += len[i];
	free(len);
	cfg->max_length = longest;
	if (cfg->max_tokens > most)
		cfg->max_tokens = (int) most;
	if (cfg->max_tokens < longest)
		cfg->max_tokens = longest;
	return DL_OK;
}

/* The examples of the micro-batch at ex[i]: consecutive ones whose tokens fit max_tokens. */
static int
micro_batch_at(const run *r, const dl_example *ex, int n, int i)
{
	int			k = 1,
				tokens = ex[i].n;

	while (i + k < n && tokens + ex[i + k].n <= r->cfg.max_tokens)
		tokens += ex[i + k++].n;
	return k;
}

/* How many micro-batches n examples take. */
static int
micro_batch_count(const run *r, const dl_example *ex, int n)
{
	int			count = 0;

	for (int i = 0; i < n; i += micro_batch_at(r, ex, n, i))
		count++;
	return count;
}

/*
 * Run n examples through trainer_backward (backward) or trainer_eval in micro-batches,
 * then empty ones up to at_least (ZeRO stage 2 sums every micro-batch over the ranks:
 * each rank runs as many as the busiest); sums the losses and label counts.
 */
static dl_status
micro_batches(run *r, const dl_example *ex, int n, int backward, int at_least, double *loss_sum,
			  int64_t *n_labels, dl_error *err)
{
	int			done = 0;

	*loss_sum = 0;
	*n_labels = 0;
	for (int i = 0; i < n || done < at_least; done++)
	{
		int			k = i < n ? micro_batch_at(r, ex, n, i) : 0;
		double		loss = 0;
		int64_t		labels = 0;
		dl_status	st;

		if (backward && i + k >= n && done + 1 >= at_least)
			trainer_last_micro_batch(r->tr);
		st = backward ? trainer_backward(r->tr, ex + i, k, &loss, &labels, err)
			: trainer_eval(r->tr, ex + i, k, &loss, &labels, err);
		if (st != DL_OK)
			return st;
		*loss_sum += loss;
		*n_labels += labels;
		i += k;
	}
	return DL_OK;
}

/* Report progress; a stop request from the callback becomes DL_ECANCELLED. */
static dl_status
report(run *r, const char *phase, dl_train_progress *last, dl_error *err)
{
	r->p.phase = phase;
	r->p.tokens_per_second = r->train_s > 0 ? r->tokens / r->train_s : 0;
	*last = r->p;
	if (r->o->progress && r->o->progress(r->o->progress_arg, &r->p))
		return dl_fail(err, DL_ECANCELLED, "fine-tuning cancelled at step %d of %d",
					   r->p.step, r->p.total_steps);
	return DL_OK;
}

/*
 * Mean loss over the evaluation set: each rank takes examples rank, rank + nranks, ...;
 * the sums are exchanged.
 */
static dl_status
evaluate(run *r, dl_train_progress *last, dl_error *err)
{
	double		loss_sum;
	int64_t		n_labels;
	dl_status	st;

	if ((st = micro_batches(r, r->eval_mine, r->neval_mine, 0, 0, &loss_sum, &n_labels, err)) != DL_OK ||
		(st = trainer_sum(r->tr, &loss_sum, &n_labels, err)) != DL_OK)
		return st;
	r->p.eval_loss = n_labels > 0 ? loss_sum / n_labels : NAN;
	return report(r, "evaluating", last, err);
}

/*
 * The micro-batches every rank runs in a step: its own count but at least one (its last
 * may sum spans over the ranks: trainer_last_micro_batch), or at ZeRO stage 2 the busiest
 * rank's (exchanged).
 */
static dl_status
step_micro_batches(run *r, int n, int *count, dl_error *err)
{
	double		mine,
				all[DL_GROUP_MAX_RANKS];
	dl_status	st;

	*count = micro_batch_count(r, r->mine, n);
	*count = *count > 0 ? *count : 1;
	if (trainer_stage(r->tr) != 2)
		return DL_OK;
	mine = *count;
	if ((st = group_scalars(r->o->group, &mine, 1, all, err)) != DL_OK)
		return st;
	for (int k = 0; k < r->o->nranks; k++)
		*count = all[k] > *count ? (int) all[k] : *count;
	return DL_OK;
}

/* One optimizer step on batch [first, end) of the epoch's order. */
static dl_status
train_step(run *r, const dl_example *train, const int *order, int first, int end,
		   dl_error *err)
{
	const dl_finetune_opts *o = r->o;
	double		t0 = sys_now_s(),
				loss_sum;
	int64_t		n_labels;
	int			n = 0,
				count;
	dl_status	st;

	for (int i = first; i < end; i++)
	{
		r->tokens += train[order[i]].n;
		if ((i - first) % o->nranks == o->rank)
			r->mine[n++] = train[order[i]];
	}
	st = step_micro_batches(r, n, &count, err);
	if (st == DL_OK)
		st = micro_batches(r, r->mine, n, 1, count, &loss_sum, &n_labels, err);
	if (st == DL_OK)
		st = trainer_reduce(r->tr, &loss_sum, &n_labels, err);
	if (st == DL_OK)
		st = trainer_update(r->tr, n_labels, r->p.step, &r->p.lr, &r->p.grad_norm, err);
	if (st != DL_OK)
		return st;
	r->p.step++;
	r->p.train_loss = n_labels > 0 ? loss_sum / n_labels : NAN;
	r->train_s += sys_now_s() - t0;
	return DL_OK;
}

/* Shuffle 0..n-1 into order for epoch (1-based): Fisher-Yates seeded by seed and epoch. */
static void
epoch_order(int *order, int n, uint64_t seed, int epoch)
{
	dl_rng		rng;

	/* seeded per epoch, so an epoch's order does not depend on the ones before it */
	rng_seed(&rng, seed + (uint64_t) epoch);
	for (int i = 0; i < n; i++)
		order[i] = i;
	rng_shuffle(order, n, sizeof(int), &rng);
}

/* The epoch loop; see train.h. */
dl_status
finetune_run(dl_model *m, const dl_example *train, int ntrain, const dl_example *eval,
			 int neval, const dl_finetune_opts *opts, dl_train_progress *last, dl_error *err)
{
	run			r = {.o = opts, .cfg = opts->cfg, .be = m->be};
	int			steps_per_epoch,
				per_rank;
	int		   *order = NULL;
	dl_status	st = DL_OK;

	if (ntrain < 1 || neval < 0 || opts->epochs < 1 || opts->batch_size < 1 || opts->nranks < 1 ||
		opts->rank < 0 || opts->rank >= opts->nranks || opts->eval_every < 0)
		return dl_fail(err, DL_EINVAL, "fine-tuning needs training examples, epochs >= 1, batch_size >= 1 and 0 <= rank < nranks (got %d examples, %d epochs, batch %d, rank %d of %d)",
					   ntrain, opts->epochs, opts->batch_size, opts->rank, opts->nranks);
	if (opts->nranks > 1 &&
		(opts->group == NULL || opts->group->nranks != opts->nranks || opts->group->rank != opts->rank))
		return dl_fail(err, DL_EINVAL, "rank %d of %d needs a group of its ranks", opts->rank, opts->nranks);
	for (int i = 0; i < ntrain && st == DL_OK; i++)
		st = check_example(&train[i], "training", i, m->cfg.vocab_size, err);
	for (int i = 0; i < neval && st == DL_OK; i++)
		st = check_example(&eval[i], "evaluation", i, m->cfg.vocab_size, err);
	if (st != DL_OK)
		return st;

	steps_per_epoch = (ntrain + opts->batch_size - 1) / opts->batch_size;
	if (opts->epochs > INT32_MAX / steps_per_epoch)
		return dl_fail(err, DL_EINVAL, "%d epochs of %d steps are too many", opts->epochs, steps_per_epoch);
	r.cfg.total_steps = opts->epochs * steps_per_epoch;
	per_rank = (opts->batch_size + opts->nranks - 1) / opts->nranks;
	if ((st = size_config(&r.cfg, train, ntrain, eval, neval, per_rank, err)) != DL_OK)
		return st;
	order = malloc(sizeof(int) * ntrain);
	r.mine = malloc(sizeof(dl_example) * per_rank);
	r.eval_mine = malloc(sizeof(dl_example) * (neval / opts->nranks + 1));
	if (order == NULL || r.mine == NULL || r.eval_mine == NULL)
		st = dl_fail(err, DL_ENOMEM, "out of memory for %d training examples", ntrain);
	for (int i = opts->rank; i < neval && st == DL_OK; i += opts->nranks)
		r.eval_mine[r.neval_mine++] = eval[i];
	if (st == DL_OK)
		st = trainer_create(m, opts->lora, &r.cfg, opts->nranks > 1 ? opts->group : NULL, opts->zero_stage, &r.tr, err);

	r.p.total_steps = r.cfg.total_steps;
	if (r.tr)
	{
		r.p.state_bytes = trainer_state_bytes(r.tr);
		r.p.zero_stage = trainer_stage(r.tr);
	}
	r.p.train_loss = NAN;
	r.p.eval_loss = NAN;
	*last = r.p;
	for (int epoch = 1; epoch <= opts->epochs && st == DL_OK; epoch++)
	{
		int			evaluated = 0;

		r.p.epoch = epoch;
		epoch_order(order, ntrain, opts->seed, epoch);
		for (int first = 0; first < ntrain && st == DL_OK; first += opts->batch_size)
		{
			int			end = first + opts->batch_size < ntrain ? first + opts->batch_size : ntrain;

			st = train_step(&r, train, order, first, end, err);
			if (st == DL_OK)
				st = report(&r, "training", last, err);
			evaluated = st == DL_OK && neval > 0 && opts->eval_every > 0 &&
				r.p.step % opts->eval_every == 0;
			if (evaluated)
				st = evaluate(&r, last, err);
		}
		if (st == DL_OK && neval > 0 && !evaluated)
			st = evaluate(&r, last, err);
	}
	if (st != DL_OK && opts->nranks > 1 && opts->group->stop)
		opts->group->stop(opts->group->barrier_arg, st == DL_ECANCELLED ? NULL : err->msg);
	if (r.tr)
		trainer_free(r.tr);
	free(order);
	free(r.mine);
	free(r.eval_mine);
	return st;
}
