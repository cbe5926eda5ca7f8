/*
 * test_lora.c: LoRA adapters (lora.h) against PEFT: the fixture adapters
 * (tests/fixtures/<model>-lora-<tag>, made by make_fixtures.py build_lora) give PEFT's
 * logits, torch's gradients and AdamW steps; adapters and the base share one batch;
 * saving and loading keep every value; the dropout of the CPU operation is the mask it
 * says; and what cannot be served is refused with a reason. Adapters merged into their
 * bases (lora_merge) give PEFT's logits alone, in the bases' dtypes and shards.
 */
#include "harness.h"
#include "train_fixture.h"

#include "../../src/engine/bf16.h"
#include "../../src/engine/dropout.h"
#include "../../src/engine/files.h"
#include "../../src/engine/generate.h"
#include "../../src/engine/lora.h"
#include "../../src/engine/train.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PROMPTS 4

/* The fixture adapters: base model, adapter directory. */
static const char *const adapters[][2] = {
	{"gptj-f32", "gptj-f32-lora-qv"},
	{"gptj-f32", "gptj-f32-lora-all"},
	{"neox-par-f32", "neox-par-f32-lora-qkv"},
	{"neox-seq-f32", "neox-seq-f32-lora-all"},
	{"neox-par-f32", "neox-par-f32-lora-tok"},
};

/* A model, an adapter of it and the adapter's expected logits, on a 2-thread CPU backend. */
typedef struct lora_fixture
{
	dl_backend *be;
	dl_model   *m;
	dl_lora    *a;
	st_set	   *exp;
} lora_fixture;

static void
lora_close(lora_fixture *f)
{
	st_close(f->exp);
	dl_lora_free(f->a);
	dl_model_free(f->m);
	if (f->be)
		f->be->destroy(f->be);
	memset(f, 0, sizeof(*f));
}

static dl_status
lora_open(int k, lora_fixture *f, dl_error *err)
{
	char		key[256];
	dl_status	st;

	memset(f, 0, sizeof(*f));
	snprintf(key, sizeof(key), "%s/expected.safetensors", adapters[k][1]);
	st = backend_cpu_create(2, 0, &f->be, err);
	if (st == DL_OK)
		st = dl_model_load(fixture_path(adapters[k][0]), f->be, &f->m, err);
	if (st == DL_OK)
		st = dl_lora_load(f->m, fixture_path(adapters[k][1]), &f->a, err);
	if (st == DL_OK)
		st = st_open_file(fixture_path(key), &f->exp, err);
	return st;
}

/* The largest |a - b| over n floats (b from a fixture tensor). */
static double
max_diff(const float *a, const st_tensor *b, size_t n)
{
	float	   *r = malloc(n * sizeof(float));
	double		d = 0;

	if (r == NULL || st_to_f32(b, r, NULL) != DL_OK)
		d = INFINITY;
	for (size_t i = 0; r && i < n && isfinite(d); i++)
		d = fmax(d, fabs(a[i] - r[i]));
	free(r);
	return d;
}

/* The logits of every one of the n tokens ids through m with adapter a (NULL: none). */
static dl_status
forward_all(dl_model *m, const dl_lora *a, const int32_t *ids, int n, float *logits,
			dl_error *err)
{
	dl_kv_cache *c = NULL;
	dl_seq		s = {0, 0, n, ids, DL_LOGITS_ALL, a};
	dl_status	st = dl_kv_cache_create(m, 1, m->cfg.max_pos, n, &c, err);

	if (st == DL_OK)
		st = dl_model_forward(m, c, &s, 1, logits, err);
	dl_kv_cache_free(c);
	return st;
}

/*
 * The largest difference over the fixture prompts of exp (each alone, every position)
 * between m's logits with adapter a (NULL: none) and exp's; what names exp in errors.
 */
static dl_status
prompts_worst(dl_model *m, const dl_lora *a, const st_set *exp, const char *what,
			  double *worst, dl_error *err)
{
	dl_status	st = DL_OK;

	*worst = 0;
	for (int i = 0; st == DL_OK && i < PROMPTS; i++)
	{
		char		key[64];
		const st_tensor *ids,
				   *want;
		float	   *ours;

		snprintf(key, sizeof(key), "prompt_%d_ids", i);
		ids = st_find(exp, key);
		snprintf(key, sizeof(key), "prompt_%d_logits", i);
		want = st_find(exp, key);
		if (ids == NULL || want == NULL)
			return dl_fail(err, DL_EFORMAT, "%s lacks prompt %d", what, i);
		ours = malloc(ids->numel * m->cfg.vocab_size * sizeof(float));
		st = forward_all(m, a, (const int32_t *) ids->data, (int) ids->numel, ours, err);
		if (st == DL_OK)
			*worst = fmax(*worst, max_diff(ours, want, ids->numel * m->cfg.vocab_size));
		free(ours);
	}
	return st;
}

/*
 * Every prompt's logits with each fixture adapter, each prompt alone, against PEFT's:
 * within 1e-4 (as the models' own, both sides in float32).
 */
TEST(lora_logits_match_peft)
{
	for (size_t k = 0; k < sizeof(adapters) / sizeof(adapters[0]); k++)
	{
		lora_fixture f;
		dl_error	err;
		dl_status	st = lora_open(k, &f, &err);
		double		worst = 0;

		if (st == DL_OK)
			st = prompts_worst(f.m, f.a, f.exp, adapters[k][1], &worst, &err);
		lora_close(&f);
		CHECK_OK(st, &err);
		printf("  %-22s logits within %.2e of PEFT's\n", adapters[k][1], worst);
		CHECKF(worst <= 1e-4, "%s: logits differ from PEFT's by %g", adapters[k][1], worst);
	}
}

