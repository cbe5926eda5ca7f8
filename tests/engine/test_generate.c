/*
 * test_generate.c: greedy generation equals transformers' model.generate for every
 * fixture model and prompt, alone, all at once, and admitted while others decode (with a
 * small tokens-per-pass budget so that prompts prefill in chunks); seeded sampling on
 * the backend draws what sample_token draws from downloaded logits and does not depend
 * on the company a sequence keeps; bad requests get clear errors. gptj-legacy-tok, whose
 * tokenizer is in the files that older repositories ship, encodes, generates and decodes as
 * its tokenizer.json twin gptj-f32.
 */
#include "harness.h"
#include "../../src/engine/generate.h"
#include "../../src/engine/safetensors.h"
#include "../../src/engine/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_PROMPTS 16
#define GREEDY_LEN 32

/* A fixture model with its prompts and greedy continuations. */
typedef struct gen_fixture
{
	dl_backend *be;
	dl_model   *m;
	st_set	   *exp;
	int			n;
	const st_tensor *ids[MAX_PROMPTS];
	const st_tensor *greedy[MAX_PROMPTS];
} gen_fixture;

/* Load fixture `name`; 0 when absent. */
static int
gen_fixture_open(const char *name, gen_fixture *f, dl_error *err, dl_status *st)
{
	char		path[4096],
				key[64];

	memset(f, 0, sizeof(*f));
	if (access(fixture_path(name), R_OK) != 0)
		return 0;
	snprintf(path, sizeof(path), "%s", fixture_path(name));
	*st = backend_cpu_create(2, 0, &f->be, err);
	if (*st == DL_OK)
		*st = dl_model_load(path, f->be, &f->m, err);
	snprintf(path, sizeof(path), "%s/expected.safetensors", fixture_path(name));
	if (*st == DL_OK)
		*st = st_open_file(path, &f->exp, err);
	for (int i = 0; *st == DL_OK && i < MAX_PROMPTS; i++)
	{
		snprintf(key, sizeof(key), "prompt_%d_ids", i);
		f->ids[i] = st_find(f->exp, key);
		snprintf(key, sizeof(key), "prompt_%d_greedy", i);
		f->greedy[i] = st_find(f->exp, key);
		if (!f->ids[i] || !f->greedy[i])
			break;
		f->n++;
	}
	return 1;
}

/* Free what gen_fixture_open made. */
static void
gen_fixture_close(gen_fixture *f)
{
	st_close(f->exp);
	dl_model_free(f->m);
	if (f->be)
		f->be->destroy(f->be);
}

/* A greedy request for prompt i of f. */
static dl_gen_request
greedy_request(const gen_fixture *f, int i)
{
	dl_gen_request r = {(const int32_t *) f->ids[i]->data, (int) f->ids[i]->numel, GREEDY_LEN, -1,
	{0, 1.0f, 0, 1.0f}, 0, NULL};

	return r;
}

/* 1 if sequence id generated exactly prompt i's greedy continuation. */
static int
matches_greedy(const gen_fixture *f, dl_generator *g, int id, int i)
{
	int			n;
	const int32_t *got = gen_tokens(g, id, &n);
	const int32_t *want = (const int32_t *) f->greedy[i]->data;

	if (n != f->greedy[i]->numel || memcmp(got, want, n * sizeof(int32_t)) != 0)
	{
		int			k = 0;

		while (k < n && k < f->greedy[i]->numel && got[k] == want[k])
			k++;
		fprintf(stderr, "  prompt %d: %d tokens generated, first difference at %d\n", i, n, k);
		return 0;
	}
	return 1;
}

/*
 * Greedy continuations for every prompt of a model: (1) each alone, (2) all admitted at
 * once, (3) admitted one per step while the others decode, with a budget of 5 tokens per
 * pass beyond the decoders so that prompts prefill in chunks next to decode steps.
 */
