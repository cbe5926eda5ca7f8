/*
 * train.c: the trainer of train.h: gradients laid out like the parameters, AdamW moments
 * in float32, the learning-rate schedule, and the step split into trainer_backward
 * (accumulate), trainer_reduce (sum over the ranks) and trainer_update (normalise by the
 * global label count, clip, AdamW, zero). The passes themselves are model_backward.c's,
 * the sums over ranks collective.c's.
 *
 * With a group of N ranks and ZeRO stage 1 or 2, rank r owns part r of every span of
 * the parameters (model.h's gradient spans: the head, each layer, the embedding; cut by
 * group_part), so every rank sums and updates a share of every layer: it keeps AdamW's
 * moments of its parts only (its "local" arrays, the parts end to end in span order),
 * updates only them, and the parts are gathered into every rank's parameters. Stage 1
 * keeps all gradients and reduce-scatters them span by span once a step; stage 2 keeps
 * the reduced gradients of its parts only, and reduces each span as backward completes
 * it, from two buffers the size of the largest span in turn, the sums of one running while
 * backward fills the other where the backend can (group_reduce_scatter_start); at stages 0
 * and 1 the step's last micro-batch does the same with each span it completes, in place,
 * where the ranks sum from each other's GPU memory (trainer_last_micro_batch), and
 * trainer_reduce finishes the sums (and at stage 0 gathers). The gradient norm is summed part by
 * part, ranks in rank order, at every stage, so stages 0, 1 and 2 take the same steps;
 * stage 2 sums micro-batch by micro-batch, which rounds differently when a rank has
 * several micro-batches in a step.
 */
#include "train.h"

#include "lora.h"

#include <math.h>
#include <stdlib.h>

#define SPAN_SLOTS 4			/* stage 2's span buffers: see span_slot */

struct dl_trainer
{
	dl_model   *m;
	dl_trained	t;				/* what it trains: m's parameters, or an adapter's */
	dl_train_config cfg;
	dl_train_acts *acts;
	dl_group   *group;			/* NULL: alone */
	int			stage;			/* ZeRO stage: 0, 1, 2 */
	size_t		n;				/* floats of the trained parameters */
	int			nranks;			/* of the group; 1 alone */
	size_t	   *parts;			/* [span][3]: this rank's part's first float, floats, local offset */
	size_t		local;			/* floats of its parts (n at stage 0) */
	void	   *mem;			/* device: grads | adam_m | adam_v | spans (stage 2) */
	size_t		mem_bytes;
	int			peer_grads;		/* grads is this rank's buffer of the group's peers, not in mem */
	int			shared;			/* mem and the trained parameters are mapped by the peers (group_share) */
	int			overlap;		/* stages 0, 1: the next backward starts its spans' sums */
	int			scattered;		/* ...and did: trainer_reduce finishes them */
	float	   *grads;			/* stages 0, 1: n floats; stage 2: the parts' reduced ones */
	float	   *adam_m;			/* local */
	float	   *adam_v;
	float	   *span_buf[SPAN_SLOTS];	/* stage 2: see span_slot */
	dl_grad_sink sink;
	int			updates;		/* AdamW steps taken: torch's state["step"] */
};

void
train_defaults(dl_train_config *cfg)
{
	*cfg = (dl_train_config) {
		.lr = 5e-6f,
		.warmup_steps = 50,
		/* Dolly's DeepSpeed WarmupLR: warm up, then hold */
		.linear_decay = 0,
		.total_steps = 0,
		.beta1 = 0.9f,
		.beta2 = 0.999f,
		.eps = 1e-8f,
		.weight_decay = 0.0f,
		.max_grad_norm = 1.0f,
		.max_tokens = 2048,
		.max_length = 2048,
		.checkpoint = 0,
	};
}

