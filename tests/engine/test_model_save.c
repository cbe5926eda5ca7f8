/*
 * test_model_save.c: saving a model as a Hugging Face directory and loading it back
 * (same tensors as the fixture checkpoints, same logits, tied and untied, both
 * architectures), the atomic write, random initialisation, and growing the vocabulary
 * for Dolly's special tokens; the PyTorch fixtures against their safetensors twins, and
 * their conversion to safetensors (model_convert). That transformers loads what we save
 * is checked by tests/check_saved_model.py, outside CI (it needs torch).
 */
#include "harness.h"
#include "prompt.h"
#include "safetensors.h"
#include "train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* test_dataset.c: the fixture tokenizer without Dolly's special tokens. */
dl_tokenizer *tokenizer_without_dolly_keys(void);

/* Whether path exists. */
static int
exists(const char *path)
{
	struct stat sb;

	return lstat(path, &sb) == 0;
}

/* The [n, V] logits of ids through m (malloc'd), NULL on failure. */
static float *
logits_of(dl_model *m, const int32_t *ids, int n)
{
	dl_kv_cache *c = NULL;
	float	   *lg = malloc((size_t) n * m->cfg.vocab_size * sizeof(float));
	dl_seq		s = {0, 0, n, ids, DL_LOGITS_ALL, NULL};
	dl_error	err;

	if (lg == NULL || dl_kv_cache_create(m, 1, n, n, &c, &err) != DL_OK ||
		dl_model_forward(m, c, &s, 1, lg, &err) != DL_OK)
	{
		fprintf(stderr, "  forward failed: %s\n", lg ? err.msg : "out of memory");
		free(lg);
		lg = NULL;
	}
	dl_kv_cache_free(c);
	return lg;
}

/* Map entry i of m as float32 (malloc'd; the CPU backend keeps weights in float32). */
static float *
entry_f32(const dl_model *m, int i)
{
	const dl_tensor_map *e = &m->map[i];
	size_t		n = (size_t) e->shape[0] * (e->ndim == 2 ? e->shape[1] : 1);
	float	   *v = malloc(n * sizeof(float));

	if (v && m->be->download(m->be, v, (char *) m->param_mem + e->offset, n * sizeof(float), NULL) != DL_OK)
	{
		free(v);
		return NULL;
	}
	return v;
}

/* 1 when a and b have the same map and bit-identical parameters. */
static int
same_params(const dl_model *a, const dl_model *b)
{
	if (a->nmap != b->nmap)
		return 0;
	for (int i = 0; i < a->nmap; i++)
	{
		const dl_tensor_map *e = &a->map[i];
		size_t		n = (size_t) e->shape[0] * (e->ndim == 2 ? e->shape[1] : 1);
		float	   *x = entry_f32(a, i),
				   *y = entry_f32(b, i);
		int			same = x && y && strcmp(e->name, b->map[i].name) == 0 &&
			memcmp(e->shape, b->map[i].shape, sizeof(e->shape)) == 0 &&
			memcmp(x, y, n * sizeof(float)) == 0;

		free(x);
		free(y);
		if (!same)
		{
			fprintf(stderr, "  tensor %s differs\n", e->name);
			return 0;
		}
	}
	return 1;
}

/* 1 when every tensor of the saved file equals the fixture checkpoint's, by value. */
static int
same_tensors_as(const char *saved_dir, const char *orig_dir, int expect)
{
	st_set	   *a = NULL,
			   *b = NULL;
	int			ok = st_open(saved_dir, &a, NULL) == DL_OK && st_open(orig_dir, &b, NULL) == DL_OK &&
		a->ntensors == expect;

	for (int i = 0; ok && i < a->ntensors; i++)
	{
		const st_tensor *x = &a->tensors[i],
				   *y = st_find(b, x->name);
		float	   *fx = malloc(x->numel * sizeof(float)),
				   *fy = malloc(x->numel * sizeof(float));

		ok = y && x->dtype == ST_F32 && x->ndim == y->ndim &&
			memcmp(x->shape, y->shape, x->ndim * sizeof(int64_t)) == 0 && fx && fy &&
			st_to_f32(x, fx, NULL) == DL_OK && st_to_f32(y, fy, NULL) == DL_OK &&
			memcmp(fx, fy, x->numel * sizeof(float)) == 0;
		if (!ok)
			fprintf(stderr, "  saved tensor %s differs from %s\n", x->name, orig_dir);
		free(fx);
		free(fy);
	}
	st_close(a);
	st_close(b);
	return ok;
}

