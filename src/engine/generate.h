/*
 * generate.h: the generation loop, step by step, for a batch of sequences that come and
 * go (continuous batching).
 *
 * A generator drives a model over a KV cache: gen_add admits a sequence into a free
 * cache slot, gen_step runs ONE forward pass in which every decoding sequence feeds its
 * last token and waiting prompts are prefilled (in chunks when they exceed what is left
 * of the cache's tokens per pass), then samples the next token of every sequence whose
 * logits came out, each with its own parameters and RNG, on the backend (only token ids
 * come back to the host). A sequence finishes at its end token, after max_new_tokens,
 * or when its context is full; gen_remove frees its slot (also to drop a cancelled
 * request at any time). dolly-cli loops gen_step until done; the model server calls it
 * once per tick, admitting and retiring between ticks.
 *
 * See docs/ARCHITECTURE.md, the life of a request.
 */
#ifndef DOLLY_GENERATE_H
#define DOLLY_GENERATE_H

#include <stdint.h>

#include "error.h"
#include "model.h"
#include "sampler.h"

/* Why a sequence stopped. */
typedef enum dl_finish
{
	DL_FINISH_NONE,				/* still running */
	DL_FINISH_END,				/* produced the end token (kept as the last token) */
	DL_FINISH_LENGTH,			/* produced max_new_tokens */
	DL_FINISH_CONTEXT			/* no position left in the context */
} dl_finish;

/* What to generate. */
typedef struct dl_gen_request
{
	const int32_t *prompt;		/* copied by gen_add */
	int			n_prompt;
	int			max_new_tokens; /* >= 1 */
	int32_t		end_id;			/* stop after this token; -1: none */
	dl_sampling sampling;
	uint64_t	seed;			/* seeds the sequence's own RNG */
	const struct dl_lora *lora;	/* its adapter (lora.h), alive until gen_remove; NULL: none */
} dl_gen_request;

typedef struct dl_generator dl_generator;

/* A generator over model m and cache c (one sequence per cache slot at most). */
dl_status	gen_create(dl_model *m, dl_kv_cache *c, dl_generator **out, dl_error *err);

/* Free the generator (not the model or cache); NULL is accepted. */
void		gen_free(dl_generator *g);

/*
 * Admit a sequence; *id names it until gen_remove. Fails with DL_EINVAL for an empty
 * prompt, a prompt longer than the context, bad sampling parameters, and when every
 * slot is taken.
 */
dl_status	gen_add(dl_generator *g, const dl_gen_request *req, int *id, dl_error *err);

/* One forward pass for all unfinished sequences, then sampling. */
dl_status	gen_step(dl_generator *g, dl_error *err);

/* What the last gen_step carried: sequences that decoded a token, prompt tokens prefilled. */
void		gen_last_step(const dl_generator *g, int *decode, int *prefill_tokens);

/* Number of admitted sequences that have not finished. */
int			gen_running(const dl_generator *g);

/* Number of free slots. */
int			gen_free_slots(const dl_generator *g);

/* The tokens sequence id has generated so far (*n of them; valid until the next call). */
const int32_t *gen_tokens(const dl_generator *g, int id, int *n);

/* Sequence id's prompt (*n tokens), followed by its gen_tokens: the whole sequence so far. */
const int32_t *gen_prompt(const dl_generator *g, int id, int *n);

/* Whether, and why, sequence id has finished. */
dl_finish	gen_finished(const dl_generator *g, int id);

/* Prompt tokens of sequence id not yet through the model (0 once it decodes). */
int			gen_pending_prompt(const dl_generator *g, int id);

/* Forget sequence id and free its slot. */
void		gen_remove(dl_generator *g, int id);

#endif
