/*
 * test_model.c: the forward pass of every fixture model against transformers' logits
 * (tests/fixtures/<model>/expected.safetensors), prompt by prompt, all prompts in one
 * batch, and as a prefill of part of a prompt followed by one-token decode steps; and
 * the loader's errors on broken model directories.
 */
#include "harness.h"
#include "../../src/engine/model.h"
#include "../../src/engine/safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_PROMPTS 16

/* A fixture model loaded on a CPU backend, with its expected outputs. */
typedef struct fixture
{
	dl_backend *be;
	dl_model   *m;
	st_set	   *exp;
	int			nprompt;
	const st_tensor *ids[MAX_PROMPTS];
	const st_tensor *logits[MAX_PROMPTS];
	const st_tensor *logits_bf16[MAX_PROMPTS];
	const st_tensor *greedy[MAX_PROMPTS];
} fixture;

/*
 * Load tests/fixtures/<name> (with bf16, its matrices in bfloat16); returns 0 when the
 * fixture is absent (test skips).
 */
static int
fixture_open(const char *name, int threads, int bf16, fixture *f, dl_error *err, dl_status *st)
{
	char		dir[4096],
				key[64];

	memset(f, 0, sizeof(*f));
	snprintf(dir, sizeof(dir), "%s", fixture_path(name));
	if (access(dir, R_OK) != 0)
		return 0;
	*st = backend_cpu_create(threads, bf16, &f->be, err);
	if (*st == DL_OK)
		*st = dl_model_load(dir, f->be, &f->m, err);
	if (*st == DL_OK)
		*st = st_open_file(fixture_path(strcat(strcat(strcpy(key, name), "/"), "expected.safetensors")),
						   &f->exp, err);
	if (*st != DL_OK)
		return 1;
	for (int i = 0; i < MAX_PROMPTS; i++)
	{
		snprintf(key, sizeof(key), "prompt_%d_ids", i);
		if ((f->ids[i] = st_find(f->exp, key)) == NULL)
			break;
		snprintf(key, sizeof(key), "prompt_%d_logits", i);
		f->logits[i] = st_find(f->exp, key);
		snprintf(key, sizeof(key), "prompt_%d_logits_bf16", i);
		f->logits_bf16[i] = st_find(f->exp, key);
		snprintf(key, sizeof(key), "prompt_%d_greedy", i);
		f->greedy[i] = st_find(f->exp, key);
		f->nprompt++;
	}
	return 1;
}

/* Free what fixture_open made. */
static void
fixture_close(fixture *f)
{
	st_close(f->exp);
	dl_model_free(f->m);
	if (f->be)
		f->be->destroy(f->be);
}

/* A tensor's content as malloc'd float32. */
static float *
to_f32(const st_tensor *t)
{
	float	   *v = malloc(t->numel * sizeof(float));

	if (v && st_to_f32(t, v, NULL) != DL_OK)
	{
		free(v);
		return NULL;
	}
	return v;
}

/* Largest |a - b| over n floats. */
static double
max_abs_diff(const float *a, const float *b, size_t n)
{
	double		m = 0;

	for (size_t i = 0; i < n; i++)
		m = fmax(m, fabs((double) a[i] - b[i]));
	return m;
}

/* Largest |a| over n floats. */
static double
max_abs(const float *a, size_t n)
{
	double		m = 0;

	for (size_t i = 0; i < n; i++)
		m = fmax(m, fabs(a[i]));
	return m;
}

/* 1: the expected tensor matches our [T, V] logits within tol (printing the margin). */
static int
logits_close(const char *what, const st_tensor *ref, const float *ours, size_t n, double tol)
{
	float	   *r = to_f32(ref);
	double		d = r ? max_abs_diff(ours, r, n) : INFINITY;

	if (!r || ref->numel != (int64_t) n || !(d <= tol))
		fprintf(stderr, "  %s: %s differs by %g (tolerance %g, |ref| up to %g)\n", what,
				ref->name, d, tol, r ? max_abs(r, ref->numel) : 0.0);
	free(r);
	return r && ref->numel == (int64_t) n && d <= tol;
}

