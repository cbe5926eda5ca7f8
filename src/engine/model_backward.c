/*
 * model_backward.c: the training pass of GPT-J and GPT-NeoX (llm.c's gpt2_forward and
 * gpt2_backward for our two block layouts): a forward pass over a batch of independent
 * examples that keeps what backward needs, the cross-entropy of the label positions,
 * and the backward pass into a gradient buffer laid out like the parameters.
 *
 * The examples' rows are stacked (T rows), positions restart at 0 in each and attention
 * stays within each example, so there is no padding. Per layer the forward keeps the
 * layer's input (the residual stream), the normed input(s) with their mean and rstd,
 * qkv after rotary, the attention output and its log-sum-exp, NeoX sequential's
 * mid-layer residual and the MLP's pre-activation; the GELU output is recomputed in
 * backward, which is cheaper than keeping T x F more floats per layer.
 *
 * With checkpointing the forward keeps only each layer's input (and the last output);
 * the other buffers exist once, shared by all layers, which is most of the memory of a
 * large model. Backward, walking the layers in reverse, first runs a layer's forward
 * again from its input into them: the same function and kernels on the same input, so
 * the gradients equal those without checkpointing bit for bit, for one more forward of
 * every layer but the last (whose activations the forward leaves in place). The
 * recomputation leaves out what only makes the layer's output, which is kept: the GELU
 * and the MLP's second product, and the attention projection but in NeoX sequential.
 *
 * Only label rows reach the output layer: they are gathered after the last block, and
 * the final norm, the logits (a chunk of rows at a time, so the [rows, V] logits stay
 * within a fixed budget) and their backward run on those rows alone; the prompt of an
 * example costs nothing there.
 *
 * Backward walks the layers in reverse with dx, the gradient of the residual stream:
 *   GPT-J:           x' = x + proj(att(LN1 x)) + MLP(LN1 x)
 *   NeoX parallel:   x' = x + proj(att(LN1 x)) + MLP(LN2 x)
 *   NeoX sequential: y = x + proj(att(LN1 x)); x' = y + MLP(LN2 y)
 * Every product whose output gradient is dx runs before a norm's backward adds its
 * input gradient into dx, which then holds the gradient of the layer's input.
 */
#include "lora.h"
#include "model.h"
#include "train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* floats of logits computed at once: the chunk of label rows is sized to fit */
#define LOGIT_BUDGET (1 << 23)
/*
 * A device (not host) memory gets eight times that, 256 MB: there the chunk's rows are the
 * M of three products with the [V, E] output matrix, and a few hundred rows (166 of a
 * 50k vocabulary) leave much of the last row of tensor-core tiles idle in each.
 */
#define LOGIT_BUDGET_DEVICE (1 << 26)

/* What one layer's forward keeps (device pointers). */
typedef struct layer_acts
{
	float	   *x;				/* [T, E] the layer's input; layers[n_layer].x is the output */
	float	   *ln1;			/* [T, E] */
	float	   *ln1_mean;		/* [T] */
	float	   *ln1_rstd;
	float	   *qkv;			/* [T, 3E] after rotary */
	float	   *att;			/* [T, E] attention output, before the projection */
	float	   *lse;			/* [T, n_head] */
	float	   *ln2;			/* [T, E] NeoX */
	float	   *ln2_mean;
	float	   *ln2_rstd;
	float	   *xmid;			/* [T, E] NeoX sequential: x + attention, LN2's input */
	float	   *fc;				/* [T, F] the MLP's pre-activation */
	float	   *lora_u;			/* [ntargets, T, r] the adapter's low-rank products, per layer */
} layer_acts;

struct dl_train_acts
{
	dl_model   *model;
	const dl_lora *lora;		/* trained over the frozen model; NULL: the model is */
	dl_trained	trained;
	uint64_t	passes;			/* training passes so far: seeds the adapter's dropout */
	float	   *lora_ws;		/* [T, max(E, F)] the adapter's dropped input, with dropout */
	float	   *tok_u;			/* [logit_rows, ntok] its token rows' low-rank product */
	int			max_tokens;
	int			max_len;
	int			logit_rows;		/* label rows per logits chunk */
	int			checkpoint;		/* keep only the layers' inputs; backward recomputes the rest */
	size_t		bytes;			/* of mem */
	void	   *mem;			/* device: everything below */
	layer_acts *layers;			/* host array of n_layer + 1; checkpointing: all but x shared */
	float	   *gelu;			/* [T, F] GELU output, then the gradient of its input */
	float	   *dx;				/* [T, E] gradient of the residual stream */
	float	   *dln;			/* [T, E] gradient of a norm's output */
	float	   *datt;			/* [T, E] gradient of the attention output */
	float	   *dqkv;			/* [T, 3E] */
	float	   *dfc;			/* [T, F] gradient of the GELU output */
	float	   *xr;				/* [T, E] the residual stream's label rows */
	float	   *lnf;			/* [T, E] their final norm */
	float	   *lnf_mean;
	float	   *lnf_rstd;
	float	   *logits;			/* [logit_rows, V], then their gradient */
	float	   *losses;			/* [T] one per label row */
	float	   *attn_ws;
	int32_t    *meta;			/* ids [T] | pos [T] | rows [T] | labels [T] | spans */
	int32_t    *h_meta;			/* the same, staged on the host */
	float	   *h_losses;
	float	  **grad_bufs;		/* host [n_layer + 2]: the open gradient spans' buffers */
};