/* Check the settings a trainer cannot work with. */
static dl_status
check_config(const dl_train_config *c, const dl_model *m, dl_error *err)
{
	if (!(c->lr >= 0.0f && isfinite(c->lr)))
		return dl_fail(err, DL_EINVAL, "learning rate %g is not a finite number >= 0", c->lr);
	if (c->warmup_steps < 0 || c->total_steps < 0)
		return dl_fail(err, DL_EINVAL, "warmup steps %d and total steps %d must not be negative",
					   c->warmup_steps, c->total_steps);
	if (!(c->beta1 >= 0.0f && c->beta1 < 1.0f && c->beta2 >= 0.0f && c->beta2 < 1.0f))
		return dl_fail(err, DL_EINVAL, "AdamW betas (%g, %g) must lie in [0, 1)", c->beta1, c->beta2);
	if (!(c->eps > 0.0f && isfinite(c->eps)))
		return dl_fail(err, DL_EINVAL, "AdamW eps %g must be a finite number > 0", c->eps);
	if (!(c->weight_decay >= 0.0f && isfinite(c->weight_decay)))
		return dl_fail(err, DL_EINVAL, "weight decay %g is not a finite number >= 0", c->weight_decay);
	if (!(c->max_grad_norm >= 0.0f && isfinite(c->max_grad_norm)))
		return dl_fail(err, DL_EINVAL, "gradient clipping norm %g is not a finite number >= 0 (0: off)",
					   c->max_grad_norm);
	if (c->max_length > m->cfg.max_pos)
	{
		dl_fail(err, DL_EINVAL, "maximum length %d exceeds the model's %d positions",
				c->max_length, m->cfg.max_pos);
		return dl_hint(err, "Set the maximum length to %d or less.", m->cfg.max_pos);
	}
	return DL_OK;
}

/*
 * Which of the stage-2 span buffers serves span s: the head's; two the layers, and then
 * an untied embedding, take in turn (a span's sums may still run while backward fills the
 * next: group_reduce_scatter_start); a tied embedding's own (open from the head on).
 */
static int
span_slot(const dl_model *m, int s)
{
	if (s == 0)
		return 0;
	if (s == DL_GRAD_SPANS(&m->cfg) - 1 && m->cfg.tie_embeddings)
		return 2;
	return s % 2 ? 1 : 3;
}

/* Span s in floats: [*first, *first + *count). */
static void
span_floats(const dl_trained *t, int s, size_t *first, size_t *count)
{
	*first = t->spans[2 * s] / sizeof(float);
	*count = (t->spans[2 * s + 1] - t->spans[2 * s]) / sizeof(float);
}

/* Rank r of nranks's part of span s: floats [*first, *first + *count) of the parameters. */
static void
rank_part(const dl_trained *t, int nranks, int r, int s, size_t *first, size_t *count)
{
	size_t		base,
				n,
				lo,
				hi;

	span_floats(t, s, &base, &n);
	group_part(nranks, n, r, &lo, &hi);
	*first = base + lo;
	*count = hi - lo;
}

/* Stages 0 and 1: every span accumulates in place in the one gradient buffer. */
static float *
open_in_place(void *arg, int s)
{
	dl_trainer *tr = arg;
	size_t		first,
				count;

	span_floats(&tr->t, s, &first, &count);
	return tr->grads + first;
}

/*
 * ...summed over the ranks after the step's micro-batches; in the last of them, where it
 * overlaps (trainer_last_micro_batch), each completed span is reduce-scattered at once,
 * into this rank's part of it, while backward goes on.
 */
static dl_status
close_in_place(void *arg, int s, dl_error *err)
{
	dl_trainer *tr = arg;
	size_t		first,
				count,
				part,
				part_n;

	if (!tr->overlap)
		return DL_OK;
	span_floats(&tr->t, s, &first, &count);
	rank_part(&tr->t, tr->nranks, tr->group->rank, s, &part, &part_n);
	return group_reduce_scatter_start(tr->group, tr->m->be, tr->grads + first, count,
									  tr->grads + part, 0, err);
}

/* Stage 2: span s accumulates in its zeroed buffer... */
static float *
open_span(void *arg, int s)
{
	dl_trainer *tr = arg;
	float	   *buf = tr->span_buf[span_slot(tr->m, s)];

	tr->m->be->zero(tr->m->be, buf, tr->t.spans[2 * s + 1] - tr->t.spans[2 * s]);
	return buf;
}

/*
 * ...and, complete, is summed over the ranks into its owners' parts of gradients, while
 * backward goes on where the backend can (trainer_backward waits for the last span).
 */