/* The loss and the gradient of every adapter tensor on the training batch, against torch. */
TEST(lora_grads_match_torch)
{
	for (size_t k = 0; k < sizeof(adapters) / sizeof(adapters[0]); k++)
		train_check_grads(adapters[k][1], NULL, &TRAIN_TOL_F32, failed_);
}

/* Ten AdamW steps on the adapter alone (the base frozen), against torch's. */
TEST(lora_adamw_steps_match_torch)
{
	for (size_t k = 0; k < sizeof(adapters) / sizeof(adapters[0]); k++)
		train_check_steps(adapters[k][1], NULL, &TRAIN_TOL_F32, failed_);
}

/* gptj-f32 and its two fixture adapters on be. */
static dl_status
open_gptj_adapters(dl_backend *be, dl_model **m, dl_lora **a, dl_error *err)
{
	dl_status	st = dl_model_load(fixture_path("gptj-f32"), be, m, err);

	if (st == DL_OK)
		st = dl_lora_load(*m, fixture_path("gptj-f32-lora-qv"), &a[0], err);
	if (st == DL_OK)
		st = dl_lora_load(*m, fixture_path("gptj-f32-lora-all"), &a[1], err);
	return st;
}

/*
 * One batch of three sequences, each in its own slot: the base alone, and two adapters of
 * the same base. Each sequence's logits equal those it gets alone (a row's products do
 * not depend on the other rows), and the adapters change the base's.
 */
TEST(lora_mixed_batch_equals_each_alone)
{
	dl_backend *be;
	dl_model   *m = NULL;
	dl_lora    *a[2] = {NULL, NULL};
	dl_kv_cache *c = NULL;
	dl_error	err;
	dl_status	st;
	int32_t		ids[3][5] = {{5, 17, 200, 3, 99}, {7, 7, 40, 311, 12}, {1, 2, 3, 4, 5}};
	int			V = 0;
	float	   *alone = NULL,
			   *mixed = NULL;
	double		d = 0,
				changed = 0;

	CHECK_OK(backend_cpu_create(2, 0, &be, &err), &err);
	st = open_gptj_adapters(be, &m, a, &err);
	if (st == DL_OK)
		st = dl_kv_cache_create(m, 3, 64, 15, &c, &err);
	if (st == DL_OK)
	{
		const dl_lora *which[3] = {NULL, a[0], a[1]};
		dl_seq		seqs[3];

		V = m->cfg.vocab_size;
		alone = malloc(15 * V * sizeof(float));
		mixed = malloc(15 * V * sizeof(float));
		for (int i = 0; i < 3 && st == DL_OK; i++)
		{
			seqs[i] = (dl_seq) {2 - i, 0, 5, ids[i], DL_LOGITS_ALL, which[i]};
			st = dl_model_forward(m, c, &seqs[i], 1, alone + i * 5 * V, &err);
		}
		for (int i = 0; i < 3; i++)
			seqs[i].slot = i;
		if (st == DL_OK)
			st = dl_model_forward(m, c, seqs, 3, mixed, &err);
		for (int i = 0; st == DL_OK && i < 15 * V; i++)
			d = fmax(d, fabs(alone[i] - mixed[i]));
		/* the same tokens through the base: the adapter must have moved them */
		seqs[1] = (dl_seq) {0, 0, 5, ids[1], DL_LOGITS_ALL, NULL};
		if (st == DL_OK)
			st = dl_model_forward(m, c, &seqs[1], 1, mixed, &err);
		for (int i = 0; st == DL_OK && i < 5 * V; i++)
			changed = fmax(changed, fabs(alone[5 * V + i] - mixed[i]));
	}
	free(alone);
	free(mixed);
	dl_kv_cache_free(c);
	dl_lora_free(a[0]);
	dl_lora_free(a[1]);
	dl_model_free(m);
	be->destroy(be);
	CHECK_OK(st, &err);
	printf("  mixed batch within %.2e of each sequence alone; the adapter moves logits by %.2f\n",
		   d, changed);
	CHECKF(d <= 1e-5, "a sequence's logits in a mixed batch differ by %g", d);
	CHECK(changed > 0.01);
}

/*
 * A fresh adapter (B zero) leaves the model as it was, bit for bit; saved as PEFT's
 * directory and loaded again, an adapter keeps every value and its settings.
 */
