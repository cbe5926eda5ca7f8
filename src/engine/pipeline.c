/*
 * pipeline.c: a Dolly model directory as one object; see pipeline.h.
 */
#include "pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prompt.h"

dl_status
pipeline_open(const char *dir, dl_backend *be, dl_load_fn watch, void *arg, dl_pipeline **out,
			  dl_error *err)
{
	dl_pipeline *p = calloc(1, sizeof(*p));
	char		path[4096];
	dl_status	st;

	if (p == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory opening a model");
	snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
	st = tok_load(path, &p->tok, err);
	if (st == DL_OK && be != NULL)
		st = dl_model_load_watched(dir, be, watch, arg, &p->model, err);
	if (st != DL_OK)
	{
		pipeline_close(p);
		return st;
	}
	p->eos_id = p->model ? p->model->cfg.eos_id : -1;
	p->end_id = tok_token_id(p->tok, DOLLY_END_KEY);
	/* a token past the model's embedding rows is one it can never produce */
	p->dolly_tokens = p->end_id >= 0 && tok_token_id(p->tok, DOLLY_RESPONSE_KEY_NL) >= 0 &&
		(p->model == NULL || p->end_id < p->model->cfg.vocab_size);
	if (!p->dolly_tokens)
		p->end_id = p->eos_id;
	*out = p;
	return DL_OK;
}

void
pipeline_close(dl_pipeline *p)
{
	if (p == NULL)
		return;
	dl_model_free(p->model);
	tok_free(p->tok);
	free(p);
}

dl_status
pipeline_prompt(const dl_pipeline *p, const char *instruction, const char *context, bool raw,
				int32_t **ids, int *n, dl_error *err)
{
	char	   *text = raw ? strdup(instruction) : prompt_format(instruction, context);
	dl_status	st;

	if (text == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory formatting a prompt");
	st = tok_encode(p->tok, text, strlen(text), ids, n, err);
	free(text);
	return st;
}

int32_t
pipeline_stop_id(const dl_pipeline *p, bool raw)
{
	return raw ? p->eos_id : p->end_id;
}

/* Replace each NUL of text[0..len) by U+FFFD, in a new string. */
static char *
without_nul(const char *text, size_t len)
{
	size_t		nul = 0;
	char	   *out,
			   *o;

	for (size_t i = 0; i < len; i++)
		nul += text[i] == '\0';
	out = o = malloc(len + 2 * nul + 1);
	if (out == NULL)
		return NULL;
	for (size_t i = 0; i < len; i++)
		if (text[i] == '\0')
		{
			memcpy(o, "\xEF\xBF\xBD", 3);
			o += 3;
		}
		else
			*o++ = text[i];
	*o = '\0';
	return out;
}

dl_status
pipeline_answer(const dl_pipeline *p, const int32_t *prompt, int n_prompt, const int32_t *gen,
				int n_gen, bool raw, char **answer, dl_error *err)
{
	int32_t		stop = pipeline_stop_id(p, raw);
	int32_t    *all = NULL;
	char	   *raw_text = NULL,
			   *text;
	size_t		len;
	dl_status	st;

	/* the stop token is not part of the answer */
	if (n_gen > 0 && stop >= 0 && gen[n_gen - 1] == stop)
		n_gen--;
	if (raw)
		st = tok_decode_len(p->tok, gen, n_gen, 0, &raw_text, &len, err);
	else
	{
		/* the pipeline's rules look at the whole sequence, prompt included */
		all = malloc(((size_t) n_prompt + n_gen + 1) * sizeof(int32_t));
		if (all == NULL)
			return dl_fail(err, DL_ENOMEM, "out of memory decoding an answer");
		memcpy(all, prompt, n_prompt * sizeof(int32_t));
		memcpy(all + n_prompt, gen, n_gen * sizeof(int32_t));
		st = tok_decode_len(p->tok, all, n_prompt + n_gen, 0, &raw_text, &len, err);
		free(all);
	}
	if (st != DL_OK)
		return st;
	text = without_nul(raw_text, len);
	free(raw_text);
	if (text == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory decoding an answer");
	if (!raw)
	{
		char	   *response = prompt_extract_response(text);

		free(text);
		if (response == NULL)
			return dl_fail(err, DL_ENOMEM, "out of memory extracting a response");
		text = response;
	}
	*answer = text;
	return DL_OK;
}
