/*
 * pipeline.h: a Dolly model directory as one object, used the way Dolly's
 * InstructionTextGenerationPipeline uses it: the model, its tokenizer, and the token an
 * answer ends at. dolly-cli, the model server and the fine-tuning ranks all open models
 * through it (llm.c's gpt2_build_from_checkpoint + tokenizer_init in one), so one set of
 * rules answers an instruction wherever it is asked.
 *
 * The rules (databrickslabs/dolly instruct_pipeline.py): generation stops at "### End"
 * when the tokenizer has both it and "### Response:\n" as tokens, else at the model's
 * end-of-text; the answer is read out of the prompt and the generation decoded together.
 * A raw continuation (no template) stops at end-of-text and is the generation alone.
 *
 * See docs/ARCHITECTURE.md, the life of a request.
 */
#ifndef DOLLY_PIPELINE_H
#define DOLLY_PIPELINE_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "error.h"
#include "model.h"
#include "tokenizer.h"

typedef struct dl_pipeline
{
	dl_model   *model;			/* NULL when opened for the tokenizer alone */
	dl_tokenizer *tok;
	int32_t		end_id;			/* where a templated answer stops; -1: nowhere but the length */
	int32_t		eos_id;			/* where a raw continuation stops (config.json); -1: none */
	bool		dolly_tokens;	/* the tokenizer has Dolly's "### End" and "### Response:\n" */
} dl_pipeline;

/*
 * Open the model directory dir: its tokenizer, and (unless be is NULL) its model on be,
 * telling watch (unless NULL) how far the load is (see dl_model_load_watched).
 */
dl_status	pipeline_open(const char *dir, dl_backend *be, dl_load_fn watch, void *arg,
						  dl_pipeline **out, dl_error *err);

/* Free everything; NULL is accepted. */
void		pipeline_close(dl_pipeline *p);

/*
 * The prompt's token ids (*ids malloc'd): Dolly's template around instruction (and context,
 * NULL or "" for none), or, when raw, the instruction's own text as the prompt.
 */
dl_status	pipeline_prompt(const dl_pipeline *p, const char *instruction, const char *context,
							bool raw, int32_t **ids, int *n, dl_error *err);

/* The token a generation stops at: end_id, or eos_id when raw. */
int32_t		pipeline_stop_id(const dl_pipeline *p, bool raw);

/*
 * Token ids as text (malloc'd, UTF-8 without NUL: a token that decodes to byte 0, which a
 * model can emit, becomes U+FFFD as invalid UTF-8 does, so that no NUL cuts it short).
 */
dl_status	pipeline_decode(const dl_pipeline *p, const int32_t *ids, int n, char **text, dl_error *err);

/*
 * The answer (malloc'd, as pipeline_decode gives text) of a sequence: its n_prompt prompt
 * tokens followed by the n_gen it generated (as gen_prompt holds them), the stop token
 * included or not: the response Dolly's pipeline extracts from both decoded together, or,
 * when raw, the generation decoded.
 */
dl_status	pipeline_answer(const dl_pipeline *p, const int32_t *seq, int n_prompt, int n_gen,
							bool raw, char **answer, dl_error *err);

#endif