static void
check_greedy(const char *name, int *failed_)
{
	gen_fixture f;
	dl_error	err;
	dl_status	st = DL_OK;
	int			ids[MAX_PROMPTS];

	if (!gen_fixture_open(name, &f, &err, &st))
		SKIP("fixture %s not present", name);
	CHECKF(st == DL_OK, "%s", err.msg);
	CHECK(f.n > 0);
	for (int mode = 0; mode < 3; mode++)
	{
		dl_kv_cache *c;
		dl_generator *g;
		int			budget = mode == 2 ? f.n + 5 : 256;
		int			ctx = f.m->cfg.max_pos < 256 ? f.m->cfg.max_pos : 256;
		int			added = 0;

		CHECK_OK(dl_kv_cache_create(f.m, f.n, ctx, budget, &c, &err), &err);
		CHECK_OK(gen_create(f.m, c, &g, &err), &err);
		for (int i = 0; i < f.n && mode == 0; i++)
		{
			dl_gen_request r = greedy_request(&f, i);

			CHECK_OK(gen_add(g, &r, &ids[i], &err), &err);
			while (gen_running(g))
				CHECK_OK(gen_step(g, &err), &err);
			CHECKF(matches_greedy(&f, g, ids[i], i), "%s: prompt %d alone", name, i);
			CHECK(gen_finished(g, ids[i]) == DL_FINISH_LENGTH);
			gen_remove(g, ids[i]);
		}
		if (mode > 0)
		{
			do
			{
				/* mode 1 admits every prompt before the first step, mode 2 one per step */
				while (added < f.n)
				{
					dl_gen_request r = greedy_request(&f, added);

					CHECK_OK(gen_add(g, &r, &ids[added], &err), &err);
					added++;
					if (mode == 2)
						break;
				}
				CHECK_OK(gen_step(g, &err), &err);
			} while (gen_running(g) || added < f.n);
			for (int i = 0; i < f.n; i++)
				CHECKF(matches_greedy(&f, g, ids[i], i), "%s: prompt %d batched (mode %d)", name, i, mode);
		}
		gen_free(g);
		dl_kv_cache_free(c);
	}
	gen_fixture_close(&f);
}

TEST(generate_greedy_gptj_f32)
{
	check_greedy("gptj-f32", failed_);
}

TEST(generate_greedy_neox_par_f32)
{
	check_greedy("neox-par-f32", failed_);
}

TEST(generate_greedy_neox_seq_f32)
{
	check_greedy("neox-seq-f32", failed_);
}

TEST(generate_greedy_gptj_bf16)
{
	check_greedy("gptj-bf16", failed_);
}

TEST(generate_greedy_neox_par_bf16)
{
	check_greedy("neox-par-bf16", failed_);
}

/* gptj-f32 with its tokenizer in vocab.json, merges.txt and the rest (tokenizer-legacy) */
TEST(generate_greedy_gptj_legacy_tok)
{
	check_greedy("gptj-legacy-tok", failed_);
}

/*
 * gptj-legacy-tok's tokenizer encodes each prompt (as its tokenizer.json twin decodes the
 * prompt's ids) to those ids, which generate the expected tokens (generate_greedy_gptj_legacy_tok),
 * and decodes prompt and continuation as the twin does.
 */
TEST(generate_gptj_tokenizer_files_twin)
{
	gen_fixture f;
	dl_error	err;
	dl_status	st = DL_OK;
	dl_tokenizer *older = NULL,
			   *twin = NULL;

	if (!gen_fixture_open("gptj-legacy-tok", &f, &err, &st))
		SKIP("fixture gptj-legacy-tok not present");
	CHECKF(st == DL_OK, "%s", err.msg);
	CHECK_OK(tok_load_dir(fixture_path("gptj-legacy-tok"), &older, &err), &err);
	CHECK_OK(tok_load_dir(fixture_path("gptj-f32"), &twin, &err), &err);
	CHECK(f.n > 0);
	for (int i = 0; i < f.n; i++)
	{
		const int32_t *want = (const int32_t *) f.ids[i]->data;
		int			n = (int) f.ids[i]->numel;
		char	   *text,
				   *again,
				   *cont,
				   *cont_twin;
		int32_t    *ids;
		int			nids;

		CHECK_OK(tok_decode(twin, want, n, 0, &text, &err), &err);
		CHECK_OK(tok_decode(older, want, n, 0, &again, &err), &err);
		CHECKF(strcmp(text, again) == 0, "prompt %d decodes to \"%s\", not \"%s\"", i, again, text);
		CHECK_OK(tok_encode(older, text, strlen(text), &ids, &nids, &err), &err);
		CHECKF(nids == n && memcmp(ids, want, n * sizeof(int32_t)) == 0, "prompt %d: \"%s\"", i, text);
		CHECK_OK(tok_decode(older, (const int32_t *) f.greedy[i]->data, (int) f.greedy[i]->numel, 0,
							&cont, &err), &err);
		CHECK_OK(tok_decode(twin, (const int32_t *) f.greedy[i]->data, (int) f.greedy[i]->numel, 0,
							&cont_twin, &err), &err);
		CHECKF(strcmp(cont, cont_twin) == 0, "prompt %d continues \"%s\", not \"%s\"", i, cont, cont_twin);
		free(text);
		free(again);
		free(ids);
		free(cont);
		free(cont_twin);
	}
	tok_free(older);
	tok_free(twin);
	gen_fixture_close(&f);
}

