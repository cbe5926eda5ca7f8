/*
 * dataset.c: instruction records to training examples, as Dolly's trainer builds them
 * (training/trainer.py: preprocess_batch, then DataCollatorForCompletionOnlyLM).
 */
#include "train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "prompt.h"
#include "sampler.h"

/* The example of one record: Dolly's training text, tokenised, labels after the key. */
dl_status
example_from_record(const dl_tokenizer *tok, const char *instruction, const char *context,
					const char *response, int max_length, dl_example *ex, dl_error *err)
{
	int32_t		key = tok_token_id(tok, DOLLY_RESPONSE_KEY_NL);
	int32_t    *ids;
	char	   *text;
	int			n,
				at;
	dl_status	st;

	memset(ex, 0, sizeof(*ex));
	/* Dolly raises on these; a caller skips and counts them */
	if (instruction == NULL || instruction[0] == '\0')
		return dl_fail(err, DL_EINVAL, "record has an empty instruction");
	if (response == NULL || response[0] == '\0')
		return dl_fail(err, DL_EINVAL, "record has an empty response");
	if (key < 0)
	{
		dl_fail(err, DL_EINVAL, "the tokenizer has no \"### Response:\\n\" token");
		return dl_hint(err, "Add Dolly's special tokens to the model first (model_add_dolly_tokens).");
	}
	text = prompt_format_record(instruction, context, response);
	if (text == NULL)
		return dl_fail(err, DL_ENOMEM, "out of memory formatting a record");
	st = tok_encode(tok, text, strlen(text), &ids, &n, err);
	free(text);
	if (st != DL_OK)
		return st;
	/* v2 drops what does not fit rather than truncating it */
	if (n >= max_length)
	{
		free(ids);
		return dl_fail(err, DL_EINVAL, "record has %d tokens, not fewer than max_length %d",
					   n, max_length);
	}
	/* the collator masks everything up to and including the FIRST response key */
	for (at = 0; at < n && ids[at] != key; at++)
		;
	if (at == n)
	{
		free(ids);
		dl_fail(err, DL_EINVAL, "the tokens of the record do not contain the \"### Response:\\n\" token");
		return dl_hint(err, "The tokenizer must split \"### Response:\\n\" out as an added special token.");
	}
	ex->ids = ids;
	ex->n = n;
	ex->first_label = at + 1;
	return DL_OK;
}

/* Free an example's tokens and clear it. */
void
example_free(dl_example *ex)
{
	free(ex->ids);
	ex->ids = NULL;
	ex->n = 0;
	ex->first_label = 0;
}

/* Shuffle with the seed, then hold out the evaluation examples at the front; see train.h. */
int
examples_split(dl_example *ex, int n, double eval_fraction, uint64_t seed)
{
	dl_rng		rng;
	int			neval = (int) lround(n * eval_fraction);

	rng_seed(&rng, seed);
	rng_shuffle(ex, n, sizeof(dl_example), &rng);
	if (neval == 0 && eval_fraction > 0 && n > 1)
		neval = 1;
	return neval;
}