/*
 * Tolerances. F32 models: 1e-4 max abs, the bound: we and torch both compute in
 * float32 and differ only in summation order and libm (about 1e-6 on the fixtures).
 * BF16 models: the fp32-upcast reference is the same float32 computation on the same
 * (exactly representable) weights, so 1e-4 again. Against torch computing in bfloat16
 * we differ by torch's own roundings: bf16 keeps 8 significant bits, so each rounding is
 * up to 2^-9 relative; the logits themselves are rounded, and so is every activation
 * and residual sum on the way (a dozen roundings per layer, partly cancelling). That is
 * a few units of 2^-8 of the largest logit (0.005 of it on the fixtures); we allow
 * 2^-5 of it, eight units.
 */
#define TOL_F32 1e-4

/* Tolerance against torch's bf16 computation for a reference of largest value big. */
static double
tol_bf16(double big)
{
	return big / 32;
}

/*
 * Tolerance against the float32 reference on our bfloat16 CPU backend for n logits of
 * ours: its matrices are the checkpoint's own (exact), but its KV cache rounds every key
 * and value once, 2^-9 relative, which moves the logits by about 2^-8 of the largest
 * (0.004 of 5.4 and 0.013 of 3.6 on the fixtures); we allow 2^-7. Float32: TOL_F32.
 */
static double
tol_backend(int bf16, const float *ours, size_t n)
{
	return bf16 ? max_abs(ours, n) / 128 : TOL_F32;
}