static dl_status
close_span(void *arg, int s, dl_error *err)
{
	dl_trainer *tr = arg;
	size_t		first,
				count;

	span_floats(&tr->t, s, &first, &count);
	return group_reduce_scatter_start(tr->group, tr->m->be, tr->span_buf[span_slot(tr->m, s)],
									  count, tr->grads + tr->parts[3 * s + 2], 1, err);
}

/* The floats of each stage-2 span buffer: the most any span it serves needs. */
static void
span_sizes(const dl_model *m, const dl_trained *t, size_t *sizes)
{
	for (int i = 0; i < SPAN_SLOTS; i++)
		sizes[i] = 0;
	for (int s = 0; s < DL_GRAD_SPANS(&m->cfg); s++)
	{
		size_t		first,
					count,
				   *at = &sizes[span_slot(m, s)];

		span_floats(t, s, &first, &count);
		*at = count > *at ? count : *at;
	}
}

/* Floats of a trainer's state at stage with a slice of `slice` floats; stage 2's spans. */
static size_t
state_floats(const dl_model *m, const dl_trained *t, size_t slice, int stage, size_t *spans)
{
	size_t		n = t->bytes / sizeof(float),
				floats = (stage == 2 ? slice : n) + 2 * slice;

	span_sizes(m, t, spans);
	for (int i = 0; i < SPAN_SLOTS; i++)
		spans[i] = stage == 2 ? spans[i] : 0;
	for (int i = 0; i < SPAN_SLOTS; i++)
		floats += spans[i];
	return floats;
}

/* What a trainer of m (with lora: of that adapter) trains. */
static dl_trained
trained_of(const dl_model *m, const dl_lora *lora)
{
	return lora ? dl_lora_trained(lora) : dl_model_trained(m);
}

size_t
trainer_state_floats(const dl_model *m, const dl_lora *lora, int nranks, int stage)
{
	dl_trained	t = trained_of(m, lora);
	size_t		n = t.bytes / sizeof(float),
				spans[SPAN_SLOTS];

	if (nranks < 2)
		return state_floats(m, &t, n, 0, spans);
	/* at most one float more than n / nranks a span */
	return state_floats(m, &t, stage == 0 ? n : n / nranks + DL_GRAD_SPANS(&m->cfg), stage, spans);
}