/* A few token ids below V for logits comparisons. */
static void
some_ids(int32_t *ids, int n, int V)
{
	for (int i = 0; i < n; i++)
		ids[i] = (i * 7919 + 13) % V;
}

/* 1 when a and b (of one vocabulary) give bit-identical logits for n (<= 32) ids. */
static int
same_logits(dl_model *a, dl_model *b, int n)
{
	int32_t		ids[32];
	float	   *la,
			   *lb;
	int			same;

	some_ids(ids, n, a->cfg.vocab_size);
	la = logits_of(a, ids, n);
	lb = logits_of(b, ids, n);
	same = la && lb && a->cfg.vocab_size == b->cfg.vocab_size &&
		memcmp(la, lb, (size_t) n * sizeof(float) * a->cfg.vocab_size) == 0;
	free(la);
	free(lb);
	return same;
}

/*
 * Load a fixture, save it, load the save: the file holds the checkpoint's tensors
 * (names, shapes, values: NeoX's qkv back in per-head order, GPT-J's q/k/v apart), the
 * reloaded parameters are bit-identical and so are the logits.
 */
static void
round_trip(const char *fixture, int *failed_)
{
	char		tmp[64],
				out[128],
				cfgpath[4096];
	dl_backend *be;
	dl_model   *m,
			   *r;
	dl_tokenizer *tok;
	dl_config	saved;
	dl_error	err;

	CHECKF(scratch_dir(tmp, sizeof(tmp)) != NULL, "mkdtemp");
	snprintf(out, sizeof(out), "%s/saved", tmp);
	CHECK_OK(backend_cpu_create(1, 0, &be, &err), &err);
	CHECK_OK(dl_model_load(fixture_path(fixture), be, &m, &err), &err);
	snprintf(cfgpath, sizeof(cfgpath), "%s/tokenizer.json", fixture_path(fixture));
	CHECK_OK(tok_load(cfgpath, &tok, &err), &err);
	snprintf(cfgpath, sizeof(cfgpath), "%s/config.json", fixture_path(fixture));
	CHECK_OK(model_save(m, tok, cfgpath, out, &err), &err);
	CHECK(same_tensors_as(out, fixture_path(fixture), m->nmap));
	snprintf(cfgpath, sizeof(cfgpath), "%s/config.json", out);
	CHECK_OK(config_load(cfgpath, &saved, &err), &err);
	CHECK(saved.config_vocab == m->cfg.vocab_size);
	CHECK_OK(dl_model_load(out, be, &r, &err), &err);
	CHECK(same_params(m, r));
	CHECK(same_logits(m, r, 20));
	dl_model_free(r);
	dl_model_free(m);
	tok_free(tok);
	be->destroy(be);
	scratch_done(tmp);
}

TEST(model_save_round_trip_gptj_f32)
{
	round_trip("gptj-f32", failed_);
}

TEST(model_save_round_trip_neox_par_f32)
{
	round_trip("neox-par-f32", failed_);
}

TEST(model_save_round_trip_neox_seq_f32_sharded)
{
	round_trip("neox-seq-f32", failed_);
}

TEST(model_save_round_trip_bf16_as_f32)
{
	/* bf16 weights upcast exactly: the F32 save holds the same values */
	round_trip("gptj-bf16", failed_);
	if (*failed_ == 0)
		round_trip("neox-par-bf16", failed_);
}

/* A small configuration of arch from a fixture's config.json, with V rows. */
static int
small_config(dl_arch arch, int tied, int V, dl_config *cfg)
{
	const char *name = arch == DL_ARCH_GPTJ ? "gptj-f32/config.json" : "neox-par-f32/config.json";

	if (config_load(fixture_path(name), cfg, NULL) != DL_OK)
		return 0;
	cfg->tie_embeddings = tied;
	cfg->vocab_size = V;
	return 1;
}

/*
 * Random model of arch with V rows, saved without base config, reloaded: same parameters
 * and logits.
 */
