/*
 * test_dataset.c: records to training examples (example_from_record) on the fixture
 * tokenizer: the tokens are those of Dolly's training text, the loss starts just after
 * the first "### Response:\n" token, and unusable records are refused with a reason.
 * Also home of tokenizer_without_dolly_keys(), which test_model_save.c uses too.
 */
#include "harness.h"
#include "prompt.h"
#include "train.h"

#include <stdlib.h>
#include <string.h>

#include <json.h>

/*
 * The fixture tokenizer with Dolly's three special tokens taken out of added_tokens, as
 * a base model's tokenizer comes; NULL if the fixture cannot be read.
 */
dl_tokenizer *tokenizer_without_dolly_keys(void);

dl_tokenizer *
tokenizer_without_dolly_keys(void)
{
	json_object *root = json_object_from_file(fixture_path("tokenizer/tokenizer.json"));
	json_object *added,
			   *kept = json_object_new_array();
	dl_tokenizer *tok = NULL;
	const char *text;

	if (root && kept && json_object_object_get_ex(root, "added_tokens", &added))
	{
		for (size_t i = 0; i < json_object_array_length(added); i++)
		{
			json_object *t = json_object_array_get_idx(added, i),
					   *c;
			const char *s = json_object_object_get_ex(t, "content", &c) ? json_object_get_string(c) : "";

			if (strcmp(s, DOLLY_END_KEY) && strcmp(s, DOLLY_INSTRUCTION_KEY) &&
				strcmp(s, DOLLY_RESPONSE_KEY_NL))
				json_object_array_add(kept, json_object_get(t));
		}
		json_object_object_add(root, "added_tokens", kept);
		kept = NULL;
		text = json_object_to_json_string(root);
		if (tok_parse(text, strlen(text), &tok, NULL) != DL_OK)
			tok = NULL;
	}
	json_object_put(kept);
	json_object_put(root);
	return tok;
}

/* Check one record's example against its training text encoded directly. */
static int
example_matches(const dl_tokenizer *tok, const char *instr, const char *ctx,
				const char *resp, const dl_example *ex)
{
	char	   *text = prompt_format_record(instr, ctx, resp);
	char	   *tail = NULL;
	char		want_tail[256];
	int32_t    *ids = NULL;
	int			n = 0,
				ok;

	ok = text && tok_encode(tok, text, strlen(text), &ids, &n, NULL) == DL_OK &&
		n == ex->n && memcmp(ids, ex->ids, n * sizeof(int32_t)) == 0 &&
		ex->first_label >= 1 && ex->first_label < n &&
		ex->ids[ex->first_label - 1] == tok_token_id(tok, DOLLY_RESPONSE_KEY_NL);
	/* what is predicted is exactly the response and the end key */
	snprintf(want_tail, sizeof(want_tail), "%s\n\n%s", resp, DOLLY_END_KEY);
	ok = ok && tok_decode(tok, ex->ids + ex->first_label, ex->n - ex->first_label, 0, &tail,
						  NULL) == DL_OK && strcmp(tail, want_tail) == 0;
	if (!ok)
		fprintf(stderr, "  example of \"%s\": n %d (want %d), first_label %d, tail \"%s\"\n",
				instr, ex->n, n, ex->first_label, tail ? tail : "");
	free(tail);
	free(ids);
	free(text);
	return ok;
}

TEST(dataset_example_without_context)
{
	dl_tokenizer *tok;
	dl_example	ex;
	dl_error	err;

	CHECK_OK(tok_load(fixture_path("tokenizer/tokenizer.json"), &tok, &err), &err);
	CHECK_OK(example_from_record(tok, "Name a colour.", NULL, "Blue.", 128, &ex, &err), &err);
	CHECK(example_matches(tok, "Name a colour.", NULL, "Blue.", &ex));
	example_free(&ex);
	/* "" is no context, as NULL */
	CHECK_OK(example_from_record(tok, "Name a colour.", "", "Blue.", 128, &ex, &err), &err);
	CHECK(example_matches(tok, "Name a colour.", NULL, "Blue.", &ex));
	example_free(&ex);
	tok_free(tok);
}