TEST(lora_fresh_is_the_base_and_saving_keeps_it)
{
	lora_fixture f;
	dl_lora    *fresh = NULL,
			   *back = NULL;
	dl_lora_config cfg;
	dl_kv_cache *c = NULL;
	dl_error	err;
	char		dir[] = "/tmp/dolly-lora-XXXXXX",
				out[64];
	int32_t		ids[4] = {11, 22, 33, 44};
	float	   *base = NULL,
			   *adapted = NULL,
			   *x = NULL,
			   *y = NULL;
	dl_status	st = lora_open(3, &f, &err);
	int			same = 1,
				V = 0;

	lora_defaults(&cfg);
	cfg.r = 5;
	CHECK(mkdtemp(dir) != NULL);
	snprintf(out, sizeof(out), "%s/adapter", dir);
	if (st == DL_OK)
		st = dl_lora_create(f.m, &cfg, 7, &fresh, &err);
	if (st == DL_OK)
	{
		dl_seq		s = {0, 0, 4, ids, DL_LOGITS_ALL, NULL};

		V = f.m->cfg.vocab_size;
		base = malloc(4 * V * sizeof(float));
		adapted = malloc(4 * V * sizeof(float));
		st = dl_kv_cache_create(f.m, 1, 16, 4, &c, &err);
		if (st == DL_OK)
			st = dl_model_forward(f.m, c, &s, 1, base, &err);
		s.lora = fresh;
		if (st == DL_OK)
			st = dl_model_forward(f.m, c, &s, 1, adapted, &err);
		if (st == DL_OK)
			same = memcmp(base, adapted, 4 * V * sizeof(float)) == 0;
	}
	if (st == DL_OK)
		st = dl_lora_save(f.a, "neox-seq-f32", NULL, out, &err);
	if (st == DL_OK)
		st = dl_lora_load(f.m, out, &back, &err);
	if (st == DL_OK)
	{
		x = malloc(f.a->bytes);
		y = malloc(back->bytes);
		st = f.be->download(f.be, x, f.a->mem, f.a->bytes, &err);
		if (st == DL_OK)
			st = f.be->download(f.be, y, back->mem, back->bytes, &err);
	}
	CHECK_OK(st, &err);
	CHECK(same);
	CHECKF(back->bytes == f.a->bytes && memcmp(x, y, f.a->bytes) == 0,
		   "the saved adapter's tensors differ");
	CHECK(back->r == 3 && back->alpha == 6.0f && back->rslora && back->ntargets == 4);
	CHECK(fabsf(back->scale - 6.0f / sqrtf(3.0f)) < 1e-6f);
	CHECK(strcmp(back->base_name, "neox-seq-f32") == 0);
	CHECK(fresh->ntargets == 1 && strcmp(fresh->targets[0].module, "query_key_value") == 0);
	CHECK(dl_lora_param_count(fresh) == (int64_t) f.m->cfg.n_layer * 5 * (32 + 96));
	/* the directory must not exist yet */
	CHECK(dl_lora_save(f.a, "x", NULL, out, &err) == DL_EINVAL);
	free(base);
	free(adapted);
	free(x);
	free(y);
	dl_kv_cache_free(c);
	dl_lora_free(fresh);
	dl_lora_free(back);
	lora_close(&f);
	snprintf(out, sizeof(out), "%s/adapter/adapter_config.json", dir);
	unlink(out);
	snprintf(out, sizeof(out), "%s/adapter/adapter_model.safetensors", dir);
	unlink(out);
	snprintf(out, sizeof(out), "%s/adapter", dir);
	rmdir(out);
	rmdir(dir);
}

/*
 * A tokenizer as a base's comes, without Dolly's tokens: the legacy fixture's vocabulary
 * and merges alone (its added_tokens.json and special_tokens_map.json have them), linked
 * into dir.
 */
static dl_status
plain_tokenizer(const char *dir, dl_tokenizer **tok, dl_error *err)
{
	static const char *const files[] = {"vocab.json", "merges.txt"};
	char		from[PATH_MAX],
				to[PATH_MAX + 64];

	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++)
	{
		char		rel[256];

		snprintf(rel, sizeof(rel), "tokenizer-legacy/%s", files[i]);
		snprintf(to, sizeof(to), "%s/%s", dir, files[i]);
		if (realpath(fixture_path(rel), from) == NULL || symlink(from, to) != 0)
			return dl_fail(err, DL_EIO, "cannot link \"%s\"", to);
	}
	return tok_load_dir(dir, tok, err);
}

/*
 * A base without Dolly's tokens (neox-par-f32's 528 rows, a tokenizer of 512): the
 * adapter owns their rows (512 .. 514, the ids the tokenizer gives them), which start as
 * the base's; saved with its tokenizer and PEFT's trainable_token_indices, and loaded
 * back the same, logits included. Refused: a base whose tables have no such rows, token
 * rows over tied embeddings, saving without the tokenizer.
 */