/*
 * Reserve n floats at *off, aligned for the backend; with a base, return their address
 * (the layout is computed once without a base to size the allocation).
 */
static float *
place(char *base, size_t *off, size_t n, size_t align)
{
	float	   *p = base ? (float *) (base + *off) : NULL;

	*off += (n * sizeof(float) + align - 1) / align * align;
	return p;
}

/* Lay out every buffer at base (NULL: just count); returns the bytes needed. */
static size_t
layout(dl_train_acts *a, char *base)
{
	const dl_config *c = &a->model->cfg;
	size_t		al = a->model->be->alignment,
				T = a->max_tokens,
				E = c->n_embd,
				F = c->n_inner,
				off = 0;
	dl_block	block = config_block(c);

	for (int l = 0; l <= c->n_layer; l++)
	{
		layer_acts *L = &a->layers[l];

		L->x = place(base, &off, T * E, al);
		if (l == c->n_layer)
			break;
		/* kept per layer even when checkpointing: the recomputation leaves out products */
		if (a->lora)
			L->lora_u = place(base, &off, T * a->lora->r * a->lora->ntargets, al);
		if (a->checkpoint && l > 0)
		{
			layer_acts	shared = a->layers[0];

			shared.x = L->x;
			shared.lora_u = L->lora_u;
			*L = shared;
			continue;
		}
		L->ln1 = place(base, &off, T * E, al);
		L->ln1_mean = place(base, &off, T, al);
		L->ln1_rstd = place(base, &off, T, al);
		L->qkv = place(base, &off, T * 3 * E, al);
		L->att = place(base, &off, T * E, al);
		L->lse = place(base, &off, T * c->n_head, al);
		if (block != DL_BLOCK_SHARED_NORM)
		{
			L->ln2 = place(base, &off, T * E, al);
			L->ln2_mean = place(base, &off, T, al);
			L->ln2_rstd = place(base, &off, T, al);
		}
		if (block == DL_BLOCK_SEQUENTIAL)
			L->xmid = place(base, &off, T * E, al);
		L->fc = place(base, &off, T * F, al);
	}
	a->gelu = place(base, &off, T * F, al);
	a->dx = place(base, &off, T * E, al);
	a->dln = place(base, &off, T * E, al);
	a->datt = place(base, &off, T * E, al);
	a->dqkv = place(base, &off, T * 3 * E, al);
	a->dfc = place(base, &off, T * F, al);
	a->xr = place(base, &off, T * E, al);
	a->lnf = place(base, &off, T * E, al);
	a->lnf_mean = place(base, &off, T, al);
	a->lnf_rstd = place(base, &off, T, al);
	a->logits = place(base, &off, (size_t) a->logit_rows * c->vocab_size, al);
	a->losses = place(base, &off, T, al);
	if (a->lora && a->lora->dropout > 0.0f)
		a->lora_ws = place(base, &off, T * (F > E ? F : E), al);
	if (a->lora && a->lora->ntok)
		a->tok_u = place(base, &off, (size_t) a->logit_rows * a->lora->ntok, al);
	a->attn_ws = place(base, &off,
					   (a->model->be->attention_train_workspace(a->model->be, a->max_len, c->n_head) +
						sizeof(float) - 1) / sizeof(float), al);
	/* int32 and float have the same size: the metadata is carved the same way */
	a->meta = (int32_t *) place(base, &off, 8 * T, al);
	return off;
}