static void
random_round_trip(dl_arch arch, int tied, int V, int *failed_)
{
	char		tmp[64],
				out[128];
	dl_backend *be;
	dl_model   *m,
			   *r;
	dl_tokenizer *tok;
	dl_config	cfg;
	dl_error	err;
	st_set	   *set;
	int			ok;

	CHECK(small_config(arch, tied, V, &cfg));
	CHECKF(scratch_dir(tmp, sizeof(tmp)) != NULL, "mkdtemp");
	snprintf(out, sizeof(out), "%s/saved", tmp);
	CHECK_OK(backend_cpu_create(1, 0, &be, &err), &err);
	CHECK_OK(tok_load(fixture_path("tokenizer/tokenizer.json"), &tok, &err), &err);
	CHECK_OK(model_create_random(&cfg, be, 3, &m, &err), &err);
	CHECK(tied ? m->p.lm_head == m->p.wte : m->p.lm_head != m->p.wte);
	CHECK_OK(model_save(m, tok, NULL, out, &err), &err);
	/* transformers saves a tied model without its output matrix */
	CHECK_OK(st_open(out, &set, &err), &err);
	ok = set->ntensors == m->nmap &&
		(st_find(set, arch == DL_ARCH_GPTJ ? "lm_head.weight" : "embed_out.weight") != NULL) == !tied;
	st_close(set);
	CHECK(ok);
	CHECK_OK(dl_model_load(out, be, &r, &err), &err);
	CHECK(r->cfg.tie_embeddings == tied && r->cfg.vocab_size == V);
	CHECK(same_params(m, r));
	CHECK(same_logits(m, r, 16));
	dl_model_free(r);
	dl_model_free(m);
	tok_free(tok);
	be->destroy(be);
	scratch_done(tmp);
}

TEST(model_save_round_trip_random_tied_and_untied)
{
	for (int arch = 0; arch < 2; arch++)
		for (int tied = 0; tied < 2; tied++)
		{
			random_round_trip(arch ? DL_ARCH_GPTNEOX : DL_ARCH_GPTJ, tied, 515, failed_);
			if (*failed_)
			{
				fprintf(stderr, "  (%s, %s)\n", arch ? "gpt_neox" : "gptj", tied ? "tied" : "untied");
				return;
			}
		}
}

/* Tables of 18 MB (140000 x 32 float32): the load copies them in two slices each. */
TEST(model_save_round_trip_tables_loaded_in_slices)
{
	random_round_trip(DL_ARCH_GPTJ, 0, 140000, failed_);
}

TEST(model_save_is_atomic)
{
	char		tmp[64],
				out[128],
				path[256];
	dl_backend *be;
	dl_model   *m;
	dl_tokenizer *tok;
	dl_error	err;

	CHECKF(scratch_dir(tmp, sizeof(tmp)) != NULL, "mkdtemp");
	CHECK_OK(backend_cpu_create(1, 0, &be, &err), &err);
	CHECK_OK(dl_model_load(fixture_path("neox-par-f32"), be, &m, &err), &err);
	CHECK_OK(tok_load(fixture_path("tokenizer/tokenizer.json"), &tok, &err), &err);

	/* an existing directory is refused and left alone */
	snprintf(out, sizeof(out), "%s/existing", tmp);
	CHECK(mkdir(out, 0755) == 0);
	snprintf(path, sizeof(path), "%s/keep", out);
	CHECK(fclose(fopen(path, "w")) == 0);
	CHECK(model_save(m, tok, NULL, out, &err) == DL_EINVAL);
	CHECKF(strstr(err.msg, "exists") != NULL, "%s", err.msg);
	CHECK(exists(path));
	/* with a trailing slash too: never written inside it */
	snprintf(path, sizeof(path), "%s/", out);
	CHECK(model_save(m, tok, NULL, path, &err) == DL_EINVAL);

	/* a failure half-way (unreadable base config.json) leaves nothing behind */
	snprintf(out, sizeof(out), "%s/failed", tmp);
	CHECK(model_save(m, tok, "/nonexistent/config.json", out, &err) != DL_OK);
	CHECK(!exists(out));
	snprintf(path, sizeof(path), "%s.tmp-%ld", out, (long) getpid());
	CHECK(!exists(path));

	/* a trailing slash names the same directory */
	snprintf(out, sizeof(out), "%s/slash/", tmp);
	CHECK_OK(model_save(m, tok, NULL, out, &err), &err);
	snprintf(path, sizeof(path), "%s/slash/model.safetensors", tmp);
	CHECK(exists(path));
	snprintf(path, sizeof(path), "%s/slash/.tmp-%ld", tmp, (long) getpid());
	CHECK(!exists(path));

	dl_model_free(m);
	tok_free(tok);
	be->destroy(be);
	scratch_done(tmp);
}