TEST(lora_token_rows_for_a_base_without_dolly_tokens)
{
	lora_fixture f;
	dl_tokenizer *tok = NULL,
			   *saved = NULL,
			   *small = NULL;
	dl_lora    *fresh = NULL,
			   *back = NULL,
			   *none = NULL;
	dl_lora_config cfg;
	dl_model	narrow,
				tied;
	dl_error	err;
	char		dir[64],
				tokdir[4200],
				out[4200];
	int32_t		ids[6] = {11, 512, 40, 513, 514, 7};
	float	   *lg[3] = {NULL, NULL, NULL};
	double		fresh_d = 0;
	int			same = 0,
				V = 0;
	dl_status	st = lora_open(4, &f, &err);

	CHECK(scratch_dir(dir, sizeof(dir)) != NULL);
	snprintf(tokdir, sizeof(tokdir), "%s/tok", dir);
	snprintf(out, sizeof(out), "%s/adapter", dir);
	CHECK(mkdir(tokdir, 0700) == 0);
	if (st == DL_OK)
		st = plain_tokenizer(tokdir, &tok, &err);
	CHECK(tok == NULL || tok_token_id(tok, "### End") < 0);
	lora_defaults(&cfg);
	cfg.dropout = 0.0f;
	cfg.r = 4;					/* the fixture adapter's */
	if (st == DL_OK)
		st = lora_dolly_tokens(f.m, tok, &cfg, &err);
	if (st == DL_OK)
		st = dl_lora_create(f.m, &cfg, 7, &fresh, &err);
	if (st == DL_OK)
	{
		V = f.m->cfg.vocab_size;
		for (int k = 0; k < 3; k++)
			lg[k] = malloc(6 * V * sizeof(float));
		st = forward_all(f.m, NULL, ids, 6, lg[0], &err);
	}
	if (st == DL_OK)
		st = forward_all(f.m, fresh, ids, 6, lg[1], &err);
	for (int i = 0; st == DL_OK && i < 6 * V; i++)
		fresh_d = fmax(fresh_d, fabs(lg[0][i] - lg[1][i]));
	/* the fixture adapter's rows, saved and loaded back */
	if (st == DL_OK)
		st = dl_lora_save(f.a, "neox-par-f32", tok, out, &err);
	if (st == DL_OK)
		st = dl_lora_load(f.m, out, &back, &err);
	if (st == DL_OK)
		st = forward_all(f.m, f.a, ids, 6, lg[1], &err);
	if (st == DL_OK)
		st = forward_all(f.m, back, ids, 6, lg[2], &err);
	if (st == DL_OK)
		same = memcmp(lg[1], lg[2], 6 * V * sizeof(float)) == 0 &&
			memcmp(lg[0], lg[1], 6 * V * sizeof(float)) != 0;
	if (st == DL_OK)
		st = tok_load_dir(out, &saved, &err);
	CHECK_OK(st, &err);
	printf("  token rows %d .. %d; a fresh adapter within %.1e of the base; saved and loaded back: %s\n",
		   cfg.tok0, cfg.tok0 + cfg.ntok - 1, fresh_d, same ? "the same logits" : "DIFFERENT");
	CHECK(cfg.tok0 == 512 && cfg.ntok == 3 && tok_token_id(tok, "### End") == 512);
	CHECK(tok_token_id(tok, "### Response:\n") == 514);
	CHECK(fresh->ntok == 3 && dl_lora_param_count(fresh) == dl_lora_param_count(f.a));
	CHECK(fresh_d <= 1e-5);
	CHECK(same);
	CHECK(back->tok0 == 512 && back->ntok == 3);
	CHECK(tok_token_id(saved, "### Instruction:") == 513);

	/* refusals */
	CHECK(dl_lora_save(f.a, "x", NULL, out, &err) == DL_EINVAL && strstr(err.msg, "tokenizer"));
	narrow = *f.m;
	narrow.cfg.vocab_size = 513;
	snprintf(tokdir, sizeof(tokdir), "%s/tok2", dir);
	CHECK(mkdir(tokdir, 0700) == 0);
	CHECK_OK(plain_tokenizer(tokdir, &small, &err), &err);
	CHECK(lora_dolly_tokens(&narrow, small, &cfg, &err) == DL_EUNSUPPORTED &&
		  strstr(err.msg, "no row") && err.hint[0]);
	tied = *f.m;
	tied.cfg.tie_embeddings = 1;
	cfg.tok0 = 512;
	cfg.ntok = 3;
	CHECK(dl_lora_create(&tied, &cfg, 1, &none, &err) == DL_EUNSUPPORTED && none == NULL);
	for (int k = 0; k < 3; k++)
		free(lg[k]);
	tok_free(tok);
	tok_free(saved);
	tok_free(small);
	dl_lora_free(fresh);
	dl_lora_free(back);
	lora_close(&f);
	scratch_done(dir);
}

/*
 * The CPU operation's dropout is the mask dropout.h draws: forward and backward with
 * p > 0 equal those without dropout on the input multiplied by the mask, its input
 * gradient masked the same way; about p of the elements are dropped.
 */
TEST(lora_dropout_is_the_drawn_mask)
{
	enum {M = 37, K = 48, N = 40, R = 4};
	dl_backend *be;
	dl_error	err;
	static float in[M * K], masked[M * K], mask[M * K], A[R * K], B[N * R], dout[M * N],
				out[2][M * N], u[2][M * R], dA[2][R * K], dB[2][N * R], din[2][M * K],
				ws[M * K];
	dl_lora_mats w[2];
	int			dropped = 0;
	double		d = 0;

	CHECK_OK(backend_cpu_create(2, 0, &be, &err), &err);
	for (int i = 0; i < M * K; i++)
	{
		in[i] = sinf(0.37f * i);
		mask[i] = dropout_factor(99, (uint32_t) (i / K), (uint32_t) (i % K), 0.25f);
		masked[i] = in[i] * mask[i];
		dropped += mask[i] == 0.0f;
	}
	for (int i = 0; i < R * K; i++)
		A[i] = cosf(0.11f * i);
	for (int i = 0; i < N * R; i++)
		B[i] = sinf(0.05f * i + 1);
	for (int i = 0; i < M * N; i++)
		dout[i] = cosf(0.29f * i);
	memset(out, 0, sizeof(out));
	memset(dA, 0, sizeof(dA));
	memset(dB, 0, sizeof(dB));
	memset(din, 0, sizeof(din));
	for (int k = 0; k < 2; k++)
	{
		dl_lora_seg seg;

		w[k] = (dl_lora_mats) {A, B, dA[k], dB[k], R, 1.5f, k ? 0.0f : 0.25f, 99};
		seg = (dl_lora_seg) {w[k], 0, M, 0, N};
		be->lora_forward(be, out[k], N, u[k], k ? masked : in, K, &seg, 1, ws);
		be->lora_backward(be, din[k], dout, N, u[k], k ? masked : in, &w[k], M, K, N, ws);
	}
	for (int i = 0; i < M * N; i++)
		d = fmax(d, fabs(out[0][i] - out[1][i]));
	for (int i = 0; i < R * K; i++)
		d = fmax(d, fabs(dA[0][i] - dA[1][i]));
	for (int i = 0; i < N * R; i++)
		d = fmax(d, fabs(dB[0][i] - dB[1][i]));
	for (int i = 0; i < M * K; i++)
		d = fmax(d, fabs(din[0][i] - din[1][i] * mask[i]));
	be->destroy(be);
	printf("  %d of %d dropped (p 0.25); dropout within %.2e of the explicit mask\n", dropped,
		   M * K, d);
	CHECK(d <= 1e-4);
	CHECK(dropped > M * K / 5 && dropped < M * K * 3 / 10);
}

