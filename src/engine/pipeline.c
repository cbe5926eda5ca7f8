/*
 * pipeline.c: a Dolly model directory as one object; see pipeline.h.
 */
#include "pipeline.h"

#include <stdlib.h>
#include <string.h>

#include "prompt.h"

dl_status
pipeline_open(const char *dir, dl_backend *be, dl_load_fn watch, void *arg, dl_pipeline **out,
			  dl_error *err)
{
	dl_pipeline *p = calloc(1, sizeof(*p));
	dl_status	st;

	if (p == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory opening a model");
	st = tok_load_dir(dir, &p->tok, err);
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

dl_status
pipeline_decode(const dl_pipeline *p, const int32_t *ids, int n, char **text, dl_error *err)
{
	char	   *raw;
	size_t		len,
				nul = 0;
	char	   *o;
	dl_status	st = tok_decode_len(p->tok, ids, n, 0, &raw, &len, err);

	if (st != DL_OK)
		return st;
	for (size_t i = 0; i < len; i++)
		nul += raw[i] == '\0';
	*text = o = malloc(len + 2 * nul + 1);
	if (o == NULL)
	{
		free(raw);
		return dl_fail(err, DL_ENOMEM, "out of memory decoding tokens");
	}
	for (size_t i = 0; i < len; i++)
		if (raw[i] == '\0')
		{
			memcpy(o, "\xEF\xBF\xBD", 3);
			o += 3;
		}
		else
			*o++ = raw[i];
	*o = '\0';
	free(raw);
	return DL_OK;
}

dl_status
pipeline_answer(const dl_pipeline *p, const int32_t *seq, int n_prompt, int n_gen, bool raw,
				char **answer, dl_error *err)
{
	int32_t		stop = pipeline_stop_id(p, raw);
	int			end = n_prompt + n_gen;
	char	   *text,
			   *response;
	dl_status	st;

	/* the stop token is not part of the answer */
	if (n_gen > 0 && stop >= 0 && seq[end - 1] == stop)
		end--;
	/* the pipeline's rules look at the whole sequence, prompt included */
	st = raw ? pipeline_decode(p, seq + n_prompt, end - n_prompt, answer, err)
		: pipeline_decode(p, seq, end, &text, err);
	if (st != DL_OK || raw)
		return st;
	response = prompt_extract_response(text);
	free(text);
	if (response == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory extracting a response");
	*answer = response;
	return DL_OK;
}