TEST(model_random_init_is_seeded_and_shaped)
{
	dl_backend *be;
	dl_model   *a,
			   *b,
			   *c;
	dl_config	cfg;
	dl_error	err;
	int			differ = 0;

	CHECK(small_config(DL_ARCH_GPTNEOX, 0, 600, &cfg));
	CHECK_OK(backend_cpu_create(1, 0, &be, &err), &err);
	CHECK_OK(model_create_random(&cfg, be, 11, &a, &err), &err);
	CHECK_OK(model_create_random(&cfg, be, 11, &b, &err), &err);
	CHECK_OK(model_create_random(&cfg, be, 12, &c, &err), &err);
	CHECK(same_params(a, b));
	for (int i = 0; i < a->nmap; i++)
	{
		const dl_tensor_map *e = &a->map[i];
		size_t		n = (size_t) e->shape[0] * (e->ndim == 2 ? e->shape[1] : 1);
		float	   *x = entry_f32(a, i),
				   *y = entry_f32(c, i);
		double		s = 0,
					s2 = 0;
		int			gain = e->ndim == 1 && strstr(e->name, ".weight") != NULL;

		CHECK(x && y);
		for (size_t j = 0; j < n; j++)
		{
			s += x[j];
			s2 += (double) x[j] * x[j];
			differ += x[j] != y[j];
		}
		if (e->ndim == 2)
			/* n >= 2048 draws: the sample's mean and std are within a few percent */
			CHECKF(fabs(s / n) < 0.003 && fabs(sqrt(s2 / n) - 0.02) < 0.002,
				   "%s: mean %g std %g", e->name, s / n, sqrt(s2 / n));
		else
			CHECKF(s == (gain ? (double) n : 0.0) && s2 == s, "%s: sum %g", e->name, s);
		free(x);
		free(y);
	}
	CHECK(differ > 0);
	dl_model_free(a);
	dl_model_free(b);
	dl_model_free(c);
	be->destroy(be);
}

/*
 * A base tokenizer without Dolly's tokens and a model with exactly its rows: the three
 * tokens get the next ids, the tables grow by three rows that are the mean of the old
 * ones, every old value is kept, and the old tokens' logits do not change.
 */
static void
grow_case(dl_arch arch, int tied, int *failed_)
{
	dl_backend *be;
	dl_model   *m,
			   *g;
	dl_tokenizer *tok = tokenizer_without_dolly_keys();
	dl_config	cfg;
	dl_error	err;
	int			V;
	int32_t		ids[12];
	float	   *la,
			   *lb;

	CHECK(tok != NULL);
	V = tok_vocab_size(tok);
	CHECK(small_config(arch, tied, V, &cfg));
	CHECK_OK(backend_cpu_create(1, 0, &be, &err), &err);
	CHECK_OK(model_create_random(&cfg, be, 5, &m, &err), &err);
	some_ids(ids, 12, V);
	la = logits_of(m, ids, 12);
	g = m;
	CHECK_OK(model_add_dolly_tokens(&g, tok, &err), &err);
	CHECK(tok_token_id(tok, DOLLY_END_KEY) == V && tok_token_id(tok, DOLLY_INSTRUCTION_KEY) == V + 1 &&
		  tok_token_id(tok, DOLLY_RESPONSE_KEY_NL) == V + 2);
	CHECK(g != m && g->cfg.vocab_size == V + 3 && tok_vocab_size(tok) == V + 3);
	CHECK(tied ? g->p.lm_head == g->p.wte : g->p.lm_head != g->p.wte);
	lb = logits_of(g, ids, 12);
	CHECK(la && lb);
	for (int t = 0; t < 12; t++)
		CHECK(memcmp(la + (size_t) t * V, lb + (size_t) t * (V + 3), V * sizeof(float)) == 0);
	free(la);
	free(lb);

	/* reference: the model made again from the same seed */
	CHECK_OK(model_create_random(&cfg, be, 5, &m, &err), &err);
	for (int i = 0; i < g->nmap; i++)
	{
		const dl_tensor_map *e = &g->map[i];
		int64_t		cols = e->ndim == 2 ? e->shape[1] : 1,
					rows = m->map[i].shape[0];
		float	   *x = entry_f32(m, i),
				   *y = entry_f32(g, i);

		CHECK(x && y);
		CHECK(memcmp(x, y, rows * cols * sizeof(float)) == 0);
		CHECK(e->shape[0] == rows || e->shape[0] == rows + 3);
		for (int64_t r = rows; r < e->shape[0]; r++)
			for (int64_t c = 0; c < cols; c++)
			{
				double		mean = 0;

				for (int64_t k = 0; k < rows; k++)
					mean += x[k * cols + c];
				CHECKF(y[r * cols + c] == (float) (mean / rows), "%s[%lld, %lld]", e->name,
					   (long long) r, (long long) c);
			}
		free(x);
		free(y);
	}
	dl_model_free(m);
	dl_model_free(g);
	tok_free(tok);
	be->destroy(be);
}