/* What an adapter cannot be: refused, each with its reason. */
TEST(lora_rejects_what_it_cannot_serve)
{
	lora_fixture f;
	dl_model   *neox = NULL;
	dl_lora    *a = NULL;
	dl_lora_config cfg;
	dl_error	err;
	char		dir[] = "/tmp/dolly-lora-XXXXXX",
				path[128];
	FILE	   *fp;
	static const char *const configs[][2] = {
		{"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": \"q_proj|v_proj\"}", "not a list"},
		{"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\"], \"use_dora\": true}", "use_dora"},
		{"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\"], \"bias\": \"all\"}", "bias"},
		{"{\"peft_type\": \"IA3\", \"target_modules\": [\"q_proj\"]}", "IA3"},
		{"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\"]}", "adapter_model.safetensors"},
	};

	CHECK_OK(lora_open(0, &f, &err), &err);
	CHECK_OK(dl_model_load(fixture_path("neox-par-f32"), f.be, &neox, &err), &err);
	/* an adapter of GPT-J on GPT-NeoX: no such module */
	CHECK(dl_lora_load(neox, fixture_path("gptj-f32-lora-qv"), &a, &err) == DL_EINVAL);
	CHECK(strstr(err.msg, "q_proj") && strstr(err.hint, "query_key_value"));
	/* an adapter of one base run with another model */
	{
		dl_kv_cache *c = NULL;
		int32_t		id = 1;
		float		logits[2048];
		dl_seq		s = {0, 0, 1, &id, DL_LOGITS_LAST, f.a};

		CHECK_OK(dl_kv_cache_create(neox, 1, 8, 1, &c, &err), &err);
		CHECK(neox->cfg.vocab_size <= 2048);
		CHECK(dl_model_forward(neox, c, &s, 1, logits, &err) == DL_EINVAL);
		CHECK(strstr(err.msg, "another model"));
		dl_kv_cache_free(c);
	}
	lora_defaults(&cfg);
	cfg.r = 0;
	CHECK(dl_lora_create(f.m, &cfg, 1, &a, &err) == DL_EINVAL && strstr(err.msg, "rank"));
	cfg.r = DL_LORA_MAX_RANK + 1;
	CHECK(dl_lora_create(f.m, &cfg, 1, &a, &err) == DL_EINVAL);
	lora_defaults(&cfg);
	cfg.dropout = 1.0f;
	CHECK(dl_lora_create(f.m, &cfg, 1, &a, &err) == DL_EINVAL && strstr(err.msg, "dropout"));
	lora_defaults(&cfg);
	cfg.alpha = 0;
	CHECK(dl_lora_create(f.m, &cfg, 1, &a, &err) == DL_EINVAL && strstr(err.msg, "alpha"));
	lora_defaults(&cfg);
	strcpy(cfg.targets[0], "c_attn");
	cfg.ntargets = 1;
	CHECK(dl_lora_create(f.m, &cfg, 1, &a, &err) == DL_EINVAL && strstr(err.msg, "c_attn"));
	CHECK(mkdtemp(dir) != NULL);
	for (size_t i = 0; i < sizeof(configs) / sizeof(configs[0]); i++)
	{
		snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
		fp = fopen(path, "w");
		CHECK(fp != NULL);
		fputs(configs[i][0], fp);
		fclose(fp);
		CHECK(dl_lora_load(f.m, dir, &a, &err) != DL_OK);
		CHECKF(strstr(err.msg, configs[i][1]) != NULL, "config %zu: %s", i, err.msg);
		CHECK(a == NULL);
	}
	unlink(path);
	rmdir(dir);
	CHECK(dl_lora_load(f.m, "/nonexistent/adapter", &a, &err) != DL_OK);
	dl_model_free(neox);
	lora_close(&f);
}

/*
 * The generator with sequences of different adapters admitted together (the decode
 * steps group them by adapter): each sequence's greedy tokens equal its tokens alone.
 */
TEST(lora_generator_mixes_adapters)
{
	enum {SEQS = 6, NEW = 12};
	dl_backend *be;
	dl_model   *m = NULL;
	dl_lora    *a[2] = {NULL, NULL};
	dl_kv_cache *c = NULL;
	dl_generator *g = NULL;
	dl_error	err;
	dl_status	st;
	int32_t		prompt[SEQS][4],
				alone[SEQS][NEW];
	int			id[SEQS],
				same = 1;

	CHECK_OK(backend_cpu_create(2, 0, &be, &err), &err);
	st = open_gptj_adapters(be, &m, a, &err);
	if (st == DL_OK)
		st = dl_kv_cache_create(m, SEQS, 32, 64, &c, &err);
	if (st == DL_OK)
		st = gen_create(m, c, &g, &err);
	for (int k = 0; k < SEQS; k++)
		for (int j = 0; j < 4; j++)
			prompt[k][j] = (int32_t) (7 * k + 13 * j + 1);
	/* together on the second pass (pass 0: each alone) */
	for (int pass = 0; pass < 2 && st == DL_OK; pass++)
		for (int k = 0; k < SEQS && st == DL_OK; k += pass ? SEQS : 1)
		{
			int			first = k,
						last = pass ? SEQS : k + 1;

			for (int s = first; s < last && st == DL_OK; s++)
			{
				/* sequence s: the model alone, adapter 0 or adapter 1, in turn */
				dl_gen_request r = {prompt[s], 4, NEW, -1, {0, 1.0f, 0, 1.0f}, 0,
				s % 3 ? a[s % 3 - 1] : NULL};

				st = gen_add(g, &r, &id[s], &err);
			}
			while (st == DL_OK && gen_running(g))
				st = gen_step(g, &err);
			for (int s = first; s < last && st == DL_OK; s++)
			{
				int			n;
				const int32_t *t = gen_tokens(g, id[s], &n);

				if (pass == 0)
					memcpy(alone[s], t, sizeof(alone[s]));
				else
					same &= n == NEW && memcmp(alone[s], t, sizeof(alone[s])) == 0;
				gen_remove(g, id[s]);
			}
		}
	gen_free(g);
	dl_kv_cache_free(c);
	dl_lora_free(a[0]);
	dl_lora_free(a[1]);
	dl_model_free(m);
	be->destroy(be);
	CHECK_OK(st, &err);
	CHECKF(same, "a sequence's tokens differ when adapters share the batch");
}

