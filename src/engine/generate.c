/*
 * generate.c: step-level generation over a KV cache; see generate.h.
 *
 * Sequence id == cache slot. Each step builds one batch: first one token for every
 * decoding sequence (so decoding never waits behind a long prompt), then chunks of the
 * waiting prompts in admission order while the cache's tokens-per-pass budget lasts.
 * Everything a step needs is allocated at gen_create; gen_add allocates a sequence's
 * token buffer once.
 */
#include "generate.h"

#include <stdlib.h>
#include <string.h>

typedef struct gen_seq
{
	int			used;
	uint64_t	order;			/* admission order: older prompts prefill first */
	int32_t    *tokens;			/* prompt, then generated tokens */
	int			n_prompt;
	int			n_gen;
	int			n_cached;		/* tokens whose keys and values are in the cache */
	int			max_new;
	int32_t		end_id;
	dl_sampling sampling;
	dl_rng		rng;
	dl_finish	finish;
	const struct dl_lora *lora;
} gen_seq;

struct dl_generator
{
	dl_model   *m;
	dl_kv_cache *c;
	gen_seq    *seqs;			/* one per cache slot */
	uint64_t	next_order;
	dl_seq	   *batch;			/* n_slots */
	int		   *batch_seq;		/* which sequence each batch entry is */
	dl_sample_row *rows;		/* [n_slots] how each logit row of a step is sampled */
	int32_t    *tokens;			/* [n_slots] and the tokens that came out */
	int			last_decode;	/* the last step's shape, for gen_last_step */
	int			last_prefill;
};