TEST(model_add_dolly_tokens_grows_the_tables)
{
	for (int arch = 0; arch < 2; arch++)
		for (int tied = 0; tied < 2; tied++)
		{
			grow_case(arch ? DL_ARCH_GPTNEOX : DL_ARCH_GPTJ, tied, failed_);
			if (*failed_)
			{
				fprintf(stderr, "  (%s, %s)\n", arch ? "gpt_neox" : "gptj", tied ? "tied" : "untied");
				return;
			}
		}
}

TEST(model_add_dolly_tokens_keeps_padded_tables)
{
	dl_backend *be;
	dl_model   *m,
			   *g;
	dl_tokenizer *tok = tokenizer_without_dolly_keys();
	dl_error	err;
	int32_t		id;

	CHECK(tok != NULL);
	CHECK_OK(backend_cpu_create(1, 0, &be, &err), &err);
	/* 536 rows, as Pythia pads beyond its tokenizer */
	CHECK_OK(dl_model_load(fixture_path("neox-par-f32"), be, &m, &err), &err);
	g = m;
	CHECK_OK(model_add_dolly_tokens(&g, tok, &err), &err);
	CHECK(g == m && g->cfg.vocab_size == 536);
	CHECK(tok_token_id(tok, DOLLY_RESPONSE_KEY_NL) == tok_vocab_size(tok) - 1);
	/* a second call adds nothing */
	id = tok_vocab_size(tok);
	CHECK_OK(model_add_dolly_tokens(&g, tok, &err), &err);
	CHECK(g == m && tok_vocab_size(tok) == id);
	dl_model_free(m);
	tok_free(tok);
	be->destroy(be);
}

/*
 * The PyTorch fixtures (tests/fixtures/<twin>-bin, make_fixtures.py build_bin_models):
 * each holds its safetensors twin's tensors, the same bytes, as torch.save wrote them
 * (gptj-bf16-bin in two shards, with the buffers of old GPT-J checkpoints).
 */
static const struct
{
	const char *bin;
	const char *twin;
	int			shards;
}			bin_twins[] = {
	{"neox-par-f32-bin", "neox-par-f32", 1},
	{"neox-par-f16-bin", "neox-par-f16", 1},
	{"gptj-bf16-bin", "gptj-bf16", 2},
};

/*
 * 1 when set holds every tensor of twin with the same dtype, shape and bytes, and
 * nothing more but, where buffers, GPT-J's attn.bias and attn.masked_bias.
 */
static int
same_checkpoint(const st_set *set, const st_set *twin, int buffers)
{
	int			extra = 0;

	for (int i = 0; i < set->ntensors; i++)
	{
		const st_tensor *x = &set->tensors[i],
				   *y = st_find(twin, x->name);

		if (y == NULL && buffers && (strstr(x->name, ".attn.bias") || strstr(x->name, ".attn.masked_bias")))
		{
			extra++;
			continue;
		}
		if (y == NULL || x->dtype != y->dtype || x->ndim != y->ndim ||
			memcmp(x->shape, y->shape, x->ndim * sizeof(int64_t)) != 0 || x->nbytes != y->nbytes ||
			memcmp(x->data, y->data, x->nbytes) != 0)
		{
			fprintf(stderr, "  tensor %s differs from the twin's\n", x->name);
			return 0;
		}
	}
	return set->ntensors - extra == twin->ntensors;
}

/* Each .bin fixture: its twin's tensors, parameters and logits, bit for bit, on both CPU weight formats. */
TEST(model_bin_checkpoints_load_as_their_twins)
{
	if (!exists(fixture_path("gptj-bf16-bin/pytorch_model.bin.index.json")))
		SKIP("PyTorch fixtures not generated yet");
	for (size_t i = 0; i < sizeof(bin_twins) / sizeof(bin_twins[0]); i++)
	{
		st_set	   *a,
				   *b;
		dl_error	err;

		CHECK_OK(st_open(fixture_path(bin_twins[i].bin), &a, &err), &err);
		CHECK_OK(st_open(fixture_path(bin_twins[i].twin), &b, &err), &err);
		CHECKF(a->nfiles == bin_twins[i].shards && same_checkpoint(a, b, 1), "%s", bin_twins[i].bin);
		st_close(a);
		st_close(b);
		for (int bf16 = 0; bf16 <= 1; bf16++)
		{
			dl_backend *be;
			dl_model   *m,
					   *t;
			int			same;

			CHECK_OK(backend_cpu_create(1, bf16, &be, &err), &err);
			CHECK_OK(dl_model_load(fixture_path(bin_twins[i].bin), be, &m, &err), &err);
			CHECK_OK(dl_model_load(fixture_path(bin_twins[i].twin), be, &t, &err), &err);
			same = (bf16 || same_params(m, t)) && same_logits(m, t, 20);
			dl_model_free(m);
			dl_model_free(t);
			be->destroy(be);
			CHECKF(same, "%s: logits differ from %s's (%s weights)", bin_twins[i].bin, bin_twins[i].twin,
				   bf16 ? "bfloat16" : "float32");
		}
	}
}