/*
 * How many of merged's tensors differ in bytes from base's; -1 when their names, dtypes
 * or shapes differ.
 */
static int
changed_tensors(const st_set *merged, const st_set *base)
{
	int			n = 0;

	if (merged->ntensors != base->ntensors)
		return -1;
	for (int i = 0; i < merged->ntensors; i++)
	{
		const st_tensor *t = &merged->tensors[i],
				   *b = st_find(base, t->name);

		if (b == NULL || b->dtype != t->dtype || b->ndim != t->ndim ||
			memcmp(b->shape, t->shape, sizeof(t->shape)) != 0)
			return -1;
		n += memcmp(b->data, t->data, t->nbytes) != 0;
	}
	return n;
}

/*
 * Each fixture adapter merged into its base (lora_merge): the merged model alone gives
 * PEFT's logits with the adapter within 1e-4, and differs from its base in the targets'
 * weights alone, in as many shards.
 */
TEST(lora_merge_matches_peft)
{
	char		tmp[64],
				out[128],
				base_dir[256],
				path[256];

	CHECKF(scratch_dir(tmp, sizeof(tmp)) != NULL, "mkdtemp");
	for (size_t k = 0; k < sizeof(adapters) / sizeof(adapters[0]); k++)
	{
		dl_backend *be = NULL;
		dl_model   *m = NULL;
		dl_lora    *a = NULL;
		st_set	   *exp = NULL,
				   *merged = NULL,
				   *base = NULL;
		dl_error	err;
		double		worst = 0;
		int			changed = -1,
					targets = 0,
					shards = 0;
		dl_status	st;

		snprintf(out, sizeof(out), "%s/merged-%zu", tmp, k);
		/* fixture_path's buffer is one: the base's path is copied */
		snprintf(base_dir, sizeof(base_dir), "%s", fixture_path(adapters[k][0]));
		snprintf(path, sizeof(path), "%s/expected.safetensors", adapters[k][1]);
		st = lora_merge(base_dir, fixture_path(adapters[k][1]), out, &err);
		if (st == DL_OK)
			st = st_open_file(fixture_path(path), &exp, &err);
		if (st == DL_OK)
			st = backend_cpu_create(2, 0, &be, &err);
		if (st == DL_OK)
			st = dl_model_load(out, be, &m, &err);
		if (st == DL_OK)
			st = prompts_worst(m, NULL, exp, adapters[k][1], &worst, &err);
		if (st == DL_OK)
			st = lora_read(fixture_path(adapters[k][1]), &m->cfg, 1, &a, &err);
		if (st == DL_OK)
			st = st_open(out, &merged, &err);
		if (st == DL_OK)
			st = st_open(base_dir, &base, &err);
		if (st == DL_OK)
		{
			changed = changed_tensors(merged, base);
			/* each target's weight, and the two tables of the token rows */
			targets = a->ntargets * m->cfg.n_layer + (a->ntok ? 2 : 0);
			shards = merged->nfiles == base->nfiles ? merged->nfiles : -1;
		}
		st_close(base);
		st_close(merged);
		dl_lora_free(a);
		st_close(exp);
		dl_model_free(m);
		if (be)
			be->destroy(be);
		if (st != DL_OK || worst > 1e-4 || changed != targets || shards < 1)
			scratch_done(tmp);
		CHECK_OK(st, &err);
		printf("  %-22s merged: logits within %.2e of PEFT's, %d tensors changed, %d shard(s)\n",
			   adapters[k][1], worst, changed, shards);
		CHECKF(worst <= 1e-4, "%s merged: logits differ from PEFT's by %g", adapters[k][1], worst);
		CHECKF(changed == targets, "%s merged: %d tensors changed, %d targets", adapters[k][1],
			   changed, targets);
		CHECK(shards >= 1);
	}
	scratch_done(tmp);
}

/*
 * Bases in bfloat16 and half: a fresh adapter of the float32 twin (every module, B made
 * nonzero), saved, merged into the 16-bit base and into its PyTorch twin. The merge keeps
 * every dtype and every other tensor's bytes, both twins merge to the same tensors, and
 * the merged model's logits are those of the adapter run over the 16-bit base within the
 * rounding of the merged weights to 8 (or 11) significant bits.
 */