/* Every prompt alone, then all together in one batch, then split prefill + decode. */
static void
check_logits(const char *name, int bf16, int *failed_)
{
	fixture		f;
	dl_error	err;
	dl_status	st = DL_OK;
	dl_kv_cache *c = NULL;
	int32_t    *ids[MAX_PROMPTS] = {0};
	float	   *ours = NULL;
	int			V,
				total = 0,
				ok = 1;

	if (!fixture_open(name, 2, bf16, &f, &err, &st))
		SKIP("fixture %s not present", name);
	CHECKF(st == DL_OK, "%s", err.msg);
	CHECK(f.nprompt > 0);
	CHECK(f.be->weight_elem_size == (bf16 ? 2u : 4u));
	V = f.m->cfg.vocab_size;
	for (int i = 0; i < f.nprompt; i++)
	{
		ids[i] = (int32_t *) f.ids[i]->data;	/* I32 written by the fixture script */
		CHECK(f.ids[i]->dtype == ST_I32 && f.logits[i]);
		CHECK(f.logits[i]->shape[0] == f.ids[i]->numel && f.logits[i]->shape[1] == V);
		total += f.ids[i]->numel;
	}
	st = dl_kv_cache_create(f.m, f.nprompt, f.m->cfg.max_pos < 256 ? f.m->cfg.max_pos : 256,
							total, &c, &err);
	CHECKF(st == DL_OK, "%s", err.msg);
	ours = malloc((size_t) total * V * sizeof(float));

	/* alone */
	for (int i = 0; i < f.nprompt && ok; i++)
	{
		int			T = f.ids[i]->numel;
		dl_seq		s = {i, 0, T, ids[i], DL_LOGITS_ALL, NULL};

		st = dl_model_forward(f.m, c, &s, 1, ours, &err);
		ok = st == DL_OK && logits_close("alone", f.logits[i], ours, (size_t) T * V,
										 tol_backend(bf16, ours, (size_t) T * V));
		if (ok && f.logits_bf16[i])
			ok = logits_close("alone, bf16 reference", f.logits_bf16[i], ours, (size_t) T * V,
							  tol_bf16(max_abs(ours, (size_t) T * V)));
	}
	CHECKF(st == DL_OK, "%s", err.msg);
	CHECKF(ok, "%s: logits of a prompt alone differ", name);

	/* all prompts in one pass, each in another slot than before */
	{
		dl_seq		seqs[MAX_PROMPTS];
		size_t		at = 0;

		for (int i = 0; i < f.nprompt; i++)
			seqs[i] = (dl_seq) {f.nprompt - 1 - i, 0, f.ids[i]->numel, ids[i], DL_LOGITS_ALL, NULL};
		st = dl_model_forward(f.m, c, seqs, f.nprompt, ours, &err);
		CHECKF(st == DL_OK, "%s", err.msg);
		for (int i = 0; i < f.nprompt && ok; i++)
		{
			ok = logits_close("batched", f.logits[i], ours + at, (size_t) f.ids[i]->numel * V,
							  tol_backend(bf16, ours + at, (size_t) f.ids[i]->numel * V));
			at += (size_t) f.ids[i]->numel * V;
		}
		CHECKF(ok, "%s: logits of the prompts batched together differ", name);
	}

	/* the first half as a prefill without logits, then one token at a time, all prompts
	 * stepping together (those that are done drop out of the batch) */
	{
		int			step = 0,
					active = 1;

		for (int i = 0; i < f.nprompt; i++)
		{
			int			half = f.ids[i]->numel / 2;
			dl_seq		s = {i, 0, half, ids[i], DL_LOGITS_NONE, NULL};

			if (half > 0)
				CHECK_OK(dl_model_forward(f.m, c, &s, 1, NULL, &err), &err);
		}
		while (active && ok)
		{
			dl_seq		seqs[MAX_PROMPTS];
			int			which[MAX_PROMPTS],
						n = 0;

			for (int i = 0; i < f.nprompt; i++)
			{
				int			p = f.ids[i]->numel / 2 + step;

				if (p < f.ids[i]->numel)
				{
					seqs[n] = (dl_seq) {i, p, 1, ids[i] + p, DL_LOGITS_LAST, NULL};
					which[n++] = i;
				}
			}
			active = n > 0;
			if (!active)
				break;
			st = dl_model_forward(f.m, c, seqs, n, ours, &err);
			CHECKF(st == DL_OK, "%s", err.msg);
			for (int k = 0; k < n && ok; k++)
			{
				float	   *ref = to_f32(f.logits[which[k]]);
				double		d = max_abs_diff(ours + (size_t) k * V,
											 ref + (size_t) seqs[k].pos * V, V);

				ok = d <= tol_backend(bf16, ours + (size_t) k * V, V);
				if (!ok)
					fprintf(stderr, "  decode: prompt %d position %d differs by %g\n",
							which[k], seqs[k].pos, d);
				free(ref);
			}
			step++;
		}
		CHECKF(ok, "%s: logits of prefill + decode differ", name);
	}
	free(ours);
	dl_kv_cache_free(c);
	fixture_close(&f);
}

TEST(model_logits_gptj_f32)
{
	check_logits("gptj-f32", 0, failed_);
}

TEST(model_logits_neox_par_f32)
{
	check_logits("neox-par-f32", 0, failed_);
}

TEST(model_logits_neox_seq_f32_sharded)
{
	check_logits("neox-seq-f32", 0, failed_);
}

TEST(model_logits_gptj_bf16)
{
	check_logits("gptj-bf16", 0, failed_);
}

TEST(model_logits_neox_par_bf16)
{
	check_logits("neox-par-bf16", 0, failed_);
}

/* bfloat16 checkpoints kept in bfloat16 on the CPU: the same weights, a bfloat16 KV cache */
TEST(model_logits_gptj_bf16_weights)
{
	check_logits("gptj-bf16", 1, failed_);
}

TEST(model_logits_neox_par_bf16_weights)
{
	check_logits("neox-par-bf16", 1, failed_);
}

/* How to break a copy of a model: which tensor, and what to do to it. */
typedef enum breakage
{
	DROP,						/* leave the tensor out */
	RESHAPE,					/* same bytes, first dimension halved, second doubled */
	RETYPE						/* same bytes, dtype I32 */
} breakage;

/*
 * Copy fixture model `name` into a temporary directory with tensor `victim` broken, try
 * to load it, and return the error (the directory is removed again).
 */
