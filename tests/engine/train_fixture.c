/* train_fixture.c: the training fixtures and their checks against torch; see train_fixture.h. */
#include "harness.h"
#include "train_fixture.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A gradient whose tensor is all but zero is compared with this absolute floor. */
#define GRAD_FLOOR 1e-7

/* A tensor of the expectations as malloc'd floats (NULL if absent). */
static float *
exp_f32(const train_fixture *f, const char *name, int64_t *numel)
{
	const st_tensor *t = st_find(f->exp, name);
	float	   *v;

	if (t == NULL)
		return NULL;
	v = malloc(t->numel * sizeof(float));
	if (v && st_to_f32(t, v, NULL) != DL_OK)
	{
		free(v);
		return NULL;
	}
	if (numel)
		*numel = t->numel;
	return v;
}

/* An int32 tensor of the expectations, element i (-1 if absent). */
static int
exp_i32(const train_fixture *f, const char *name, int i)
{
	const st_tensor *t = st_find(f->exp, name);
	int32_t		v;

	if (t == NULL || t->dtype != ST_I32 || i >= t->numel)
		return -1;
	memcpy(&v, t->data + (size_t) i * sizeof(v), sizeof(v));
	return v;
}

void
train_close(train_fixture *f)
{
	for (int i = 0; i < f->n; i++)
		free(f->ex[i].ids);
	st_close(f->exp);
	dl_lora_free(f->lora);
	dl_model_free(f->m);
	if (f->owns_be)
		f->be->destroy(f->be);
	memset(f, 0, sizeof(*f));
}

int
train_open_on(const char *name, dl_backend *be, train_fixture *f, dl_error *err, dl_status *st)
{
	char		dir[4096],
				key[64];

	char	   *adapter;

	memset(f, 0, sizeof(*f));
	*st = DL_OK;
	snprintf(dir, sizeof(dir), "%s", fixture_path(name));
	snprintf(key, sizeof(key), "%s/train_expected.safetensors", name);
	if (access(fixture_path(key), R_OK) != 0)
		return 0;
	f->be = be;
	*st = st_open_file(fixture_path(key), &f->exp, err);
	/* "<model>-lora-<tag>": an adapter of <model> */
	adapter = strstr(dir, "-lora-");
	if (adapter)
		*adapter = '\0';
	if (*st == DL_OK)
		*st = dl_model_load(dir, f->be, &f->m, err);
	if (*st == DL_OK && adapter)
		*st = dl_lora_load(f->m, fixture_path(name), &f->lora, err);
	for (int i = 0; *st == DL_OK && i < MAX_EXAMPLES; i++)
	{
		const st_tensor *t;
		dl_example *ex = &f->ex[i];

		snprintf(key, sizeof(key), "example_%d_ids", i);
		if ((t = st_find(f->exp, key)) == NULL)
			break;
		ex->n = (int) t->numel;
		ex->ids = malloc(t->numel * sizeof(int32_t));
		memcpy(ex->ids, t->data, t->numel * sizeof(int32_t));
		ex->first_label = exp_i32(f, "first_label", i);
		f->tokens += ex->n;
		f->n++;
	}
	return 1;
}

int
train_open(const char *name, int threads, train_fixture *f, dl_error *err, dl_status *st)
{
	dl_backend *be;

	memset(f, 0, sizeof(*f));
	if ((*st = backend_cpu_create(threads, 0, &be, err)) != DL_OK)
		return 1;
	if (!train_open_on(name, be, f, err, st))
	{
		be->destroy(be);
		return 0;
	}
	f->owns_be = 1;
	return 1;
}

void
fixture_config(const train_fixture *f, dl_train_config *cfg)
{
	train_defaults(cfg);
	cfg->lr = 1e-3f;
	cfg->warmup_steps = 3;
	cfg->linear_decay = 1;
	cfg->total_steps = 10;
	cfg->weight_decay = 0.01f;
	cfg->max_grad_norm = 1.0f;
	cfg->max_tokens = f->tokens;
	cfg->max_length = f->m->cfg.max_pos;
}