TEST(lora_merge_16bit_bases)
{
	static const struct
	{
		const char *f32,
				   *base,
				   *bin;
		const char *targets[DL_LORA_MAX_TARGETS];
		int			ntargets;
		double		rel_tol;	/* of the largest logit */
	}			bases[] = {
		{"gptj-f32", "gptj-bf16", "gptj-bf16-bin",
		{"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"}, 6, 1.0 / 128},
		{"neox-par-f32", "neox-par-f16", "neox-par-f16-bin",
		{"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}, 4, 1.0 / 1024},
	};
	enum {T = 12};
	char		tmp[64],
				adapter[128],
				out[128],
				out_bin[128];
	int32_t		ids[T];

	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) (37 * i + 5) % 500;
	CHECKF(scratch_dir(tmp, sizeof(tmp)) != NULL, "mkdtemp");
	for (size_t k = 0; k < sizeof(bases) / sizeof(bases[0]); k++)
	{
		dl_backend *be = NULL;
		dl_model   *m32 = NULL,
				   *m16 = NULL,
				   *mm = NULL;
		dl_lora    *fresh = NULL,
				   *a16 = NULL;
		dl_lora_config cfg;
		st_set	   *merged = NULL,
				   *merged_bin = NULL,
				   *base = NULL;
		float	   *buf = NULL,
				   *unmerged = NULL,
				   *ours = NULL;
		dl_error	err;
		double		d = 0,
					moved = 0,
					big = 0;
		int			changed = -1,
					twins = -1,
					shards = 0,
					V = 0;
		dl_status	st;

		snprintf(adapter, sizeof(adapter), "%s/adapter-%zu", tmp, k);
		snprintf(out, sizeof(out), "%s/merged-%zu", tmp, k);
		snprintf(out_bin, sizeof(out_bin), "%s/merged-bin-%zu", tmp, k);
		lora_defaults(&cfg);
		cfg.ntargets = bases[k].ntargets;
		for (int i = 0; i < cfg.ntargets; i++)
			snprintf(cfg.targets[i], sizeof(cfg.targets[i]), "%s", bases[k].targets[i]);
		st = backend_cpu_create(2, 0, &be, &err);
		if (st == DL_OK)
			st = dl_model_load(fixture_path(bases[k].f32), be, &m32, &err);
		if (st == DL_OK)
			st = dl_lora_create(m32, &cfg, 3, &fresh, &err);
		/* B: values of the size A's products need to move the logits */
		for (int i = 1; st == DL_OK && i < fresh->nmap; i += 2)
		{
			const dl_tensor_map *e = &fresh->map[i];
			size_t		n = (size_t) e->shape[0] * e->shape[1];

			free(buf);
			buf = malloc(n * sizeof(float));
			for (size_t j = 0; j < n; j++)
				buf[j] = 0.05f * sinf(0.7f * (float) j + (float) i);
			st = be->upload(be, (char *) fresh->mem + e->offset, buf, n * sizeof(float), &err);
		}
		if (st == DL_OK)
			st = dl_lora_save(fresh, bases[k].f32, NULL, adapter, &err);
		if (st == DL_OK)
			st = lora_merge(fixture_path(bases[k].base), adapter, out, &err);
		if (st == DL_OK)
			st = lora_merge(fixture_path(bases[k].bin), adapter, out_bin, &err);
		if (st == DL_OK)
			st = st_open(out, &merged, &err);
		if (st == DL_OK)
			st = st_open(out_bin, &merged_bin, &err);
		if (st == DL_OK)
			st = st_open(fixture_path(bases[k].base), &base, &err);
		if (st == DL_OK)
		{
			changed = changed_tensors(merged, base);
			twins = changed_tensors(merged_bin, merged);
			st_close(base);
			base = NULL;
			st = st_open(fixture_path(bases[k].bin), &base, &err);
		}
		if (st == DL_OK)
			shards = merged_bin->nfiles == base->nfiles ? merged_bin->nfiles : -1;
		/* the adapter over the 16-bit base, and the merged model */
		if (st == DL_OK)
			st = dl_model_load(fixture_path(bases[k].base), be, &m16, &err);
		if (st == DL_OK)
			st = dl_lora_load(m16, adapter, &a16, &err);
		if (st == DL_OK)
			st = dl_model_load(out, be, &mm, &err);
		if (st == DL_OK)
		{
			V = m16->cfg.vocab_size;
			unmerged = malloc((size_t) T * V * sizeof(float));
			ours = malloc((size_t) T * V * sizeof(float));
			st = forward_all(m16, a16, ids, T, unmerged, &err);
		}
		if (st == DL_OK)
			st = forward_all(mm, NULL, ids, T, ours, &err);
		for (int i = 0; st == DL_OK && i < T * V; i++)
		{
			d = fmax(d, fabs(ours[i] - unmerged[i]));
			big = fmax(big, fabs(unmerged[i]));
		}
		if (st == DL_OK)
			st = forward_all(m16, NULL, ids, T, ours, &err);
		for (int i = 0; st == DL_OK && i < T * V; i++)
			moved = fmax(moved, fabs(ours[i] - unmerged[i]));
		free(buf);
		free(unmerged);
		free(ours);
		st_close(base);
		st_close(merged);
		st_close(merged_bin);
		dl_lora_free(a16);
		dl_lora_free(fresh);
		dl_model_free(mm);
		dl_model_free(m16);
		dl_model_free(m32);
		if (be)
			be->destroy(be);
		if (st != DL_OK || changed != cfg.ntargets * 2 || twins != 0 || shards < 1 ||
			d > bases[k].rel_tol * big)
			scratch_done(tmp);
		CHECK_OK(st, &err);
		printf("  %-16s merged: logits within %.2e of the adapter's (largest %.2f, moved by %.2f), "
			   "%d tensors changed, %d shard(s) from .bin\n", bases[k].base, d, big, moved, changed,
			   shards);
		CHECKF(changed == cfg.ntargets * 2, "%s: %d tensors changed", bases[k].base, changed);
		CHECKF(twins == 0, "%s: the merges of the twins differ in %d tensors", bases[k].base, twins);
		CHECK(shards >= 1);
		CHECKF(d <= bases[k].rel_tol * big, "%s: merged logits differ by %g", bases[k].base, d);
		CHECK(moved > 20 * d);
	}
	scratch_done(tmp);
}

/*
 * float_to_f16 (bf16.h, the merge's rounding to half): every half goes back to itself,
 * halfway values round to the even neighbour, overflow becomes infinity, NaN stays NaN.
 */
TEST(lora_merge_rounds_half_to_nearest_even)
{
	int			bad = 0;

	for (uint32_t h = 0; h < 0x10000; h++)
	{
		float		f = f16_to_float((uint16_t) h);

		if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff))
			bad += !isnan(f16_to_float(float_to_f16(f)));
		else
		{
			bad += float_to_f16(f) != h;
			/* halfway to the next half up in magnitude: the even one of the two */
			if ((h & 0x7fff) < 0x7bff)
			{
				float		mid = (f + f16_to_float((uint16_t) (h + 1))) / 2;

				bad += float_to_f16(mid) != ((h & 1) ? h + 1 : h);
			}
		}
	}
	CHECKF(bad == 0, "%d halves round wrongly", bad);
	CHECK(float_to_f16(65520.0f) == 0x7c00 && float_to_f16(-1e6f) == 0xfc00);
	CHECK(float_to_f16(65519.0f) == 0x7bff && float_to_f16(0x1p-25f) == 0);
	CHECK(float_to_f16(0x1p-25f * 1.5f) == 1);
}