static dl_status
load_broken(const char *name, const char *victim, breakage how, dl_error *err)
{
	char		dir[256],
				path[512],
				cmd[1024];
	st_set	   *set = NULL;
	st_write_tensor *w = NULL;
	dl_backend *be = NULL;
	dl_model   *m = NULL;
	dl_status	st;
	int			n = 0;

	snprintf(dir, sizeof(dir), "/tmp/dolly_test_model_%d", (int) getpid());
	mkdir(dir, 0700);
	snprintf(cmd, sizeof(cmd), "cp '%s/config.json' '%s/'", fixture_path(name), dir);
	if (system(cmd) != 0)
		return dl_fail(err, DL_EIO, "cannot copy config.json");
	st = st_open(fixture_path(name), &set, err);
	if (st != DL_OK)
		return st;
	w = calloc(set->ntensors, sizeof(*w));
	for (int i = 0; i < set->ntensors; i++)
	{
		const st_tensor *t = &set->tensors[i];
		st_write_tensor *o = &w[n];

		if (strcmp(t->name, victim) == 0 && how == DROP)
			continue;
		o->name = t->name;
		o->dtype = t->dtype;
		o->ndim = t->ndim;
		memcpy(o->shape, t->shape, sizeof(o->shape));
		o->data = t->data;
		if (strcmp(t->name, victim) == 0 && how == RESHAPE)
		{
			o->shape[0] /= 2;
			o->shape[1] *= 2;
		}
		if (strcmp(t->name, victim) == 0 && how == RETYPE)
			o->dtype = ST_I32;
		n++;
	}
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	st = st_write(path, w, n, NULL, 0, err);
	if (st == DL_OK)
		st = backend_cpu_create(1, 0, &be, err);
	if (st == DL_OK)
	{
		st = dl_model_load(dir, be, &m, err);
		dl_model_free(m);
		be->destroy(be);
	}
	free(w);
	st_close(set);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "  could not remove %s\n", dir);
	return st;
}

TEST(model_load_errors_name_the_tensor)
{
	static const struct
	{
		const char *model;
		const char *tensor;
		breakage	how;
		dl_status	code;
		const char *says;
	}			cases[] = {
		{"gptj-f32", "transformer.h.1.mlp.fc_in.bias", DROP, DL_EFORMAT, "has no tensor"},
		{"gptj-f32", "transformer.h.0.attn.q_proj.weight", RESHAPE, DL_EFORMAT, "expected ["},
		{"gptj-f32", "lm_head.bias", DROP, DL_EFORMAT, "has no tensor"},
		{"neox-par-f32", "gpt_neox.layers.0.attention.query_key_value.weight", RESHAPE, DL_EFORMAT, "has shape"},
		{"neox-par-f32", "embed_out.weight", DROP, DL_EFORMAT, "has no tensor"},
		{"neox-par-f32", "gpt_neox.final_layer_norm.weight", RETYPE, DL_EUNSUPPORTED, "dtype I32"},
		{"neox-par-f32", "gpt_neox.embed_in.weight", DROP, DL_EFORMAT, "has no tensor"},
	};
	dl_error	err;

	if (access(fixture_path("gptj-f32"), R_OK) != 0 || access(fixture_path("neox-par-f32"), R_OK) != 0)
		SKIP("fixture models not present");
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
	{
		dl_status	st = load_broken(cases[i].model, cases[i].tensor, cases[i].how, &err);

		CHECKF(st == cases[i].code, "%s: got %s (%s)", cases[i].tensor, dl_status_name(st), err.msg);
		CHECKF(strstr(err.msg, cases[i].tensor) && strstr(err.msg, cases[i].says),
			   "message does not name %s: %s", cases[i].tensor, err.msg);
	}
}

/* A load watcher that records what it was told and stops after stop_after calls (0: never). */
typedef struct
{
	int			calls;
	int			stop_after;
	int64_t		last_done;
	int64_t		total;
	int			monotone;
} load_watch;

