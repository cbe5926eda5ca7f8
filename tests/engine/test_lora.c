/*
 * test_lora.c: LoRA adapters (lora.h) against PEFT: the fixture adapters
 * (tests/fixtures/<model>-lora-<tag>, made by make_fixtures.py build_lora) give PEFT's
 * logits, torch's gradients and AdamW steps; adapters and the base share one batch;
 * saving and loading keep every value; the dropout of the CPU operation is the mask it
 * says; and what cannot be served is refused with a reason.
 */
#include "harness.h"
#include "train_fixture.h"

#include "../../src/engine/dropout.h"
#include "../../src/engine/generate.h"
#include "../../src/engine/lora.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PROMPTS 4

/* The fixture adapters: base model, adapter directory. */
static const char *const adapters[][2] = {
	{"gptj-f32", "gptj-f32-lora-qv"},
	{"gptj-f32", "gptj-f32-lora-all"},
	{"neox-par-f32", "neox-par-f32-lora-qkv"},
	{"neox-seq-f32", "neox-seq-f32-lora-all"},
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
		dl_kv_cache *c = NULL;
		dl_status	st = lora_open(k, &f, &err);
		double		worst = 0;

		for (int i = 0; st == DL_OK && i < PROMPTS; i++)
		{
			char		key[64];
			const st_tensor *ids,
					   *want;
			float	   *ours;
			int			V = f.m->cfg.vocab_size;

			snprintf(key, sizeof(key), "prompt_%d_ids", i);
			ids = st_find(f.exp, key);
			snprintf(key, sizeof(key), "prompt_%d_logits", i);
			want = st_find(f.exp, key);
			if (ids == NULL || want == NULL)
			{
				st = dl_fail(&err, DL_EFORMAT, "%s lacks prompt %d", adapters[k][1], i);
				break;
			}
			ours = malloc(ids->numel * V * sizeof(float));
			st = dl_kv_cache_create(f.m, 1, f.m->cfg.max_pos, (int) ids->numel, &c, &err);
			if (st == DL_OK)
			{
				dl_seq		s = {0, 0, (int) ids->numel, (const int32_t *) ids->data,
				DL_LOGITS_ALL, f.a};

				st = dl_model_forward(f.m, c, &s, 1, ours, &err);
			}
			if (st == DL_OK)
				worst = fmax(worst, max_diff(ours, want, ids->numel * V));
			free(ours);
			dl_kv_cache_free(c);
			c = NULL;
		}
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
		st = dl_lora_save(f.a, "neox-seq-f32", out, &err);
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
	CHECK(dl_lora_save(f.a, "x", out, &err) == DL_EINVAL);
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
		w[k] = (dl_lora_mats) {A, B, dA[k], dB[k], R, 1.5f, k ? 0.0f : 0.25f, 99};
		be->lora_forward(be, out[k], N, u[k], k ? masked : in, &w[k], M, K, N, ws);
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