/* Whether files a and b hold the same bytes. */
static int
same_file(const char *a, const char *b)
{
	FILE	   *fa = fopen(a, "rb"),
			   *fb = fopen(b, "rb");
	int			c = 0,
				same = fa && fb;

	while (same && c != EOF)
		same = (c = fgetc(fa)) == fgetc(fb);
	if (fa)
		fclose(fa);
	if (fb)
		fclose(fb);
	return same;
}

/*
 * dolly-cli convert: each .bin fixture written as safetensors holds its twin's tensors
 * (no buffers), sharded as the .bin was, with the same config and tokenizer files; the
 * directory appears whole or not at all.
 */
TEST(model_convert_bin_checkpoints)
{
	char		tmp[64],
				out[128],
				a[256],
				b[256];
	dl_error	err;

	if (!exists(fixture_path("gptj-bf16-bin/pytorch_model.bin.index.json")))
		SKIP("PyTorch fixtures not generated yet");
	CHECKF(scratch_dir(tmp, sizeof(tmp)) != NULL, "mkdtemp");
	for (size_t i = 0; i < sizeof(bin_twins) / sizeof(bin_twins[0]); i++)
	{
		st_set	   *conv,
				   *twin;

		snprintf(out, sizeof(out), "%s/%s", tmp, bin_twins[i].twin);
		CHECK_OK(model_convert(fixture_path(bin_twins[i].bin), out, &err), &err);
		CHECK_OK(st_open(out, &conv, &err), &err);
		CHECK_OK(st_open(fixture_path(bin_twins[i].twin), &twin, &err), &err);
		CHECKF(conv->nfiles == bin_twins[i].shards && same_checkpoint(conv, twin, 0), "%s", out);
		st_close(conv);
		st_close(twin);
		snprintf(a, sizeof(a), "%s/model.safetensors.index.json", out);
		CHECK(exists(a) == (bin_twins[i].shards > 1));
		snprintf(a, sizeof(a), "%s/config.json", out);
		snprintf(b, sizeof(b), "%s/config.json", fixture_path(bin_twins[i].bin));
		CHECK(same_file(a, b));
		snprintf(a, sizeof(a), "%s/tokenizer.json", out);
		snprintf(b, sizeof(b), "%s/tokenizer.json", fixture_path(bin_twins[i].bin));
		CHECK(same_file(a, b));
	}
	/* an existing directory is refused; a failure half-way (no config.json) leaves nothing */
	snprintf(out, sizeof(out), "%s/gptj-bf16", tmp);
	CHECK(model_convert(fixture_path("gptj-bf16-bin"), out, &err) == DL_EINVAL);
	CHECKF(strstr(err.msg, "exists"), "%s", err.msg);
	snprintf(a, sizeof(a), "%s/src", tmp);
	CHECK(mkdir(a, 0755) == 0);
	snprintf(a, sizeof(a), "%s/src/pytorch_model.bin", tmp);
	snprintf(b, sizeof(b), "%s/pytorch_model.bin", fixture_path("neox-par-f32-bin"));
	{
		char	   *target = realpath(b, NULL);

		CHECK(target && symlink(target, a) == 0);
		free(target);
	}
	snprintf(a, sizeof(a), "%s/src", tmp);
	snprintf(out, sizeof(out), "%s/failed", tmp);
	CHECK(model_convert(a, out, &err) == DL_EIO);
	CHECKF(strstr(err.msg, "config.json"), "%s", err.msg);
	CHECK(!exists(out));
	snprintf(a, sizeof(a), "%s/.failed%s%ld", tmp, DL_SAVE_TMP_MARK, (long) getpid());
	CHECK(!exists(a));
	scratch_done(tmp);
}