static int
watch_load(void *arg, int64_t done, int64_t total)
{
	load_watch *w = arg;

	w->monotone &= done > w->last_done && done <= total;
	w->calls++;
	w->last_done = done;
	w->total = total;
	return w->stop_after && w->calls >= w->stop_after;
}

TEST(model_load_reports_progress_and_stops)
{
	dl_backend *be;
	dl_model   *m = NULL;
	dl_error	err;
	load_watch	w = {0, 0, 0, 0, 1};
	load_watch	stop = {0, 3, 0, 0, 1};

	if (access(fixture_path("gptj-f32"), R_OK) != 0)
		SKIP("fixture models not present");
	CHECK(backend_cpu_create(1, 0, &be, &err) == DL_OK);
	CHECK(dl_model_load_watched(fixture_path("gptj-f32"), be, watch_load, &w, &m, &err) == DL_OK);
	CHECKF(w.calls == m->nmap && w.monotone && w.last_done == w.total &&
		   w.total == dl_model_param_count(m),
		   "%d calls for %d tensors, ended at %lld of %lld", w.calls, m->nmap,
		   (long long) w.last_done, (long long) w.total);
	dl_model_free(m);
	m = NULL;
	CHECK(dl_model_load_watched(fixture_path("gptj-f32"), be, watch_load, &stop, &m, &err) == DL_ECANCELLED);
	CHECKF(m == NULL && stop.calls == 3 && strstr(err.msg, "was stopped"), "%d calls: %s", stop.calls, err.msg);
	be->destroy(be);
}

TEST(model_forward_rejects_bad_batches)
{
	fixture		f;
	dl_error	err;
	dl_status	st = DL_OK;
	dl_kv_cache *c = NULL;
	int32_t		ids[4] = {1, 2, 3, 4},
				bad = -1;
	float	   *lg;

	if (!fixture_open("gptj-f32", 1, 0, &f, &err, &st))
		SKIP("fixture gptj-f32 not present");
	CHECKF(st == DL_OK, "%s", err.msg);
	CHECK_OK(dl_kv_cache_create(f.m, 2, 8, 4, &c, &err), &err);
	lg = malloc((size_t) 4 * f.m->cfg.vocab_size * sizeof(float));
	{
		dl_seq		two_same[2] = {{0, 0, 1, ids, DL_LOGITS_LAST, NULL}, {0, 0, 1, ids, DL_LOGITS_LAST, NULL}};
		dl_seq		too_far = {1, 6, 3, ids, DL_LOGITS_LAST, NULL};
		dl_seq		too_many = {1, 0, 5, ids, DL_LOGITS_LAST, NULL};
		dl_seq		bad_id = {0, 0, 1, &bad, DL_LOGITS_LAST, NULL};
		dl_seq		bad_slot = {2, 0, 1, ids, DL_LOGITS_LAST, NULL};
		dl_seq		empty = {0, 0, 0, ids, DL_LOGITS_LAST, NULL};

		CHECK(dl_model_forward(f.m, c, two_same, 2, lg, &err) == DL_EINVAL && strstr(err.msg, "twice"));
		CHECK(dl_model_forward(f.m, c, &too_far, 1, lg, &err) == DL_EINVAL && strstr(err.msg, "context"));
		CHECK(dl_model_forward(f.m, c, &too_many, 1, lg, &err) == DL_EINVAL && strstr(err.msg, "limit"));
		CHECK(dl_model_forward(f.m, c, &bad_id, 1, lg, &err) == DL_EINVAL && strstr(err.msg, "token id -1"));
		CHECK(dl_model_forward(f.m, c, &bad_slot, 1, lg, &err) == DL_EINVAL && strstr(err.msg, "slot 2"));
		CHECK(dl_model_forward(f.m, c, &empty, 1, lg, &err) == DL_EINVAL && strstr(err.msg, "no tokens"));
	}
	CHECK(dl_kv_cache_create(f.m, 1, f.m->cfg.max_pos + 1, 4, &(dl_kv_cache *) {NULL}, &err) == DL_EINVAL);
	free(lg);
	dl_kv_cache_free(c);
	fixture_close(&f);
}