/*
 * Compare our summed gradients (divided by the label count) with torch's, tensor by
 * tensor through the trained map (the model's or the adapter's); NeoX's fused qkv rows go through
 * model_neox_qkv_hf_row. Returns the number of tensors out of tolerance (printing them);
 * *worst gets the largest difference relative to its tensor's largest torch gradient.
 */
static int
compare_grads(const train_fixture *f, const float *grads, int64_t n_labels, double grad_tol,
			  int *checked, double *worst)
{
	const dl_config *c = &f->m->cfg;
	dl_trained	t = f->lora ? dl_lora_trained(f->lora) : dl_model_trained(f->m);
	int			bad = 0;

	*checked = 0;
	*worst = 0;
	for (int i = 0; i < t.nmap; i++)
	{
		const dl_tensor_map *e = &t.map[i];
		char		key[160];
		int64_t		numel = 0,
					rows = e->shape[0],
					cols = e->ndim == 2 ? e->shape[1] : 1;
		float	   *ref;
		const float *ours = grads + e->offset / sizeof(float);
		double		maxref = 0,
					maxd = 0,
					tol;

		snprintf(key, sizeof(key), "grad.%s", e->name);
		ref = exp_f32(f, key, &numel);
		if (ref == NULL || numel != rows * cols)
		{
			fprintf(stderr, "  %s: missing or of the wrong size in the fixture\n", key);
			free(ref);
			bad++;
			continue;
		}
		for (int64_t r = 0; r < rows; r++)
		{
			int64_t		hr = e->rowmap == DL_ROWS_NEOX_QKV ?
				model_neox_qkv_hf_row(c->n_head, c->head_dim, (int) r) : r;

			for (int64_t k = 0; k < cols; k++)
			{
				double		want = ref[hr * cols + k];

				maxref = fmax(maxref, fabs(want));
				maxd = fmax(maxd, fabs(ours[r * cols + k] / (double) n_labels - want));
			}
		}
		tol = fmax(grad_tol * maxref, GRAD_FLOOR);
		*worst = fmax(*worst, maxd / fmax(maxref, GRAD_FLOOR / grad_tol));
		if (!(maxd <= tol))
		{
			fprintf(stderr, "  %s: differs by %g (tolerance %g, largest %g)\n", key, maxd, tol, maxref);
			bad++;
		}
		free(ref);
		(*checked)++;
	}
	return bad;
}

/* The fixture of a check: on be, or (NULL) on a CPU backend of 2 threads; as train_open. */
static int
check_open(const char *name, dl_backend *be, train_fixture *f, dl_error *err, dl_status *st)
{
	return be ? train_open_on(name, be, f, err, st) : train_open(name, 2, f, err, st);
}