TEST(dataset_example_with_context)
{
	dl_tokenizer *tok;
	dl_example	ex,
				bare;
	dl_error	err;

	CHECK_OK(tok_load(fixture_path("tokenizer/tokenizer.json"), &tok, &err), &err);
	CHECK_OK(example_from_record(tok, "Sum the numbers.", "2 and 3", "5", 256, &ex, &err), &err);
	CHECK(example_matches(tok, "Sum the numbers.", "2 and 3", "5", &ex));
	CHECK_OK(example_from_record(tok, "Sum the numbers.", NULL, "5", 256, &bare, &err), &err);
	/* the context adds "Input:" and itself before the response key, the labels stay */
	CHECK(ex.n > bare.n && ex.first_label > bare.first_label);
	CHECK(ex.n - ex.first_label == bare.n - bare.first_label);
	example_free(&ex);
	example_free(&bare);
	tok_free(tok);
}

TEST(dataset_masks_up_to_the_first_response_key)
{
	dl_tokenizer *tok;
	dl_example	ex;
	dl_error	err;
	int32_t		key;
	int			seen = 0;

	CHECK_OK(tok_load(fixture_path("tokenizer/tokenizer.json"), &tok, &err), &err);
	key = tok_token_id(tok, DOLLY_RESPONSE_KEY_NL);
	CHECK(key >= 0);
	/* a response that itself holds the key: the collator masks up to the FIRST one only */
	CHECK_OK(example_from_record(tok, "Quote the key.", NULL, "It is ### Response:\nitself.", 256,
								 &ex, &err), &err);
	for (int i = 0; i < ex.n; i++)
		if (ex.ids[i] == key && seen++ == 0)
			CHECKF(ex.first_label == i + 1, "first_label %d, first key at %d", ex.first_label, i);
	CHECK(seen == 2);
	example_free(&ex);
	tok_free(tok);
}

TEST(dataset_refuses_long_records)
{
	dl_tokenizer *tok;
	dl_example	ex;
	dl_error	err;
	int			n;

	CHECK_OK(tok_load(fixture_path("tokenizer/tokenizer.json"), &tok, &err), &err);
	CHECK_OK(example_from_record(tok, "Count.", NULL, "one two three four", 1000, &ex, &err), &err);
	n = ex.n;
	example_free(&ex);
	/* Dolly v2 keeps len < max_length and drops the rest */
	CHECK_OK(example_from_record(tok, "Count.", NULL, "one two three four", n + 1, &ex, &err), &err);
	CHECK(ex.n == n);
	example_free(&ex);
	CHECK(example_from_record(tok, "Count.", NULL, "one two three four", n, &ex, &err) == DL_EINVAL);
	CHECKF(strstr(err.msg, "tokens") != NULL, "%s", err.msg);
	CHECK(ex.ids == NULL && ex.n == 0);
	tok_free(tok);
}

TEST(dataset_refuses_empty_fields)
{
	dl_tokenizer *tok;
	dl_example	ex;
	dl_error	err;

	CHECK_OK(tok_load(fixture_path("tokenizer/tokenizer.json"), &tok, &err), &err);
	CHECK(example_from_record(tok, "", NULL, "x", 128, &ex, &err) == DL_EINVAL);
	CHECKF(strstr(err.msg, "instruction") != NULL, "%s", err.msg);
	CHECK(example_from_record(tok, NULL, NULL, "x", 128, &ex, &err) == DL_EINVAL);
	CHECK(example_from_record(tok, "x", "context", "", 128, &ex, &err) == DL_EINVAL);
	CHECKF(strstr(err.msg, "response") != NULL, "%s", err.msg);
	CHECK(example_from_record(tok, "x", NULL, NULL, 128, &ex, &err) == DL_EINVAL);
	CHECK(ex.ids == NULL);
	tok_free(tok);
}

TEST(dataset_needs_the_response_key_token)
{
	dl_tokenizer *tok = tokenizer_without_dolly_keys();
	dl_example	ex;
	dl_error	err;

	CHECK(tok != NULL);
	CHECK(tok_token_id(tok, DOLLY_RESPONSE_KEY_NL) < 0);
	CHECK(example_from_record(tok, "Name a colour.", NULL, "Blue.", 128, &ex, &err) == DL_EINVAL);
	CHECKF(strstr(err.msg, "### Response:") != NULL && err.hint[0], "%s", err.msg);
	tok_free(tok);
}