dl_status
gen_create(dl_model *m, dl_kv_cache *c, dl_generator **out, dl_error *err)
{
	dl_generator *g;
	int			n = c->n_slots;

	if (c->max_tokens < n)
		return dl_fail(err, DL_EINVAL, "a cache of %d sequences needs at least %d tokens per forward pass, not %d",
					   n, n, c->max_tokens);
	g = calloc(1, sizeof(*g));
	if (g == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory creating a generator");
	g->m = m;
	g->c = c;
	g->seqs = calloc(n, sizeof(gen_seq));
	g->batch = calloc(n, sizeof(dl_seq));
	g->batch_seq = calloc(n, sizeof(int));
	g->rows = malloc(n * sizeof(dl_sample_row));
	g->tokens = malloc(n * sizeof(int32_t));
	if (!g->seqs || !g->batch || !g->batch_seq || !g->rows || !g->tokens)
	{
		gen_free(g);
		return dl_fail(err, DL_ENOMEM, "out of memory creating a generator");
	}
	*out = g;
	return DL_OK;
}

void
gen_free(dl_generator *g)
{
	if (g == NULL)
		return;
	if (g->seqs)
		for (int i = 0; i < g->c->n_slots; i++)
			free(g->seqs[i].tokens);
	free(g->seqs);
	free(g->batch);
	free(g->batch_seq);
	free(g->rows);
	free(g->tokens);
	free(g);
}

dl_status
gen_add(dl_generator *g, const dl_gen_request *req, int *id, dl_error *err)
{
	int			ctx = g->c->max_ctx;
	int			slot = -1;
	int			cap;
	gen_seq    *s;
	dl_status	st;

	if (req->n_prompt < 1)
		return dl_fail(err, DL_EINVAL, "the prompt is empty");
	if (req->n_prompt > ctx)
	{
		dl_fail(err, DL_EINVAL, "the prompt has %d tokens, more than the context of %d",
				req->n_prompt, ctx);
		return dl_hint(err, "Shorten the prompt.");
	}
	if (req->max_new_tokens < 1)
		return dl_fail(err, DL_EINVAL, "max_new_tokens must be at least 1, not %d", req->max_new_tokens);
	if (req->end_id < -1 || req->end_id >= g->m->cfg.vocab_size)
		return dl_fail(err, DL_EINVAL, "end token id %d is out of range", req->end_id);
	st = sampling_check(&req->sampling, err);
	if (st != DL_OK)
		return st;
	for (int i = 0; i < g->c->n_slots && slot < 0; i++)
		if (!g->seqs[i].used)
			slot = i;
	if (slot < 0)
		return dl_fail(err, DL_EINVAL, "all %d sequence slots are in use", g->c->n_slots);

	/* the context bounds what can be generated: ctx + 1 tokens in all at most */
	cap = req->max_new_tokens < ctx + 1 - req->n_prompt ? req->n_prompt + req->max_new_tokens : ctx + 1;
	s = &g->seqs[slot];
	s->tokens = malloc(cap * sizeof(int32_t));
	if (s->tokens == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory admitting a sequence");
	memcpy(s->tokens, req->prompt, req->n_prompt * sizeof(int32_t));
	s->used = 1;
	s->order = g->next_order++;
	s->n_prompt = req->n_prompt;
	s->n_gen = 0;
	s->n_cached = 0;
	s->max_new = req->max_new_tokens;
	s->end_id = req->end_id;
	s->sampling = req->sampling;
	rng_seed(&s->rng, req->seed);
	s->finish = DL_FINISH_NONE;
	s->lora = req->lora;
	*id = slot;
	return DL_OK;
}

/* Append a sampled token and decide whether the sequence is done. */
static void
gen_accept(dl_generator *g, gen_seq *s, int32_t tok)
{
	s->tokens[s->n_prompt + s->n_gen++] = tok;
	if (tok == s->end_id)
		s->finish = DL_FINISH_END;
	else if (s->n_gen >= s->max_new)
		s->finish = DL_FINISH_LENGTH;
	else if (s->n_prompt + s->n_gen > g->c->max_ctx)
		s->finish = DL_FINISH_CONTEXT;	/* the new token has no position to go to */
}

dl_status
gen_step(dl_generator *g, dl_error *err)
{
	int			nslot = g->c->n_slots;
	int			budget = g->c->max_tokens;
	int			n = 0,
				row = 0;
	uint64_t	after = 0;
	dl_status	st;

	/* decoding sequences: their last token */
	for (int i = 0; i < nslot; i++)
	{
		gen_seq    *s = &g->seqs[i];

		if (s->used && s->finish == DL_FINISH_NONE && s->n_gen > 0)
		{
			g->batch[n] = (dl_seq) {i, s->n_cached, 1, s->tokens + s->n_cached, DL_LOGITS_LAST, s->lora};
			g->batch_seq[n++] = i;
			budget--;
		}
	}
	/* decoders of one adapter side by side: one low-rank product per adapter (model.h) */
	for (int k = 1; k < n; k++)
		for (int j = k; j > 0 && (uintptr_t) g->batch[j - 1].lora > (uintptr_t) g->batch[j].lora; j--)
		{
			dl_seq		t = g->batch[j];
			int			ts = g->batch_seq[j];

			g->batch[j] = g->batch[j - 1];
			g->batch_seq[j] = g->batch_seq[j - 1];
			g->batch[j - 1] = t;
			g->batch_seq[j - 1] = ts;
		}
	/* waiting prompts, oldest first, a chunk each while the budget lasts */
	while (budget > 0)
	{
		int			next = -1;

		for (int i = 0; i < nslot; i++)
		{
			gen_seq    *s = &g->seqs[i];

			if (s->used && s->n_cached < s->n_prompt && s->order >= after &&
				(next < 0 || s->order < g->seqs[next].order))
				next = i;
		}
		if (next < 0)
			break;
		{
			gen_seq    *s = &g->seqs[next];
			int			len = s->n_prompt - s->n_cached < budget ? s->n_prompt - s->n_cached : budget;

			g->batch[n] = (dl_seq) {next, s->n_cached, len, s->tokens + s->n_cached,
			s->n_cached + len == s->n_prompt ? DL_LOGITS_LAST : DL_LOGITS_NONE, s->lora};
			g->batch_seq[n++] = next;
			budget -= len;
			after = s->order + 1;
		}
	}
	g->last_decode = 0;
	g->last_prefill = 0;
	for (int k = 0; k < n; k++)
		if (g->seqs[g->batch_seq[k]].n_gen > 0)
			g->last_decode++;
		else
			g->last_prefill += g->batch[k].n_tokens;
	if (n == 0)
		return DL_OK;

	/* each row's uniform comes from its sequence's RNG, as sample_token would draw it */
	for (int k = 0; k < n; k++)
	{
		gen_seq    *s = &g->seqs[g->batch_seq[k]];

		if (g->batch[k].want == DL_LOGITS_LAST)
			g->rows[row++] = (dl_sample_row) {s->sampling, sample_uniform(&s->sampling, &s->rng)};
	}
	st = dl_model_sample(g->m, g->c, g->batch, n, g->rows, g->tokens, err);
	if (st != DL_OK)
		return st;
	row = 0;
	for (int k = 0; k < n; k++)
	{
		gen_seq    *s = &g->seqs[g->batch_seq[k]];

		s->n_cached += g->batch[k].n_tokens;
		if (g->batch[k].want == DL_LOGITS_LAST)
			gen_accept(g, s, g->tokens[row++]);
	}
	return DL_OK;
}

void
gen_last_step(const dl_generator *g, int *decode, int *prefill_tokens)
{
	*decode = g->last_decode;
	*prefill_tokens = g->last_prefill;
}

int
gen_running(const dl_generator *g)
{
	int			n = 0;

	for (int i = 0; i < g->c->n_slots; i++)
		n += g->seqs[i].used && g->seqs[i].finish == DL_FINISH_NONE;
	return n;
}

int
gen_free_slots(const dl_generator *g)
{
	int			n = 0;

	for (int i = 0; i < g->c->n_slots; i++)
		n += !g->seqs[i].used;
	return n;
}

const int32_t *
gen_tokens(const dl_generator *g, int id, int *n)
{
	*n = g->seqs[id].n_gen;
	return g->seqs[id].tokens + g->seqs[id].n_prompt;
}

const int32_t *
gen_prompt(const dl_generator *g, int id, int *n)
{
	*n = g->seqs[id].n_prompt;
	return g->seqs[id].tokens;
}

dl_finish
gen_finished(const dl_generator *g, int id)
{
	return g->seqs[id].finish;
}

int
gen_pending_prompt(const dl_generator *g, int id)
{
	const gen_seq *s = &g->seqs[id];

	return s->n_cached < s->n_prompt ? s->n_prompt - s->n_cached : 0;
}

void
gen_remove(dl_generator *g, int id)
{
	free(g->seqs[id].tokens);
	memset(&g->seqs[id], 0, sizeof(gen_seq));
}