/* Loss and every gradient of the fixture batch against torch. */
void
train_check_grads(const char *name, dl_backend *be, const train_tol *tol, int *failed_)
{
	train_fixture f;
	dl_train_config cfg;
	dl_trainer *tr = NULL;
	dl_error	err;
	dl_status	st;
	double		loss_sum = 0,
				worst = 0;
	int64_t		n_labels = 0;
	size_t		ngrad;
	float	   *want,
			   *grads = NULL;
	int			want_labels,
				nmap,
				bad = 0,
				checked = 0;

	if (!check_open(name, be, &f, &err, &st))
		SKIP("fixture %s/train_expected.safetensors absent", name);
	if (st == DL_OK)
	{
		fixture_config(&f, &cfg);
		st = trainer_create(f.m, f.lora, &cfg, NULL, 0, &tr, &err);
	}
	if (st == DL_OK)
		st = trainer_backward(tr, f.ex, f.n, &loss_sum, &n_labels, &err);
	if (st == DL_OK)
	{
		const float *dev = trainer_grads(tr, &ngrad);

		grads = malloc(ngrad * sizeof(float));
		st = f.be->download(f.be, grads, dev, ngrad * sizeof(float), &err);
	}
	if (st == DL_OK)
		bad = compare_grads(&f, grads, n_labels, tol->grad, &checked, &worst);
	free(grads);
	want = exp_f32(&f, "loss", NULL);
	want_labels = exp_i32(&f, "n_labels", 0);
	nmap = f.lora ? f.lora->nmap : f.m ? f.m->nmap : 0;
	trainer_free(tr);
	train_close(&f);
	CHECK_OK(st, &err);
	CHECK(want != NULL);
	CHECKF(n_labels == want_labels, "%lld label tokens, torch %d", (long long) n_labels, want_labels);
	printf("  %-14s loss %.2e relative to torch's, gradients within %.2e of each tensor's largest\n",
		   name, fabs(loss_sum / n_labels - want[0]) / want[0], worst);
	CHECKF(fabs(loss_sum / n_labels - want[0]) <= tol->loss * want[0],
		   "loss %.7f, torch %.7f", loss_sum / n_labels, want[0]);
	free(want);
	CHECKF(checked == nmap && nmap > 0, "%d of %d tensors compared", checked, nmap);
	CHECKF(bad == 0, "%d of %d gradients out of tolerance", bad, checked);
}

/* Relative difference of a to b. */
static double
rel_diff(double a, double b)
{
	return fabs(a - b) / fmax(fabs(b), 1e-30);
}

/* 10 AdamW steps on the fixture batch: loss, learning rate and gradient norm per step. */
void
train_check_steps(const char *name, dl_backend *be, const train_tol *tol, int *failed_)
{
	train_fixture f;
	dl_train_config cfg;
	dl_trainer *tr = NULL;
	dl_error	err;
	dl_status	st;
	float	   *losses,
			   *norms,
			   *lrs;
	int64_t		steps = 0;
	double		worst_loss = 0,
				worst_norm = 0,
				worst_lr = 0;

	if (!check_open(name, be, &f, &err, &st))
		SKIP("fixture %s/train_expected.safetensors absent", name);
	losses = exp_f32(&f, "adamw_losses", &steps);
	norms = exp_f32(&f, "adamw_grad_norms", NULL);
	lrs = exp_f32(&f, "adamw_lrs", NULL);
	if (st == DL_OK && (losses == NULL || norms == NULL || lrs == NULL))
		st = dl_fail(&err, DL_EFORMAT, "the fixture lacks the AdamW steps");
	if (st == DL_OK)
	{
		fixture_config(&f, &cfg);
		st = trainer_create(f.m, f.lora, &cfg, NULL, 0, &tr, &err);
	}
	for (int s = 0; st == DL_OK && s < steps; s++)
	{
		double		loss_sum;
		int64_t		n_labels;
		float		lr,
					norm;

		st = trainer_backward(tr, f.ex, f.n, &loss_sum, &n_labels, &err);
		if (st == DL_OK)
			st = trainer_update(tr, n_labels, s, &lr, &norm, &err);
		if (st != DL_OK)
			break;
		worst_loss = fmax(worst_loss, rel_diff(loss_sum / n_labels, losses[s]));
		worst_norm = fmax(worst_norm, rel_diff(norm, norms[s]));
		worst_lr = fmax(worst_lr, fabs(lr - lrs[s]) / cfg.lr);
	}
	trainer_free(tr);
	train_close(&f);
	free(losses);
	free(norms);
	free(lrs);
	CHECK_OK(st, &err);
	CHECK(steps == 10);
	printf("  %-14s 10 AdamW steps: losses within %.2e, gradient norms within %.2e of torch's\n",
		   name, worst_loss, worst_norm);
	CHECKF(worst_loss <= tol->steps, "a step's loss differs from torch's by %g (relative)", worst_loss);
	CHECKF(worst_norm <= tol->steps, "a step's gradient norm differs from torch's by %g (relative)", worst_norm);
	CHECKF(worst_lr <= 1e-6, "a step's learning rate differs from torch's by %g of the peak", worst_lr);
}