dl_status
dl_train_acts_create(dl_model *m, const dl_lora *lora, int max_tokens, int max_len,
					 int checkpoint, dl_train_acts **out, dl_error *err)
{
	const dl_config *cfg = &m->cfg;
	dl_backend *be = m->be;
	dl_train_acts *a;
	size_t		bytes;
	dl_status	st;

	if (be->weight_elem_size != sizeof(float))
	{
		dl_fail(err, DL_EUNSUPPORTED, "training on backend \"%s\" is not supported: its weights are %zu-byte values",
				be->name, be->weight_elem_size);
		return dl_hint(err, "Training needs float32 weights, with gradients laid out like them.");
	}
	if (lora && (lora->model != m || be->lora_forward == NULL))
		return dl_fail(err, lora->model != m ? DL_EINVAL : DL_EUNSUPPORTED,
					   lora->model != m ? "the adapter to train belongs to another model"
					   : "backend \"%s\" does not train LoRA adapters", be->name);
	if (max_tokens < 1 || max_tokens > 1 << 20)
		return dl_fail(err, DL_EINVAL, "tokens per training batch %d is out of range (1 .. %d)",
					   max_tokens, 1 << 20);
	if (max_len < 1 || max_len > cfg->max_pos)
	{
		dl_fail(err, DL_EINVAL, "example length %d is out of range (1 .. %d)", max_len, cfg->max_pos);
		return dl_hint(err, "The model was trained with %d positions.", cfg->max_pos);
	}
	a = calloc(1, sizeof(*a));
	if (a == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating training activations");
	a->model = m;
	a->lora = lora;
	a->trained = lora ? dl_lora_trained(lora) : dl_model_trained(m);
	a->max_tokens = max_tokens;
	a->max_len = max_len < max_tokens ? max_len : max_tokens;
	a->checkpoint = checkpoint != 0;
	a->logit_rows = (be->host_memory ? LOGIT_BUDGET : LOGIT_BUDGET_DEVICE) / cfg->vocab_size;
	a->logit_rows = a->logit_rows < 1 ? 1 : a->logit_rows > max_tokens ? max_tokens : a->logit_rows;
	a->layers = calloc(cfg->n_layer + 1, sizeof(layer_acts));
	a->h_meta = malloc(8 * sizeof(int32_t) * max_tokens);
	a->h_losses = malloc(sizeof(float) * max_tokens);
	a->grad_bufs = calloc(DL_GRAD_SPANS(cfg), sizeof(float *));
	if (a->layers == NULL || a->h_meta == NULL || a->h_losses == NULL || a->grad_bufs == NULL)
	{
		st = dl_fail(err, DL_ENOMEM, "out of memory creating training activations");
		goto fail;
	}
	bytes = layout(a, NULL);
	st = model_alloc(be, bytes, &a->mem, err);
	if (st != DL_OK)
	{
		if (a->checkpoint)
			dl_hint(err, "The activations of a training batch of %d tokens need %zu MB with checkpointing: lower the batch size or the maximum length.",
					max_tokens, bytes >> 20);
		else
		{
			/* the layout of the same batch with checkpointing, to say what it saves */
			a->checkpoint = 1;
			dl_hint(err, "The activations of a training batch of %d tokens need %zu MB, %zu MB with checkpointing: turn it on, or lower the batch size or the maximum length.",
					max_tokens, bytes >> 20, layout(a, NULL) >> 20);
		}
		goto fail;
	}
	a->bytes = bytes;
	layout(a, a->mem);
	*out = a;
	return DL_OK;

fail:
	dl_train_acts_free(a);
	return st;
}

dl_trained
dl_train_acts_trained(const dl_train_acts *a)
{
	return a->trained;
}

size_t
dl_train_acts_bytes(const dl_train_acts *a)
{
	return a->bytes;
}

void
dl_train_acts_free(dl_train_acts *a)
{
	if (a == NULL)
		return;
	a->model->be->free(a->model->be, a->mem);
	free(a->layers);
	free(a->h_meta);
	free(a->h_losses);
	free(a->grad_bufs);
	free(a);
}

/* Check a batch against the model and the activations; counts its tokens. */
static dl_status
check_examples(const dl_model *m, const dl_train_acts *a, const dl_example *batch, int n,
			   int *ntok, dl_error *err)
{
	long long	total = 0;

	for (int i = 0; i < n; i++)
	{
		const dl_example *ex = &batch[i];

		if (ex->n < 1 || ex->n > a->max_len)
		{
			dl_fail(err, DL_EINVAL, "example %d of the batch has %d tokens; the limit is %d",
					i, ex->n, a->max_len);
			return dl_hint(err, "Raise the maximum length, or leave out longer records.");
		}
		if (ex->first_label < 1 || ex->first_label > ex->n)
			return dl_fail(err, DL_EINVAL, "example %d: first label %d is out of range (1 .. %d)",
						   i, ex->first_label, ex->n);
		for (int j = 0; j < ex->n; j++)
			if (ex->ids[j] < 0 || ex->ids[j] >= m->cfg.vocab_size)
				return dl_fail(err, DL_EINVAL, "example %d: token id %d is out of range (0 .. %d)",
							   i, ex->ids[j], m->cfg.vocab_size - 1);
		total += ex->n;
	}
	if (total > a->max_tokens)
	{
		dl_fail(err, DL_EINVAL, "a training batch of %lld tokens exceeds the limit of %d",
				total, a->max_tokens);
		return dl_hint(err, "Lower the batch size, or raise the tokens per batch.");
	}
	*ntok = (int) total;
	return DL_OK;
}

/*
 * The gradient of parameter p: in the buffer of the open span of the trained parameters
 * that holds it, at p's offset within the span; NULL for NULL and for a frozen parameter.
 */
static float *
grad_of(const dl_train_acts *a, float *const *bufs, const void *p)
{
	const dl_trained *t = &a->trained;
	size_t		off = (size_t) ((const char *) p - (const char *) t->mem);

	if (p == NULL || (const char *) p < (const char *) t->mem || off >= t->bytes)
		return NULL;
	for (int s = 0; s < DL_GRAD_SPANS(&a->model->cfg); s++)
		if (bufs[s] && off >= t->spans[2 * s] && off < t->spans[2 * s + 1])
			return (float *) ((char *) bufs[s] + (off - t->spans[2 * s]));
	return NULL;
}

/* The gradients of one layer's parameters, as a dl_layer_params of float32 pointers. */
static dl_layer_params
layer_grads(const dl_train_acts *a, float *const *bufs, const dl_layer_params *L)
{
	dl_layer_params G = {
		grad_of(a, bufs, L->ln1_w), grad_of(a, bufs, L->ln1_b),
		grad_of(a, bufs, L->ln2_w), grad_of(a, bufs, L->ln2_b),
		grad_of(a, bufs, L->qkv_w), grad_of(a, bufs, L->qkv_b),
		grad_of(a, bufs, L->proj_w), grad_of(a, bufs, L->proj_b),
		grad_of(a, bufs, L->fc_in_w), grad_of(a, bufs, L->fc_in_b),
		grad_of(a, bufs, L->fc_out_w), grad_of(a, bufs, L->fc_out_b)
	};

	return G;
}

/* The GELU form of the model. */
static dl_gelu
gelu_form(const dl_model *m)
{
	return m->cfg.act == DL_ACT_GELU_TANH ? DL_GELU_TANH : DL_GELU_ERF;
}

/* Everything one pass needs besides the model and the activations. */
typedef struct pass
{
	int			T;				/* tokens */
	int			R;				/* label rows */
	const int32_t *ids;			/* device */
	const int32_t *pos;
	const int32_t *rows;
	const int32_t *labels;
	dl_spans	spans;
	const dl_grad_sink *sink;	/* NULL: loss only */
	float	  **grads;			/* the open gradient spans' buffers (dl_train_acts') */
} pass;

/* Stage ids, positions, label rows, labels and spans of a checked batch; one upload. */
static dl_status
stage_batch(dl_train_acts *a, const dl_example *batch, int n, int T, pass *ps, dl_error *err)
{
	int32_t    *ids = a->h_meta,
			   *pos = ids + T,
			   *rows = pos + T,
			   *labels = rows + T;
	dl_span    *spans = (dl_span *) (labels + T);
	int			t = 0,
				r = 0;
	dl_status	st;

	for (int i = 0; i < n; i++)
	{
		const dl_example *ex = &batch[i];

		spans[i] = (dl_span) {t, ex->n, 0, 0};
		for (int j = 0; j < ex->n; j++, t++)
		{
			ids[t] = ex->ids[j];
			pos[t] = j;
			/* position j predicts token j + 1 */
			if (j + 1 >= ex->first_label && j + 1 < ex->n)
			{
				rows[r] = t;
				labels[r++] = ex->ids[j + 1];
			}
		}
	}
	/* the host arrays are packed at T; the device copy sits at the same offsets */
	st = a->model->be->upload(a->model->be, a->meta, a->h_meta,
							  (4 * (size_t) T + 4 * (size_t) n) * sizeof(int32_t), err);
	ps->T = T;
	ps->R = r;
	ps->ids = a->meta;
	ps->pos = a->meta + T;
	ps->rows = a->meta + 2 * T;
	ps->labels = a->meta + 3 * T;
	ps->spans = (dl_spans) {n, spans, (const dl_span *) (a->meta + 4 * T)};
	return st;
}

/*
 * The trained adapter's target t of layer l: its matrices (with the open gradient spans
 * and its dropout in a training pass), and its low-rank product u.
 */
static dl_lora_mats
adapter_mats(const dl_train_acts *a, const pass *ps, int l, int t, float **u)
{
	dl_lora_mats w = lora_mats(a->lora, l, t, ps->sink ? ps->grads : NULL);

	/* a mask per pass, layer and target; the recomputation of a layer draws it again */
	w.seed = a->passes << 20 | (uint64_t) l << 4 | (uint64_t) t;
	*u = a->layers[l].lora_u + (size_t) t * ps->T * a->lora->r;
	return w;
}

/* The adapter's update of product p of layer l: out (rows ldo floats apart) += of in. */
static void
adapter_forward(dl_model *m, dl_train_acts *a, const pass *ps, int l, dl_lora_product p,
				float *out, int ldo, const float *in)
{
	for (int t = 0; a->lora && t < a->lora->ntargets; t++)
	{
		const dl_lora_target *tg = &a->lora->targets[t];
		float	   *u;
		dl_lora_mats w = adapter_mats(a, ps, l, t, &u);

		dl_lora_seg seg = {w, 0, ps->T, tg->col0, tg->n_out};

		if (tg->product == p)
			m->be->lora_forward(m->be, out, ldo, u, in, tg->n_in, &seg, 1, a->lora_ws);
	}
}

/* Its backward: din += through it from dout (rows ldo apart); its gradients accumulate. */
static void
adapter_backward(dl_model *m, dl_train_acts *a, const pass *ps, int l, dl_lora_product p,
				 float *din, const float *dout, int ldo, const float *in)
{
	for (int t = 0; a->lora && t < a->lora->ntargets; t++)
	{
		const dl_lora_target *tg = &a->lora->targets[t];
		float	   *u;
		dl_lora_mats w = adapter_mats(a, ps, l, t, &u);

		if (tg->product == p)
			m->be->lora_backward(m->be, din, dout + tg->col0, ldo, u, in, &w, ps->T, tg->n_in,
								 tg->n_out, a->lora_ws);
	}
}

/* MLP(in) added to out, keeping the pre-activation (all that is done when out is NULL). */
static void
mlp_forward(dl_model *m, dl_train_acts *a, const pass *ps, int l, const float *in, float *out)
{
	dl_backend *be = m->be;
	const dl_layer_params *L = &m->p.layers[l];
	layer_acts *la = &a->layers[l];
	int			T = ps->T,
				E = m->cfg.n_embd,
				F = m->cfg.n_inner;

	be->matmul_forward(be, la->fc, in, L->fc_in_w, L->fc_in_b, T, E, F, 0);
	adapter_forward(m, a, ps, l, DL_LORA_FC_IN, la->fc, F, in);
	if (out == NULL)
		return;
	be->gelu_forward(be, a->gelu, la->fc, (size_t) T * F, gelu_form(m));
	be->matmul_forward(be, out, a->gelu, L->fc_out_w, L->fc_out_b, T, F, E, 1);
	adapter_forward(m, a, ps, l, DL_LORA_FC_OUT, out, E, a->gelu);
}

/*
 * One block forward from layers[l].x, keeping its activations, to xo: layers[l + 1].x,
 * or NULL when backward recomputes the activations and the output is already kept.
 */
static void
layer_forward(dl_model *m, dl_train_acts *a, int l, const pass *ps, float *xo)
{
	const dl_config *cfg = &m->cfg;
	dl_backend *be = m->be;
	const dl_layer_params *L = &m->p.layers[l];
	layer_acts *la = &a->layers[l];
	int			T = ps->T,
				E = cfg->n_embd,
				D = cfg->head_dim;
	size_t		row_bytes = (size_t) T * E * sizeof(float);

	be->layernorm_forward(be, la->ln1, la->ln1_mean, la->ln1_rstd, la->x, L->ln1_w, L->ln1_b,
						  T, E, cfg->ln_eps);
	be->matmul_forward(be, la->qkv, la->ln1, L->qkv_w, L->qkv_b, T, E, 3 * E, 0);
	adapter_forward(m, a, ps, l, DL_LORA_QKV, la->qkv, 3 * E, la->ln1);
	if (cfg->rotary_dim > 0)
		be->rotary_forward(be, la->qkv, 3 * E, T, 2 * cfg->n_head, D, cfg->rotary_dim,
						   cfg->rotary_interleaved, ps->pos, m->rope);
	be->attention_train_forward(be, la->att, la->lse, la->qkv, &ps->spans, cfg->n_head, D,
								1.0f / sqrtf((float) D), a->attn_ws);
	dl_block	block = config_block(cfg);

	if (block == DL_BLOCK_SEQUENTIAL)
	{
		/* LN2 reads x + attention, kept even without xo */
		be->copy(be, la->xmid, la->x, row_bytes);
		be->matmul_forward(be, la->xmid, la->att, L->proj_w, L->proj_b, T, E, E, 1);
		adapter_forward(m, a, ps, l, DL_LORA_PROJ, la->xmid, E, la->att);
		be->layernorm_forward(be, la->ln2, la->ln2_mean, la->ln2_rstd, la->xmid, L->ln2_w,
							  L->ln2_b, T, E, cfg->ln_eps);
		if (xo)
			be->copy(be, xo, la->xmid, row_bytes);
	}
	else
	{
		if (block == DL_BLOCK_PARALLEL)
			be->layernorm_forward(be, la->ln2, la->ln2_mean, la->ln2_rstd, la->x, L->ln2_w,
								  L->ln2_b, T, E, cfg->ln_eps);
		if (xo)
		{
			be->copy(be, xo, la->x, row_bytes);
			be->matmul_forward(be, xo, la->att, L->proj_w, L->proj_b, T, E, E, 1);
			adapter_forward(m, a, ps, l, DL_LORA_PROJ, xo, E, la->att);
		}
	}
	mlp_forward(m, a, ps, l, block == DL_BLOCK_SHARED_NORM ? la->ln1 : la->ln2, xo);
}

/*
 * The output layer on the label rows: final norm, logits and cross-entropy a chunk of
 * rows at a time; with gradients, each chunk's logits turn into their gradient at once
 * and flow back through lm_head and the final norm, and dx receives the gradient of
 * the residual stream (zero on rows without a label).
 */
static void
head_pass(dl_model *m, dl_train_acts *a, const pass *ps)
{
	const dl_config *cfg = &m->cfg;
	dl_backend *be = m->be;
	int			E = cfg->n_embd,
				V = cfg->vocab_size,
				R = ps->R;
	float	  **g = ps->sink ? ps->grads : NULL;

	be->gather_rows_forward(be, a->xr, a->layers[cfg->n_layer].x, ps->rows, R, E);
	be->layernorm_forward(be, a->lnf, a->lnf_mean, a->lnf_rstd, a->xr, m->p.lnf_w, m->p.lnf_b,
						  R, E, cfg->ln_eps);
	if (g)
		be->zero(be, a->dln, (size_t) R * E * sizeof(float));
	for (int r0 = 0; r0 < R; r0 += a->logit_rows)
	{
		int			nr = R - r0 < a->logit_rows ? R - r0 : a->logit_rows;
		float	   *lnf = a->lnf + (size_t) r0 * E;

		dl_lora_run run = {a->lora, 0, nr};
		dl_lora_tokens tk = lora_tokens(a->lora, g);

		be->matmul_forward(be, a->logits, lnf, m->p.lm_head, m->p.lm_head_b, nr, E, V, 0);
		if (tk.n)
			lora_tokens_logits(be, a->logits, V, a->tok_u, lnf, E, &run, 1);
		be->crossentropy_forward(be, a->losses + r0, g ? a->logits : NULL, a->logits,
								 ps->labels + r0, nr, V);
		if (g == NULL)
			continue;
		be->matmul_backward(be, a->dln + (size_t) r0 * E, grad_of(a, g, m->p.lm_head),
							grad_of(a, g, m->p.lm_head_b), a->logits, lnf, m->p.lm_head,
							nr, E, V);
		lora_tokens_logits_backward(be, &tk, a->dln + (size_t) r0 * E, a->logits, V, a->tok_u,
									lnf, nr, E);
	}
	if (g == NULL)
		return;
	/* datt holds the gradient of the gathered rows until the layers need it */
	be->zero(be, a->datt, (size_t) R * E * sizeof(float));
	be->layernorm_backward(be, a->datt, grad_of(a, g, m->p.lnf_w), grad_of(a, g, m->p.lnf_b),
						   a->dln, a->xr, a->lnf_mean, a->lnf_rstd, m->p.lnf_w, R, E);
	be->zero(be, a->dx, (size_t) ps->T * E * sizeof(float));
	be->embedding_backward(be, a->dx, a->datt, ps->rows, R, E);
}

/* MLP backward: dx is the gradient of its output; dln += the gradient of its input. */
static void
mlp_backward(dl_model *m, dl_train_acts *a, const pass *ps, int l, const dl_layer_params *G,
			 const float *in)
{
	dl_backend *be = m->be;
	const dl_layer_params *L = &m->p.layers[l];
	const layer_acts *la = &a->layers[l];
	int			T = ps->T,
				E = m->cfg.n_embd,
				F = m->cfg.n_inner;
	size_t		n = (size_t) T * F;

	be->gelu_forward(be, a->gelu, la->fc, n, gelu_form(m));
	be->zero(be, a->dfc, n * sizeof(float));
	be->matmul_backward(be, a->dfc, G->fc_out_w, G->fc_out_b, a->dx, a->gelu, L->fc_out_w,
						T, F, E);
	adapter_backward(m, a, ps, l, DL_LORA_FC_OUT, a->dfc, a->dx, E, a->gelu);
	be->zero(be, a->gelu, n * sizeof(float));
	be->gelu_backward(be, a->gelu, la->fc, a->dfc, n, gelu_form(m));
	be->matmul_backward(be, a->dln, G->fc_in_w, G->fc_in_b, a->gelu, in, L->fc_in_w, T, E, F);
	adapter_backward(m, a, ps, l, DL_LORA_FC_IN, a->dln, a->gelu, F, in);
}

/* The attention projection's backward: datt = the gradient of the attention output. */
static void
proj_backward(dl_model *m, dl_train_acts *a, const pass *ps, int l, const dl_layer_params *G)
{
	dl_backend *be = m->be;
	const layer_acts *la = &a->layers[l];
	int			T = ps->T,
				E = m->cfg.n_embd;

	be->zero(be, a->datt, (size_t) T * E * sizeof(float));
	be->matmul_backward(be, a->datt, G->proj_w, G->proj_b, a->dx, la->att,
						m->p.layers[l].proj_w, T, E, E);
	adapter_backward(m, a, ps, l, DL_LORA_PROJ, a->datt, a->dx, E, la->att);
}

/* Attention backward from datt down to LN1's output: dln += its gradient. */
static void
attn_backward(dl_model *m, dl_train_acts *a, const pass *ps, int l, const dl_layer_params *G)
{
	const dl_config *cfg = &m->cfg;
	dl_backend *be = m->be;
	const dl_layer_params *L = &m->p.layers[l];
	const layer_acts *la = &a->layers[l];
	int			T = ps->T,
				E = cfg->n_embd,
				D = cfg->head_dim;

	be->zero(be, a->dqkv, (size_t) T * 3 * E * sizeof(float));
	be->attention_backward(be, a->dqkv, a->datt, la->qkv, la->att, la->lse, &ps->spans,
						   cfg->n_head, D, 1.0f / sqrtf((float) D), a->attn_ws);
	if (cfg->rotary_dim > 0)
		be->rotary_backward(be, a->dqkv, 3 * E, T, 2 * cfg->n_head, D, cfg->rotary_dim,
							cfg->rotary_interleaved, ps->pos, m->rope);
	be->matmul_backward(be, a->dln, G->qkv_w, G->qkv_b, a->dqkv, la->ln1, L->qkv_w, T, E, 3 * E);
	adapter_backward(m, a, ps, l, DL_LORA_QKV, a->dln, a->dqkv, 3 * E, la->ln1);
}

/* One block backward: dx goes from the gradient of its output to that of its input. */
static void
layer_backward(dl_model *m, dl_train_acts *a, int l, const pass *ps)
{
	const dl_config *cfg = &m->cfg;
	dl_backend *be = m->be;
	const dl_layer_params *L = &m->p.layers[l];
	dl_layer_params G = layer_grads(a, ps->grads, L);
	const layer_acts *la = &a->layers[l];
	int			T = ps->T,
				E = cfg->n_embd;
	size_t		row_bytes = (size_t) T * E * sizeof(float);

	switch (config_block(cfg))
	{
		case DL_BLOCK_SHARED_NORM:
			/* both branches read LN1's output: their gradients meet in dln */
			proj_backward(m, a, ps, l, &G);
			be->zero(be, a->dln, row_bytes);
			mlp_backward(m, a, ps, l, &G, la->ln1);
			attn_backward(m, a, ps, l, &G);
			break;
		case DL_BLOCK_PARALLEL:
			proj_backward(m, a, ps, l, &G);
			be->zero(be, a->dln, row_bytes);
			mlp_backward(m, a, ps, l, &G, la->ln2);
			be->layernorm_backward(be, a->dx, G.ln2_w, G.ln2_b, a->dln, la->x, la->ln2_mean,
								   la->ln2_rstd, L->ln2_w, T, E);
			be->zero(be, a->dln, row_bytes);
			attn_backward(m, a, ps, l, &G);
			break;
		case DL_BLOCK_SEQUENTIAL:
			be->zero(be, a->dln, row_bytes);
			mlp_backward(m, a, ps, l, &G, la->ln2);
			/* dx becomes the gradient of the mid-layer residual */
			be->layernorm_backward(be, a->dx, G.ln2_w, G.ln2_b, a->dln, la->xmid, la->ln2_mean,
								   la->ln2_rstd, L->ln2_w, T, E);
			proj_backward(m, a, ps, l, &G);
			be->zero(be, a->dln, row_bytes);
			attn_backward(m, a, ps, l, &G);
			break;
	}
	be->layernorm_backward(be, a->dx, G.ln1_w, G.ln1_b, a->dln, la->x, la->ln1_mean,
						   la->ln1_rstd, L->ln1_w, T, E);
}

/* Open gradient span s: backward accumulates into the sink's buffer for it from now. */
static void
span_open(const pass *ps, int s)
{
	ps->grads[s] = ps->sink->open(ps->sink->arg, s);
}

/* Close gradient span s: its gradients are complete. */
static dl_status
span_close(const pass *ps, int s, dl_error *err)
{
	ps->grads[s] = NULL;
	return ps->sink->close(ps->sink->arg, s, err);
}

dl_status
dl_model_backward(dl_model *m, dl_train_acts *a, const dl_example *batch, int n,
				  const dl_grad_sink *sink, double *loss_sum, int64_t *n_labels, dl_error *err)
{
	const dl_config *cfg = &m->cfg;
	dl_backend *be = m->be;
	pass		ps = {.sink = sink, .grads = a->grad_bufs};
	int			T = 0,
				head = 0,
				embedding = DL_GRAD_SPANS(cfg) - 1;
	dl_status	st = DL_OK;

	*loss_sum = 0.0;
	*n_labels = 0;
	/* no example (a rank with fewer micro-batches than its peers) or no label: no work */
	if (n > 0)
	{
		st = check_examples(m, a, batch, n, &T, err);
		if (st == DL_OK)
			st = stage_batch(a, batch, n, T, &ps, err);
		if (st != DL_OK)
			return st;
	}
	else if (sink == NULL)
		return dl_fail(err, DL_EINVAL, "a training batch needs at least one example");
	if (ps.R == 0)
	{
		/* a sink still sees every span, in order: ranks sum them together */
		for (int s = 0; sink && s <= embedding && st == DL_OK; s++)
		{
			span_open(&ps, s);
			st = span_close(&ps, s, err);
		}
		return st;
	}

	a->passes += sink != NULL;
	be->embedding_forward(be, a->layers[0].x, m->p.wte, ps.ids, T, cfg->n_embd);
	if (a->lora)
		lora_tokens_embed(be, a->layers[0].x, cfg->n_embd, a->h_meta,
						  &(dl_lora_run) {a->lora, 0, T}, 1);
	for (int l = 0; l < cfg->n_layer; l++)
		layer_forward(m, a, l, &ps, a->layers[l + 1].x);
	if (sink)
	{
		/* a tied output layer adds to the embedding's gradient: then it opens first */
		if (cfg->tie_embeddings)
			span_open(&ps, embedding);
		span_open(&ps, head);
	}
	head_pass(m, a, &ps);
	if (sink)
	{
		st = span_close(&ps, head, err);
		for (int l = cfg->n_layer - 1; l >= 0 && st == DL_OK; l--)
		{
			int			s = cfg->n_layer - l;

			span_open(&ps, s);
			/* checkpointing: the shared buffers still hold the last layer's activations */
			if (a->checkpoint && l < cfg->n_layer - 1)
				layer_forward(m, a, l, &ps, NULL);
			layer_backward(m, a, l, &ps);
			st = span_close(&ps, s, err);
		}
		if (st == DL_OK)
		{
			if (!cfg->tie_embeddings)
				span_open(&ps, embedding);
			float	   *dwte = grad_of(a, ps.grads, m->p.wte);
			dl_lora_tokens tk = lora_tokens(a->lora, ps.grads);

			if (dwte)
				be->embedding_backward(be, dwte, a->dx, ps.ids, T, cfg->n_embd);
			lora_tokens_embed_backward(be, &tk, a->dx, cfg->n_embd, a->h_meta, T);
			st = span_close(&ps, embedding, err);
		}
		/* a failed close leaves spans open: none is open at the next pass */
		memset(a->grad_bufs, 0, sizeof(float *) * DL_GRAD_SPANS(cfg));
		if (st != DL_OK)
			return st;
	}

	st = be->download(be, a->h_losses, a->losses, (size_t) ps.R * sizeof(float), err);
	if (st != DL_OK)
		return st;
	for (int r = 0; r < ps.R; r++)
		*loss_sum += a->h_losses[r];
	*n_labels = ps.R;
	return DL_OK;
}