dl_status
trainer_create(dl_model *m, const dl_lora *lora, const dl_train_config *cfg, dl_group *group,
			   int stage, dl_trainer **out, dl_error *err)
{
	dl_backend *be = m->be;
	dl_trainer *tr;
	size_t		at,
				spans[SPAN_SLOTS];
	dl_status	st;

	st = check_config(cfg, m, err);
	if (st != DL_OK)
		return st;
	if (stage < 0 || stage > 2)
		return dl_fail(err, DL_EINVAL, "ZeRO stage %d does not exist (0, 1 or 2)", stage);
	tr = calloc(1, sizeof(*tr));
	if (tr == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating a trainer");
	tr->m = m;
	tr->t = trained_of(m, lora);
	tr->cfg = *cfg;
	tr->group = group;
	tr->stage = group && group->nranks > 1 ? stage : 0;
	tr->n = tr->t.bytes / sizeof(float);
	tr->nranks = group ? group->nranks : 1;
	tr->parts = malloc(3 * sizeof(size_t) * DL_GRAD_SPANS(&m->cfg));
	if (tr->parts == NULL)
	{
		st = dl_fail(err, DL_ENOMEM, "out of memory creating a trainer");
		goto fail;
	}
	/* this rank's parts (stage 0: whole spans, at their own offsets) */
	for (int s = 0; s < DL_GRAD_SPANS(&m->cfg); s++)
	{
		size_t	   *p = &tr->parts[3 * s];

		if (tr->stage > 0)
			rank_part(&tr->t, tr->nranks, group->rank, s, &p[0], &p[1]);
		else
			span_floats(&tr->t, s, &p[0], &p[1]);
		p[2] = tr->stage > 0 ? tr->local : p[0];
		tr->local = tr->stage > 0 ? tr->local + p[1] : tr->n;
	}
	st = dl_train_acts_create(m, lora, cfg->max_tokens, cfg->max_length, cfg->checkpoint,
							  &tr->acts, err);
	if (st != DL_OK)
		goto fail;
	/*
	 * one allocation; moments (and stage 2's gradients) for the rank's parts only; at
	 * stages 0 and 1 on host memory the gradients may be the group's buffer for this rank,
	 * which the others read directly
	 */
	tr->peer_grads = tr->stage < 2 && group && group->peers && be->host_memory &&
		group->peer_n >= tr->n;
	tr->mem_bytes = state_floats(m, &tr->t, tr->local, tr->stage, spans) * sizeof(float);
	st = model_alloc(be, tr->mem_bytes - (tr->peer_grads ? tr->n * sizeof(float) : 0), &tr->mem, err);
	if (st != DL_OK)
	{
		dl_hint(err, "Gradients and AdamW moments need %zu MB at ZeRO stage %d%s.",
				tr->mem_bytes >> 20, tr->stage,
				tr->stage < 2 && group && group->nranks > 1 ? ": a higher stage needs less" : "");
		goto fail;
	}
	tr->grads = tr->peer_grads ? group->peers[group->rank] : tr->mem;
	at = tr->peer_grads ? 0 : tr->stage == 2 ? tr->local : tr->n;
	tr->adam_m = (float *) tr->mem + at;
	tr->adam_v = tr->adam_m + tr->local;
	at += 2 * tr->local;
	for (int i = 0; i < SPAN_SLOTS; i++)
	{
		tr->span_buf[i] = (float *) tr->mem + at;
		at += spans[i];
	}
	tr->sink = tr->stage == 2 ? (dl_grad_sink) {open_span, close_span, tr}
		: (dl_grad_sink) {open_in_place, close_in_place, tr};
	be->zero(be, tr->mem, tr->mem_bytes - (tr->peer_grads ? tr->n * sizeof(float) : 0));
	be->zero(be, tr->grads, (tr->stage == 2 ? tr->local : tr->n) * sizeof(float));
	/* device ranks read each other's gradients and parameters where they can map them */
	if (tr->nranks > 1 && !be->host_memory)
	{
		void	   *mem[2] = {tr->mem, tr->t.mem};
		size_t		bytes[2] = {tr->mem_bytes, tr->t.bytes};

		if ((st = group_share(group, be, mem, bytes, 2, err)) != DL_OK)
			goto fail;
		tr->shared = 1;
	}
	*out = tr;
	return DL_OK;

fail:
	trainer_free(tr);
	return st;
}

void
trainer_free(dl_trainer *tr)
{
	if (tr == NULL)
		return;
	if (tr->shared)
		group_unshare(tr->group);
	dl_train_acts_free(tr->acts);
	tr->m->be->free(tr->m->be, tr->mem);
	free(tr->parts);
	free(tr);
}

size_t
trainer_state_bytes(const dl_trainer *tr)
{
	return tr->mem_bytes;
}

int
trainer_stage(const dl_trainer *tr)
{
	return tr->stage;
}

void
trainer_last_micro_batch(dl_trainer *tr)
{
	/* on host memory the sums would take the cores backward uses: after it, at once */
	tr->overlap = tr->stage < 2 && tr->shared && tr->m->be->sum_ranks_aside != NULL;
}

dl_status
trainer_backward(dl_trainer *tr, const dl_example *batch, int n, double *loss_sum,
				 int64_t *n_labels, dl_error *err)
{
	dl_status	st = dl_model_backward(tr->m, tr->acts, batch, n, &tr->sink, loss_sum, n_labels, err);

	tr->scattered = tr->overlap && st == DL_OK;
	tr->overlap = 0;
	/* the next micro-batch zeroes the span buffers: no sum may still read them */
	return st == DL_OK && tr->stage == 2 ? group_finish(tr->group, err) : st;
}

dl_status
trainer_eval(dl_trainer *tr, const dl_example *batch, int n, double *loss_sum,
			 int64_t *n_labels, dl_error *err)
{
	return dl_model_backward(tr->m, tr->acts, batch, n, NULL, loss_sum, n_labels, err);
}

float *
trainer_grads(dl_trainer *tr, size_t *n)
{
	*n = tr->stage == 2 ? tr->local : tr->n;
	return tr->grads;
}

dl_status
trainer_sum(dl_trainer *tr, double *loss_sum, int64_t *n_labels, dl_error *err)
{
	double		mine[2] = {*loss_sum, (double) *n_labels},
				all[2 * DL_GROUP_MAX_RANKS];
	dl_status	st;

	if (tr->group == NULL || tr->group->nranks < 2)
		return DL_OK;
	if ((st = group_scalars(tr->group, mine, 2, all, err)) != DL_OK)
		return st;
	*loss_sum = 0;
	*n_labels = 0;
	for (int r = 0; r < tr->group->nranks; r++)
	{
		*loss_sum += all[2 * r];
		*n_labels += (int64_t) all[2 * r + 1];
	}
	return DL_OK;
}

dl_status
trainer_reduce(dl_trainer *tr, double *loss_sum, int64_t *n_labels, dl_error *err)
{
	dl_status	st = trainer_sum(tr, loss_sum, n_labels, err);

	if (st != DL_OK || tr->group == NULL || tr->group->nranks < 2)
		return st;
	if (tr->scattered)
	{
		/* backward reduce-scattered every span (trainer_sum finished the last): stage 0 gathers */
		tr->scattered = 0;
		for (int s = 0; tr->stage == 0 && s < DL_GRAD_SPANS(&tr->m->cfg) && st == DL_OK; s++)
		{
			size_t		first,
						count;

			span_floats(&tr->t, s, &first, &count);
			st = group_all_gather(tr->group, tr->m->be, tr->grads + first, count, err);
		}
		return st;
	}
	switch (tr->stage)
	{
		case 0:
			return group_all_reduce(tr->group, tr->m->be, tr->grads, tr->n, err);
		case 1:
			for (int s = 0; s < DL_GRAD_SPANS(&tr->m->cfg) && st == DL_OK; s++)
			{
				size_t		first,
							count;

				span_floats(&tr->t, s, &first, &count);
				st = group_reduce_scatter(tr->group, tr->m->be, tr->grads + first, count,
										  tr->grads + tr->parts[3 * s], 0, err);
			}
			return st;
		default:
			return DL_OK;		/* reduced span by span in backward */
	}
}

/*
 * The learning rate of 0-based step `step`: transformers' get_linear_schedule_with_warmup
 * (linear_decay) or get_constant_schedule_with_warmup: step / warmup during warmup, then
 * (total - step) / (total - warmup) down to 0, or 1.
 */
static double
scheduled_lr(const dl_train_config *c, int step)
{
	double		f = 1.0;

	if (step < c->warmup_steps)
		f = (double) step / c->warmup_steps;
	else if (c->linear_decay)
	{
		int			span = c->total_steps - c->warmup_steps;

		f = (double) (c->total_steps - step) / (span > 1 ? span : 1);
		f = f > 0.0 ? f : 0.0;
	}
	return c->lr * f;
}

/*
 * The sum of squares of rank r's parts of the reduced gradients, span by span; at stage
 * 2 (r this rank) from the local gradients.
 */
static dl_status
part_sum_squares(dl_trainer *tr, int r, double *sumsq, dl_error *err)
{
	dl_backend *be = tr->m->be;
	dl_status	st = DL_OK;

	*sumsq = 0;
	for (int s = 0; s < DL_GRAD_SPANS(&tr->m->cfg) && st == DL_OK; s++)
	{
		size_t		first,
					count;
		double		part;

		rank_part(&tr->t, tr->nranks, r, s, &first, &count);
		st = be->sum_squares(be, tr->grads + (tr->stage == 2 ? tr->parts[3 * s + 2] : first), count,
							 &part, err);
		*sumsq += part;
	}
	return st;
}

/*
 * The sum of squares of the reduced gradients, over the ranks' parts in rank order (the
 * group's ranks, or one alone), the same at every stage: stage 0 sums every rank's parts
 * itself; stages 1 and 2 sum their own and exchange.
 */
static dl_status
grad_sum_squares(dl_trainer *tr, double *sumsq, dl_error *err)
{
	double		mine,
				all[DL_GROUP_MAX_RANKS];
	dl_status	st;

	*sumsq = 0;
	if (tr->stage == 0)
	{
		for (int r = 0; r < tr->nranks; r++)
		{
			if ((st = part_sum_squares(tr, r, &mine, err)) != DL_OK)
				return st;
			*sumsq += mine;
		}
		return DL_OK;
	}
	if ((st = part_sum_squares(tr, tr->group->rank, &mine, err)) != DL_OK ||
		(st = group_scalars(tr->group, &mine, 1, all, err)) != DL_OK)
		return st;
	for (int r = 0; r < tr->nranks; r++)
		*sumsq += all[r];
	return DL_OK;
}

/* Zero the gradients the next step accumulates into. */
static void
zero_grads(dl_trainer *tr)
{
	tr->m->be->zero(tr->m->be, tr->grads, (tr->stage == 2 ? tr->local : tr->n) * sizeof(float));
}

dl_status
trainer_update(dl_trainer *tr, int64_t n_labels, int step, float *lr, float *grad_norm,
			   dl_error *err)
{
	dl_model   *m = tr->m;
	dl_backend *be = m->be;
	double		sumsq,
				norm,
				coef = 1.0;
	dl_adamw	h;
	dl_status	st;

	*lr = 0.0f;
	*grad_norm = 0.0f;
	if (n_labels < 1)
	{
		zero_grads(tr);
		dl_fail(err, DL_EINVAL, "a training step has no label tokens");
		return dl_hint(err, "Every example needs response tokens after \"### Response:\".");
	}
	if (step < 0)
		return dl_fail(err, DL_EINVAL, "training step %d is negative", step);
	if ((st = grad_sum_squares(tr, &sumsq, err)) != DL_OK)
		return st;
	/* the buffer holds gradients of the summed loss: the mean's norm is 1/n of theirs */
	norm = sqrt(sumsq) / (double) n_labels;
	*grad_norm = (float) norm;
	if (!isfinite(norm))
	{
		zero_grads(tr);
		dl_fail(err, DL_EINVAL, "the gradient norm is not finite: training diverged");
		return dl_hint(err, "Lower the learning rate.");
	}
	/* torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), at most 1 */
	if (tr->cfg.max_grad_norm > 0.0f)
	{
		coef = tr->cfg.max_grad_norm / (norm + 1e-6);
		coef = coef < 1.0 ? coef : 1.0;
	}
	h = (dl_adamw) {
		.lr = (float) scheduled_lr(&tr->cfg, step),
		.beta1 = tr->cfg.beta1,
		.beta2 = tr->cfg.beta2,
		.eps = tr->cfg.eps,
		.weight_decay = tr->cfg.weight_decay,
		.grad_scale = (float) (coef / (double) n_labels),
		.step = ++tr->updates,
	};
	*lr = h.lr;

	/*
	 * Tensor by tensor, so that only parameters (never alignment padding) are touched;
	 * of each, what lies in this rank's part of each span. Element k of the parameters in the
	 * part of span s has its gradient at grads[k] (stage 2: at the local offset) and its
	 * moments at the local offset, parts[s][2] + k - parts[s][0].
	 */
	for (int s = 0; s < DL_GRAD_SPANS(&m->cfg); s++)
	{
		const size_t *p = &tr->parts[3 * s];

		for (int i = 0; i < tr->t.nmap; i++)
		{
			const dl_tensor_map *e = &tr->t.map[i];
			size_t		at = e->offset / sizeof(float),
						end = at + (size_t) e->shape[0] * (e->ndim == 2 ? e->shape[1] : 1),
						local;

			at = at > p[0] ? at : p[0];
			end = end < p[0] + p[1] ? end : p[0] + p[1];
			if (at >= end)
				continue;
			local = p[2] + (at - p[0]);
			be->adamw_update(be, (float *) tr->t.mem + at, tr->grads + (tr->stage == 2 ? local : at),
							 tr->adam_m + local, tr->adam_v + local, end - at, &h);
		}
	}
	zero_grads(tr);
	for (int s = 0; tr->stage > 0 && s < DL_GRAD_SPANS(&m->cfg); s++)
	{
		size_t		first,
					count;

		span_floats(&tr->t, s, &first, &count);
		if ((st = group_all_gather(tr->group, be, (float *) tr->t.mem + first, count, err)) != DL_OK)
			return st;
	}
	return be->synchronize(be, err);
}
