/*
 * model_forward.c: the KV cache with its activation buffers, and the forward pass of
 * GPT-J and GPT-NeoX over a batch of sequences (transformers' modeling_gptj.py and
 * modeling_gpt_neox.py, in float32).
 *
 * Per layer, with E the width and the rows of all sequences stacked (T rows):
 *   a = LN1(x); qkv = a Wqkv^T (+b); rotary on q and k; attention over the cache
 *   GPT-J:           x += proj(att) + MLP(a)            (one norm, parallel)
 *   NeoX parallel:   x += proj(att) + MLP(LN2(x_in))
 *   NeoX sequential: x += proj(att); x += MLP(LN2(x))
 * The residual additions are the matrix products' accumulate mode. Logits are computed
 * only for the rows asked for, after the final norm on those rows alone; generation
 * samples them on the backend and downloads only the token ids.
 */
#include "lora.h"
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The buffers of a cache's activation allocation. */
#define NBUFS 13

/* Round bytes up to the backend's alignment. */
static size_t
aligned(const dl_backend *be, size_t bytes)
{
	return (bytes + be->alignment - 1) / be->alignment * be->alignment;
}

dl_status
dl_kv_cache_create(dl_model *m, int n_slots, int max_ctx, int max_tokens,
				   dl_kv_cache **out, dl_error *err)
{
	const dl_config *cfg = &m->cfg;
	dl_backend *be = m->be;
	dl_kv_cache *c;
	size_t		E = cfg->n_embd,
				F = cfg->n_inner,
				V = cfg->vocab_size,
				T,
				R,
				sizes[NBUFS],
				total = 0;
	char	   *at[NBUFS];
	dl_status	st;

	if (n_slots < 1 || n_slots > 65536)
		return dl_fail(err, DL_EINVAL, "number of sequences %d is out of range (1 .. 65536)", n_slots);
	if (max_ctx < 1 || max_ctx > cfg->max_pos)
	{
		dl_fail(err, DL_EINVAL, "context length %d is out of range (1 .. %d)", max_ctx, cfg->max_pos);
		return dl_hint(err, "The model was trained with %d positions.", cfg->max_pos);
	}
	if (max_tokens < 1 || max_tokens > 1 << 20)
		return dl_fail(err, DL_EINVAL, "tokens per forward pass %d is out of range (1 .. %d)",
					   max_tokens, 1 << 20);
	c = calloc(1, sizeof(*c));
	if (c == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating a KV cache");
	c->model = m;
	c->n_slots = n_slots;
	c->max_ctx = max_ctx;
	c->max_tokens = max_tokens;
	/* enough rows for one logit per sequence in one product; more are done in chunks */
	c->logit_rows = n_slots < 32 ? 32 : n_slots;
	T = max_tokens;
	R = c->logit_rows;

	c->layer_stride = (size_t) n_slots * max_ctx * E * be->kv_elem_size;
	st = model_alloc(be, 2 * c->layer_stride * cfg->n_layer, &c->kv, err);
	if (st != DL_OK)
	{
		dl_hint(err, "The KV cache of %d sequences of %d tokens needs %zu MB.", n_slots, max_ctx,
				2 * c->layer_stride * cfg->n_layer >> 20);
		goto fail;
	}

	/* every activation buffer carved from one allocation, the metadata last */
	sizes[0] = T * E * sizeof(float);	/* x */
	sizes[1] = T * E * sizeof(float);	/* ln */
	sizes[2] = T * 3 * E * sizeof(float);	/* qkv */
	sizes[3] = T * E * sizeof(float);	/* att */
	sizes[4] = T * F * sizeof(float);	/* fc */
	sizes[5] = R * E * sizeof(float);	/* lg_in */
	sizes[6] = R * V * sizeof(float);	/* logits */
	sizes[7] = be->attention_workspace(be, max_ctx);
	sizes[8] = R * sizeof(dl_sample_row);	/* sampling rows */
	sizes[9] = R * sizeof(int32_t);	/* sampled tokens */
	sizes[10] = be->sample_workspace(be, R, V);
	c->meta_bytes = (3 * T + 4 * (size_t) n_slots) * sizeof(int32_t);
	sizes[11] = c->meta_bytes;
	sizes[12] = (T * DL_LORA_MAX_RANK * DL_LORA_PER_PRODUCT > R * DL_LORA_MAX_TOKENS ?
				 T * DL_LORA_MAX_RANK * DL_LORA_PER_PRODUCT : R * DL_LORA_MAX_TOKENS) * sizeof(float);	/* lora_u */
	for (int i = 0; i < NBUFS; i++)
		total += aligned(be, sizes[i]);
	st = model_alloc(be, total, &c->act, err);
	if (st != DL_OK)
		goto fail;
	total = 0;
	for (int i = 0; i < NBUFS; i++)
	{
		at[i] = (char *) c->act + total;
		total += aligned(be, sizes[i]);
	}
	c->x = (float *) at[0];
	c->ln = (float *) at[1];
	c->qkv = (float *) at[2];
	c->att = (float *) at[3];
	c->fc = (float *) at[4];
	c->lg_in = (float *) at[5];
	c->logits = (float *) at[6];
	c->attn_ws = at[7];
	c->sample_rows = (dl_sample_row *) at[8];
	c->tokens = (int32_t *) at[9];
	c->sample_ws = at[10];
	c->meta = (int32_t *) at[11];
	c->lora_u = (float *) at[12];
	c->h_meta = malloc(c->meta_bytes);
	c->h_runs = malloc(n_slots * sizeof(dl_lora_run));
	if (c->h_meta == NULL || c->h_runs == NULL)
	{
		st = dl_fail(err, DL_ENOMEM, "out of memory creating a KV cache");
		goto fail;
	}
	*out = c;
	return DL_OK;

fail:
	dl_kv_cache_free(c);
	return st;
}

void
dl_kv_cache_free(dl_kv_cache *c)
{
	if (c == NULL)
		return;
	c->model->be->free(c->model->be, c->kv);
	c->model->be->free(c->model->be, c->act);
	free(c->h_meta);
	free(c->h_runs);
	free(c);
}

/* Check a batch against the model and the cache; counts its tokens and logit rows. */
static dl_status
check_batch(const dl_model *m, const dl_kv_cache *c, const dl_seq *seqs, int n,
			int *ntok, int *nrows, dl_error *err)
{
	*ntok = 0;
	*nrows = 0;
	if (n < 1 || n > c->n_slots)
		return dl_fail(err, DL_EINVAL, "a forward pass needs 1 to %d sequences, not %d", c->n_slots, n);
	for (int i = 0; i < n; i++)
	{
		const dl_seq *s = &seqs[i];

		if (s->slot < 0 || s->slot >= c->n_slots)
			return dl_fail(err, DL_EINVAL, "cache slot %d is out of range (0 .. %d)", s->slot, c->n_slots - 1);
		for (int j = 0; j < i; j++)
			if (seqs[j].slot == s->slot)
				return dl_fail(err, DL_EINVAL, "cache slot %d appears twice in one batch", s->slot);
		if (s->n_tokens < 1)
			return dl_fail(err, DL_EINVAL, "sequence %d of the batch has no tokens", i);
		if (s->pos < 0 || s->pos > c->max_ctx - s->n_tokens)
		{
			dl_fail(err, DL_EINVAL, "sequence %d: positions %d .. %d exceed the context of %d tokens",
					i, s->pos, s->pos + s->n_tokens - 1, c->max_ctx);
			return dl_hint(err, "Shorten the prompt, or ask for fewer new tokens.");
		}
		for (int j = 0; j < s->n_tokens; j++)
			if (s->ids[j] < 0 || s->ids[j] >= m->cfg.vocab_size)
				return dl_fail(err, DL_EINVAL, "token id %d is out of range (0 .. %d)",
							   s->ids[j], m->cfg.vocab_size - 1);
		if (s->lora && s->lora->model != m)
		{
			dl_fail(err, DL_EINVAL, "sequence %d: its adapter belongs to another model", i);
			return dl_hint(err, "An adapter runs only on the base model it was loaded for.");
		}
		if (s->lora && m->be->lora_forward == NULL)
			return dl_fail(err, DL_EUNSUPPORTED, "backend \"%s\" does not run LoRA adapters",
						   m->be->name);
		*ntok += s->n_tokens;
		*nrows += s->want == DL_LOGITS_ALL ? s->n_tokens : s->want == DL_LOGITS_LAST ? 1 : 0;
	}
	if (*ntok > c->max_tokens)
		return dl_fail(err, DL_EINVAL, "a forward pass of %d tokens exceeds the limit of %d",
					   *ntok, c->max_tokens);
	return DL_OK;
}

/* The sequences of a pass, for the adapters they run with. */
typedef struct batch
{
	const dl_seq *seqs;
	const dl_span *spans;		/* host: their rows */
	int			n;
	int			adapted;		/* some sequence has an adapter */
} batch;

/*
 * The runs of b's sequences with adapters over rows [r0, r0 + nr) of its token rows, or
 * of its logit rows with logits, into runs (b->n at most), rows counted from r0.
 */
static int
adapter_runs(const batch *b, int logits, int r0, int nr, dl_lora_run *runs)
{
	int			n = 0,
				at = 0;

	for (int i = 0; i < b->n; i++)
	{
		const dl_seq *s = &b->seqs[i];
		int			k = !logits || s->want == DL_LOGITS_ALL ? s->n_tokens : s->want == DL_LOGITS_LAST,
					lo = at > r0 ? at : r0,
					hi = at + k < r0 + nr ? at + k : r0 + nr;

		if (s->lora && lo < hi)
			runs[n++] = (dl_lora_run) {s->lora, lo - r0, hi - lo};
		at += k;
	}
	return n;
}

/* segments of one lora_forward call in inference; more take several */
#define SEGS_PER_CALL 64

/*
 * The adapters' updates of product p of layer l: out (rows ldo floats apart) gets each
 * adapter's low-rank product of in over the rows of each run of sequences that share it
 * (Punica's segments; the scheduler's order decides how long the runs are), all in one
 * backend operation so that the runs share out the threads or the GPU.
 */
static void
adapters_forward(dl_model *m, dl_kv_cache *c, const batch *b, int l, dl_lora_product p,
				 float *out, int ldo, const float *in)
{
	dl_lora_seg segs[SEGS_PER_CALL];
	int			nseg = 0,
				K = 0;

	for (int i = 0, j; b->adapted && i < b->n; i = j)
	{
		const dl_lora *a = b->seqs[i].lora;
		int			first = b->spans[i].first;

		for (j = i + 1; j < b->n && b->seqs[j].lora == a; j++)
			;
		for (int t = 0; a && t < a->ntargets; t++)
		{
			const dl_lora_target *tg = &a->targets[t];

			if (tg->product != p)
				continue;
			if (nseg == SEGS_PER_CALL)
			{
				m->be->lora_forward(m->be, out, ldo, c->lora_u, in, K, segs, nseg, NULL);
				nseg = 0;
			}
			segs[nseg++] = (dl_lora_seg) {lora_mats(a, l, t, NULL), first,
				b->spans[j - 1].first + b->spans[j - 1].len - first, tg->col0, tg->n_out};
			K = tg->n_in;
		}
	}
	if (nseg > 0)
		m->be->lora_forward(m->be, out, ldo, c->lora_u, in, K, segs, nseg, NULL);
}

/* MLP(in) added to x: x += fc_out(gelu(fc_in(in))). */
static void
mlp_forward(dl_model *m, dl_kv_cache *c, const batch *b, int l, const float *in, int T)
{
	dl_backend *be = m->be;
	const dl_layer_params *L = &m->p.layers[l];
	int			E = m->cfg.n_embd,
				F = m->cfg.n_inner;

	be->matmul_forward(be, c->fc, in, L->fc_in_w, L->fc_in_b, T, E, F, 0);
	adapters_forward(m, c, b, l, DL_LORA_FC_IN, c->fc, F, in);
	be->gelu_forward(be, c->fc, c->fc, (size_t) T * F,
					 m->cfg.act == DL_ACT_GELU_TANH ? DL_GELU_TANH : DL_GELU_ERF);
	be->matmul_forward(be, c->x, c->fc, L->fc_out_w, L->fc_out_b, T, F, E, 1);
	adapters_forward(m, c, b, l, DL_LORA_FC_OUT, c->x, E, c->fc);
}

/* The attention's output projection added to x, with the adapters'. */
static void
proj_forward(dl_model *m, dl_kv_cache *c, const batch *b, int l, int T)
{
	const dl_layer_params *L = &m->p.layers[l];
	int			E = m->cfg.n_embd;

	m->be->matmul_forward(m->be, c->x, c->att, L->proj_w, L->proj_b, T, E, E, 1);
	adapters_forward(m, c, b, l, DL_LORA_PROJ, c->x, E, c->att);
}

/*
 * The forward pass, then per chunk of logit_rows wanted rows: their logits downloaded
 * to logits (host [R, V]), or with rows, sampled on the backend and their tokens
 * downloaded to tokens (host [R]).
 */
static dl_status
forward(dl_model *m, dl_kv_cache *c, const dl_seq *seqs, int n, float *logits,
		const dl_sample_row *rows, int32_t *tokens, dl_error *err)
{
	const dl_config *cfg = &m->cfg;
	dl_backend *be = m->be;
	int			E = cfg->n_embd,
				D = cfg->head_dim,
				V = cfg->vocab_size;
	int			T,
				R,
				t = 0,
				r = 0;
	int32_t    *h_ids = c->h_meta,
			   *h_pos,
			   *h_rows;
	dl_span    *h_spans;
	const int32_t *d_ids,
			   *d_pos,
			   *d_rows;
	dl_spans	spans;
	batch		b;
	dl_status	st;

	st = check_batch(m, c, seqs, n, &T, &R, err);
	if (st != DL_OK)
		return st;

	/* stage ids, positions, logit rows and spans; one upload */
	h_pos = h_ids + T;
	h_rows = h_pos + T;
	h_spans = (dl_span *) (h_rows + T);
	for (int i = 0; i < n; i++)
	{
		const dl_seq *s = &seqs[i];

		h_spans[i] = (dl_span) {t, s->n_tokens, s->slot, s->pos};
		for (int j = 0; j < s->n_tokens; j++, t++)
		{
			h_ids[t] = s->ids[j];
			h_pos[t] = s->pos + j;
			if (s->want == DL_LOGITS_ALL || (s->want == DL_LOGITS_LAST && j == s->n_tokens - 1))
				h_rows[r++] = t;
		}
	}
	st = be->upload(be, c->meta, c->h_meta, (3 * (size_t) T + 4 * (size_t) n) * sizeof(int32_t), err);
	if (st != DL_OK)
		return st;
	d_ids = c->meta;
	d_pos = d_ids + T;
	d_rows = d_pos + T;
	spans = (dl_spans) {n, h_spans, (const dl_span *) (d_rows + T)};
	b = (batch) {seqs, h_spans, n, 0};
	for (int i = 0; i < n; i++)
		b.adapted |= seqs[i].lora != NULL;

	be->embedding_forward(be, c->x, m->p.wte, d_ids, T, E);
	if (b.adapted)
		lora_tokens_embed(be, c->x, E, h_ids, c->h_runs, adapter_runs(&b, 0, 0, T, c->h_runs));
	for (int l = 0; l < cfg->n_layer; l++)
	{
		const dl_layer_params *L = &m->p.layers[l];
		char	   *k_cache = (char *) c->kv + l * c->layer_stride;
		char	   *v_cache = k_cache + cfg->n_layer * c->layer_stride;

		be->layernorm_forward(be, c->ln, NULL, NULL, c->x, L->ln1_w, L->ln1_b, T, E, cfg->ln_eps);
		be->matmul_forward(be, c->qkv, c->ln, L->qkv_w, L->qkv_b, T, E, 3 * E, 0);
		adapters_forward(m, c, &b, l, DL_LORA_QKV, c->qkv, 3 * E, c->ln);
		/* q and k are adjacent in each row: 2 * n_head heads of one rotation */
		if (cfg->rotary_dim > 0)
			be->rotary_forward(be, c->qkv, 3 * E, T, 2 * cfg->n_head, D, cfg->rotary_dim,
							   cfg->rotary_interleaved, d_pos, m->rope);
		be->attention_forward(be, c->att, c->qkv, k_cache, v_cache, c->max_ctx, &spans,
							  cfg->n_head, D, 1.0f / sqrtf((float) D), c->attn_ws);
		switch (config_block(cfg))
		{
			case DL_BLOCK_SHARED_NORM:
				/* one norm feeds both branches */
				proj_forward(m, c, &b, l, T);
				break;
			case DL_BLOCK_PARALLEL:
				/* the MLP sees the layer's input: normalise it before x changes */
				be->layernorm_forward(be, c->ln, NULL, NULL, c->x, L->ln2_w, L->ln2_b, T, E, cfg->ln_eps);
				proj_forward(m, c, &b, l, T);
				break;
			case DL_BLOCK_SEQUENTIAL:
				proj_forward(m, c, &b, l, T);
				be->layernorm_forward(be, c->ln, NULL, NULL, c->x, L->ln2_w, L->ln2_b, T, E, cfg->ln_eps);
				break;
		}
		mlp_forward(m, c, &b, l, c->ln, T);
	}

	/* logits of the wanted rows, logit_rows at a time */
	for (int r0 = 0; r0 < R; r0 += c->logit_rows)
	{
		int			nr = R - r0 < c->logit_rows ? R - r0 : c->logit_rows;

		be->gather_rows_forward(be, c->lg_in, c->x, d_rows + r0, nr, E);
		be->layernorm_forward(be, c->lg_in, NULL, NULL, c->lg_in, m->p.lnf_w, m->p.lnf_b, nr, E,
							  cfg->ln_eps);
		be->matmul_forward(be, c->logits, c->lg_in, m->p.lm_head, m->p.lm_head_b, nr, E, V, 0);
		if (b.adapted)
			lora_tokens_logits(be, c->logits, V, c->lora_u, c->lg_in, E, c->h_runs,
							   adapter_runs(&b, 1, r0, nr, c->h_runs));
		if (rows)
		{
			st = be->upload(be, c->sample_rows, rows + r0, nr * sizeof(dl_sample_row), err);
			if (st != DL_OK)
				return st;
			be->sample_forward(be, c->tokens, c->logits, c->sample_rows, nr, V, c->sample_ws);
			st = be->download(be, tokens + r0, c->tokens, nr * sizeof(int32_t), err);
		}
		else
			st = be->download(be, logits + (size_t) r0 * V, c->logits,
							  (size_t) nr * V * sizeof(float), err);
		if (st != DL_OK)
			return st;
	}
	return R ? DL_OK : be->synchronize(be, err);
}

dl_status
dl_model_forward(dl_model *m, dl_kv_cache *c, const dl_seq *seqs, int n, float *logits,
				 dl_error *err)
{
	return forward(m, c, seqs, n, logits, NULL, NULL, err);
}

dl_status
dl_model_sample(dl_model *m, dl_kv_cache *c, const dl_seq *seqs, int n,
				const dl_sample_row *rows, int32_t *tokens, dl_error *err)
{
	return forward(m, c, seqs, n, NULL, rows, tokens, err);
}
