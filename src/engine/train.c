/*
 * train.c: the trainer of train.h: a gradient buffer laid out like the parameters, AdamW
 * moments in float32, the learning-rate schedule, and the step split into
 * trainer_backward (accumulate) and trainer_update (normalise by the global label count,
 * clip, AdamW, zero) so that data parallelism fits between the two. The passes
 * themselves are model_backward.c's.
 */
#include "train.h"

#include <math.h>
#include <stdlib.h>

struct dl_trainer
{
	dl_model   *m;
	dl_train_config cfg;
	dl_train_acts *acts;
	void	   *mem;			/* device: grads | adam_m | adam_v, each param_bytes */
	float	   *grads;
	float	   *adam_m;
	float	   *adam_v;
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

dl_status
trainer_create(dl_model *m, const dl_train_config *cfg, dl_trainer **out, dl_error *err)
{
	dl_backend *be = m->be;
	dl_trainer *tr;
	size_t		bytes = m->param_bytes;
	dl_status	st;

	st = check_config(cfg, m, err);
	if (st != DL_OK)
		return st;
	tr = calloc(1, sizeof(*tr));
	if (tr == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating a trainer");
	tr->m = m;
	tr->cfg = *cfg;
	st = dl_train_acts_create(m, cfg->max_tokens, cfg->max_length, cfg->checkpoint, &tr->acts,
							  err);
	if (st != DL_OK)
		goto fail;
	/* the buffers are laid out like param_mem: the same offsets locate a tensor in each */
	st = model_alloc(be, 3 * bytes, &tr->mem, err);
	if (st != DL_OK)
	{
		dl_hint(err, "Gradients and AdamW moments need %zu MB (three times the parameters).",
				3 * bytes >> 20);
		goto fail;
	}
	tr->grads = tr->mem;
	tr->adam_m = (float *) ((char *) tr->mem + bytes);
	tr->adam_v = (float *) ((char *) tr->mem + 2 * bytes);
	be->zero(be, tr->mem, 3 * bytes);
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
	dl_train_acts_free(tr->acts);
	tr->m->be->free(tr->m->be, tr->mem);
	free(tr);
}

dl_status
trainer_backward(dl_trainer *tr, const dl_example *batch, int n, double *loss_sum,
				 int64_t *n_labels, dl_error *err)
{
	return dl_model_backward(tr->m, tr->acts, batch, n, tr->grads, loss_sum, n_labels, err);
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
	*n = tr->m->param_bytes / sizeof(float);
	return tr->grads;
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
		be->zero(be, tr->grads, m->param_bytes);
		dl_fail(err, DL_EINVAL, "a training step has no label tokens");
		return dl_hint(err, "Every example needs response tokens after \"### Response:\".");
	}
	if (step < 0)
		return dl_fail(err, DL_EINVAL, "training step %d is negative", step);
	st = be->sum_squares(be, tr->grads, m->param_bytes / sizeof(float), &sumsq, err);
	if (st != DL_OK)
		return st;
	/* the buffer holds gradients of the summed loss: the mean's norm is 1/n of theirs */
	norm = sqrt(sumsq) / (double) n_labels;
	*grad_norm = (float) norm;
	if (!isfinite(norm))
	{
		be->zero(be, tr->grads, m->param_bytes);
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
	/* tensor by tensor, so that only parameters (never alignment padding) are touched */
	for (int i = 0; i < m->nmap; i++)
	{
		const dl_tensor_map *e = &m->map[i];
		size_t		at = e->offset / sizeof(float);
		size_t		numel = (size_t) e->shape[0] * (e->ndim == 2 ? e->shape[1] : 1);

		be->adamw_update(be, (float *) m->param_mem + at, tr->grads + at, tr->adam_m + at,
						 tr->adam_v + at, numel, &h);
	}
	be->zero(be, tr->grads, m->param_bytes);
	return be->synchronize(be, err);
}