TEST(generate_sampling_is_seeded_per_sequence)
{
	gen_fixture f;
	dl_error	err;
	dl_status	st = DL_OK;
	dl_kv_cache *c;
	dl_generator *g;
	int32_t		first[GREEDY_LEN];
	int			id,
				other,
				n;
	dl_gen_request r;

	if (!gen_fixture_open("neox-par-f32", &f, &err, &st))
		SKIP("fixture neox-par-f32 not present");
	CHECKF(st == DL_OK, "%s", err.msg);
	CHECK_OK(dl_kv_cache_create(f.m, 2, f.m->cfg.max_pos, 128, &c, &err), &err);
	CHECK_OK(gen_create(f.m, c, &g, &err), &err);
	r = greedy_request(&f, 0);
	r.sampling = (dl_sampling) {1, 1.5f, 0, 0.95f};
	r.seed = 42;

	/* alone */
	CHECK_OK(gen_add(g, &r, &id, &err), &err);
	while (gen_running(g))
		CHECK_OK(gen_step(g, &err), &err);
	memcpy(first, gen_tokens(g, id, &n), sizeof(first));
	CHECK(n == GREEDY_LEN);
	gen_remove(g, id);

	/* the same tokens as the host path: each step's logits downloaded, sample_token */
	{
		int			V = f.m->cfg.vocab_size;
		float	   *lg = malloc(V * sizeof(float)),
				   *scratch = malloc(2 * V * sizeof(float));
		int32_t    *iscratch = malloc(V * sizeof(int32_t));
		dl_seq		s = {0, 0, r.n_prompt, r.prompt, DL_LOGITS_LAST, NULL};
		dl_kv_cache *hc;
		dl_rng		rng;

		CHECK_OK(dl_kv_cache_create(f.m, 1, f.m->cfg.max_pos, r.n_prompt, &hc, &err), &err);
		rng_seed(&rng, r.seed);
		for (int k = 0; k < GREEDY_LEN; k++)
		{
			CHECK_OK(dl_model_forward(f.m, hc, &s, 1, lg, &err), &err);
			CHECK(sample_token(lg, V, &r.sampling, &rng, scratch, iscratch) == first[k]);
			s = (dl_seq) {0, s.pos + s.n_tokens, 1, &first[k], DL_LOGITS_LAST, NULL};
		}
		dl_kv_cache_free(hc);
		free(lg), free(scratch), free(iscratch);
	}

	/* again, next to another sampled sequence admitted first */
	r.seed = 7;
	CHECK_OK(gen_add(g, &r, &other, &err), &err);
	CHECK_OK(gen_step(g, &err), &err);
	r.seed = 42;
	CHECK_OK(gen_add(g, &r, &id, &err), &err);
	while (gen_running(g))
		CHECK_OK(gen_step(g, &err), &err);
	CHECK(memcmp(first, gen_tokens(g, id, &n), sizeof(first)) == 0);
	/* a different seed gives a different draw (with temperature 1.5 over ~300 tokens) */
	CHECK(memcmp(first, gen_tokens(g, other, &n), sizeof(first)) != 0);
	gen_free(g);
	dl_kv_cache_free(c);
	gen_fixture_close(&f);
}

TEST(generate_rejects_bad_requests)
{
	gen_fixture f;
	dl_error	err;
	dl_status	st = DL_OK;
	dl_kv_cache *c;
	dl_generator *g;
	int32_t		prompt[20] = {0};
	int			id,
				n;
	dl_gen_request r = {prompt, 0, 4, -1, {0, 1.0f, 0, 1.0f}, 0, NULL};

	if (!gen_fixture_open("gptj-f32", &f, &err, &st))
		SKIP("fixture gptj-f32 not present");
	CHECKF(st == DL_OK, "%s", err.msg);
	CHECK_OK(dl_kv_cache_create(f.m, 1, 16, 16, &c, &err), &err);
	CHECK_OK(gen_create(f.m, c, &g, &err), &err);

	CHECK(gen_add(g, &r, &id, &err) == DL_EINVAL && strstr(err.msg, "empty"));
	r.n_prompt = 17;
	CHECK(gen_add(g, &r, &id, &err) == DL_EINVAL && strstr(err.msg, "more than the context of 16"));
	r.n_prompt = 3;
	r.max_new_tokens = 0;
	CHECK(gen_add(g, &r, &id, &err) == DL_EINVAL && strstr(err.msg, "max_new_tokens"));
	r.max_new_tokens = 100;
	r.sampling = (dl_sampling) {1, 1.0f, 0, 1.5f};
	CHECK(gen_add(g, &r, &id, &err) == DL_EINVAL && strstr(err.msg, "top_p"));

	/* a full context ends the sequence: 16 positions, so 3 + 14 tokens */
	r.sampling = (dl_sampling) {0, 1.0f, 0, 1.0f};
	CHECK_OK(gen_add(g, &r, &id, &err), &err);
	CHECK(gen_add(g, &r, &(int) {0}, &err) == DL_EINVAL && strstr(err.msg, "slots"));
	while (gen_running(g))
		CHECK_OK(gen_step(g, &err), &err);
	CHECK(gen_finished(g, id) == DL_FINISH_CONTEXT);
	gen_tokens(g, id, &n);
	CHECK(n == 14);
	gen_free(g);
	dl_kv_cache_free(c);
	gen_fixture_close(&f);
}