/*
 * What a merge refuses, leaving no directory: an existing output, an adapter of the
 * other architecture, an adapter lacking a tensor.
 */
TEST(lora_merge_refusals)
{
	char		tmp[64],
				out[128],
				bad[128],
				gptj[256],
				neox[256],
				path[256];
	char	   *text = NULL;
	size_t		len = 0;
	st_set	   *set = NULL;
	st_write_tensor w[64];
	dl_error	err;
	dl_status	st[3];
	FILE	   *fp;

	CHECKF(scratch_dir(tmp, sizeof(tmp)) != NULL, "mkdtemp");
	snprintf(out, sizeof(out), "%s/merged", tmp);
	/* fixture_path's buffer is one: the bases' paths are copied */
	snprintf(gptj, sizeof(gptj), "%s", fixture_path("gptj-f32"));
	snprintf(neox, sizeof(neox), "%s", fixture_path("neox-par-f32"));
	/* the output exists */
	st[0] = lora_merge(gptj, fixture_path("gptj-f32-lora-qv"), tmp, &err);
	CHECKF(st[0] == DL_EINVAL && strstr(err.msg, "exists"), "%s", err.msg);
	/* GPT-J's adapter over GPT-NeoX */
	st[1] = lora_merge(neox, fixture_path("gptj-f32-lora-qv"), out, &err);
	CHECKF(st[1] == DL_EINVAL && strstr(err.msg, "q_proj") && strstr(err.hint, "query_key_value"),
		   "%s", err.msg);
	CHECK(access(out, F_OK) != 0);
	/* the fixture adapter less its last tensor */
	snprintf(bad, sizeof(bad), "%s/bad", tmp);
	CHECK(mkdir(bad, 0755) == 0);
	CHECK_OK(file_read(fixture_path("gptj-f32-lora-qv/adapter_config.json"), "adapter config", 0,
					   &text, &len, &err), &err);
	snprintf(path, sizeof(path), "%s/adapter_config.json", bad);
	fp = fopen(path, "w");
	CHECK(fp != NULL);
	fwrite(text, 1, len, fp);
	fclose(fp);
	free(text);
	CHECK_OK(lora_open_tensors(fixture_path("gptj-f32-lora-qv"), &set, &err), &err);
	CHECK(set->ntensors <= 64);
	for (int i = 0; i < set->ntensors; i++)
	{
		const st_tensor *t = &set->tensors[i];

		w[i] = (st_write_tensor) {t->name, t->dtype, t->ndim, {0}, t->data};
		memcpy(w[i].shape, t->shape, sizeof(t->shape));
	}
	snprintf(path, sizeof(path), "%s/adapter_model.safetensors", bad);
	CHECK_OK(st_write(path, w, set->ntensors - 1, NULL, 0, &err), &err);
	st[2] = lora_merge(gptj, bad, out, &err);
	CHECKF(st[2] == DL_EFORMAT && strstr(err.msg, set->tensors[set->ntensors - 1].name),
		   "%s", err.msg);
	st_close(set);
	CHECK(access(out, F_OK) != 0);
	scratch_done(tmp);
}

/*
 * An adapter trained with activation checkpointing and dropout takes the same steps, bit
 * for bit, as without checkpointing: the recomputed layers draw the same masks, and the
 * low-rank products of the projections the recomputation leaves out are kept.
 */
TEST(lora_checkpoint_and_dropout_keep_the_steps)
{
	static const char *const names[] = {"gptj-f32-lora-all", "neox-seq-f32-lora-all"};

	for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++)
	{
		train_fixture f[2];
		dl_train_config cfg;
		dl_trainer *tr[2] = {NULL, NULL};
		dl_error	err;
		dl_status	st = DL_OK;
		int			same = 1,
					step;

		for (int c = 0; c < 2 && st == DL_OK; c++)
			if (!train_open(names[k], 2, &f[c], &err, &st))
				SKIP("fixture %s absent", names[k]);
		for (int c = 0; c < 2 && st == DL_OK; c++)
		{
			f[c].lora->dropout = 0.1f;
			fixture_config(&f[c], &cfg);
			cfg.checkpoint = c;
			st = trainer_create(f[c].m, f[c].lora, &cfg, NULL, 0, &tr[c], &err);
		}
		for (step = 0; step < 3 && st == DL_OK && same; step++)
		{
			double		loss[2];
			int64_t		nl[2];
			size_t		n;
			float		lr,
						norm;

			for (int c = 0; c < 2 && st == DL_OK; c++)
				st = trainer_backward(tr[c], f[c].ex, f[c].n, &loss[c], &nl[c], &err);
			if (st == DL_OK)
			{
				/* n is set by the calls, before it sizes the comparison */
				const float *g0 = trainer_grads(tr[0], &n),
						   *g1 = trainer_grads(tr[1], &n);

				same = loss[0] == loss[1] && nl[0] == nl[1] && memcmp(g0, g1, n * sizeof(float)) == 0;
			}
			for (int c = 0; c < 2 && st == DL_OK; c++)
				st = trainer_update(tr[c], nl[c], step, &lr, &norm, &err);
		}
		for (int c = 0; c < 2; c++)
		{
			trainer_free(tr[c]);
			train_close(&f[c]);
		}
		CHECK_OK(st, &err);
		CHECKF(same, "%s: step %d differs with checkpointing", names[k], step);
	}
}
