/*
 * test_train.c: the trainer against torch (tests/fixtures/<model>/train_expected.safetensors,
 * made by tests/make_fixtures.py build_train): the loss and the gradient of every
 * parameter of a batch of Dolly examples, and the losses, gradient norms and learning
 * rates of 10 AdamW steps; the data-parallel property (two ranks on halves of the batch,
 * gradients and label counts summed, update the model as one rank on the whole batch)
 * and gradient accumulation; tied embeddings; evaluation; activation checkpointing (the
 * same gradients bit for bit, in the memory the layout's arithmetic says); the schedule;
 * the errors.
 */
#include "harness.h"
#include "train_fixture.h"
#include "../../src/engine/train.h"
#include "../../src/engine/safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

TEST(train_grads_gptj_f32)
{
	train_check_grads("gptj-f32", NULL, &TRAIN_TOL_F32, failed_);
}

TEST(train_grads_neox_par_f32)
{
	train_check_grads("neox-par-f32", NULL, &TRAIN_TOL_F32, failed_);
}

TEST(train_grads_neox_seq_f32)
{
	train_check_grads("neox-seq-f32", NULL, &TRAIN_TOL_F32, failed_);
}

TEST(train_adamw_steps_gptj_f32)
{
	train_check_steps("gptj-f32", NULL, &TRAIN_TOL_F32, failed_);
}

TEST(train_adamw_steps_neox_par_f32)
{
	train_check_steps("neox-par-f32", NULL, &TRAIN_TOL_F32, failed_);
}

TEST(train_adamw_steps_neox_seq_f32)
{
	train_check_steps("neox-seq-f32", NULL, &TRAIN_TOL_F32, failed_);
}

/* Largest |a - b| over the parameters of two models of the same shape. */
static double
param_diff(const dl_model *a, const dl_model *b)
{
	const float *pa = a->param_mem,
			   *pb = b->param_mem;
	double		d = 0;

	for (int i = 0; i < a->nmap; i++)
	{
		const dl_tensor_map *e = &a->map[i];
		size_t		at = e->offset / sizeof(float),
					n = (size_t) e->shape[0] * (e->ndim == 2 ? e->shape[1] : 1);

		for (size_t j = at; j < at + n; j++)
			d = fmax(d, fabs((double) pa[j] - pb[j]));
	}
	return d;
}

/*
 * The DDP property on every fixture model: rank 0 takes the first example, rank 1 the
 * others; each accumulates its gradients, the buffers and label counts are summed (as
 * an all-reduce would, the same sum on both) and both update with the GLOBAL count.
 * Gradient accumulation is the same thing on one rank: a third trainer takes the two
 * parts as two micro-batches before one update. The two ranks stay bit-identical, and
 * all match one rank that took the whole batch at once up to rounding (the sums over
 * tokens are split differently, about 1e-7 of the gradients).
 * Adam with a small eps and clipping are blind to the gradients' scale (a step is about
 * lr * sign(g)) and amplify the rounding of gradients near zero, so this test runs with
 * eps 1 and no clipping, where a step is about lr * g (1e-5 here): normalising by a
 * rank's own count instead of the global one would show in full; rounding stays within
 * an ulp or two of the parameters (1e-7 for parameters below 1).
 */
TEST(train_two_ranks_and_micro_batches_equal_one_batch)
{
	static const char *const names[] = {"gptj-f32", "neox-par-f32", "neox-seq-f32"};

	for (int k = 0; k < 3; k++)
	{
		train_fixture f;
		dl_train_config cfg;
		dl_model   *mod[3] = {NULL, NULL, NULL};	/* rank 0, rank 1, accumulating */
		dl_trainer *whole = NULL,
				   *tr[3] = {NULL, NULL, NULL};
		dl_error	err;
		dl_status	st;
		double		gdiff = 0,
					gmax = 0,
					ndiff = 0,
					pdiff = 0,
					adiff = 0,
					rank_diff = 0;

		if (!train_open(names[k], 2, &f, &err, &st))
			SKIP("fixture %s/train_expected.safetensors absent", names[k]);
		if (st == DL_OK)
		{
			fixture_config(&f, &cfg);
			cfg.warmup_steps = 0;
			cfg.eps = 1.0f;
			cfg.max_grad_norm = 0.0f;
			st = trainer_create(f.m, NULL, &cfg, NULL, 0, &whole, &err);
		}
		for (int r = 0; r < 3 && st == DL_OK; r++)
		{
			st = dl_model_load(fixture_path(names[k]), f.be, &mod[r], &err);
			if (st == DL_OK)
				st = trainer_create(mod[r], NULL, &cfg, NULL, 0, &tr[r], &err);
		}
		for (int step = 0; step < 2 && st == DL_OK; step++)
		{
			double		loss;
			int64_t		cnt[2],
						cnt_all,
						cnt_acc[2];
			size_t		n;
			float	   *g0,
					   *g1,
					   *ga,
					   *gw,
					   lr,
					   norm[4];

			st = trainer_backward(tr[0], f.ex, 1, &loss, &cnt[0], &err);
			if (st == DL_OK)
				st = trainer_backward(tr[1], f.ex + 1, f.n - 1, &loss, &cnt[1], &err);
			if (st == DL_OK)
				st = trainer_backward(tr[2], f.ex, 1, &loss, &cnt_acc[0], &err);
			if (st == DL_OK)
				st = trainer_backward(tr[2], f.ex + 1, f.n - 1, &loss, &cnt_acc[1], &err);
			if (st == DL_OK)
				st = trainer_backward(whole, f.ex, f.n, &loss, &cnt_all, &err);
			if (st != DL_OK)
				break;
			g0 = trainer_grads(tr[0], &n);
			g1 = trainer_grads(tr[1], &n);
			ga = trainer_grads(tr[2], &n);
			gw = trainer_grads(whole, &n);
			for (size_t i = 0; i < n; i++)
			{
				g0[i] += g1[i];
				g1[i] = g0[i];
				gdiff = fmax(gdiff, fmax(fabs((double) g0[i] - gw[i]), fabs((double) ga[i] - gw[i])));
				gmax = fmax(gmax, fabs(gw[i]));
			}
			for (int r = 0; r < 3 && st == DL_OK; r++)
				st = trainer_update(tr[r], cnt[0] + cnt[1], step, &lr, &norm[r], &err);
			if (st == DL_OK)
				st = trainer_update(whole, cnt_all, step, &lr, &norm[3], &err);
			if (st == DL_OK && (cnt[0] + cnt[1] != cnt_all || cnt_acc[0] != cnt[0] || cnt_acc[1] != cnt[1]))
				st = dl_fail(&err, DL_EINVAL, "label counts %lld + %lld != %lld",
							 (long long) cnt[0], (long long) cnt[1], (long long) cnt_all);
			for (int r = 0; r < 3; r++)
				ndiff = fmax(ndiff, fabs(norm[r] - norm[3]) / norm[3]);
		}
		if (st == DL_OK)
		{
			rank_diff = param_diff(mod[0], mod[1]);
			pdiff = param_diff(mod[0], f.m);
			adiff = param_diff(mod[2], f.m);
		}
		for (int r = 0; r < 3; r++)
		{
			trainer_free(tr[r]);
			dl_model_free(mod[r]);
		}
		trainer_free(whole);
		train_close(&f);
		CHECK_OK(st, &err);
		CHECKF(gdiff <= 1e-6 * gmax, "%s: summed gradients differ from the whole batch's by %g (largest %g)",
			   names[k], gdiff, gmax);
		CHECKF(ndiff <= 1e-6, "%s: the gradient norms differ by %g (relative)", names[k], ndiff);
		CHECKF(rank_diff == 0, "%s: the ranks' parameters differ by %g", names[k], rank_diff);
		CHECKF(pdiff <= 1e-7, "%s: two ranks and one batch differ by %g after 2 steps", names[k], pdiff);
		CHECKF(adiff <= 1e-7, "%s: two micro-batches and one batch differ by %g after 2 steps", names[k], adiff);
	}
}

/*
 * Tied embeddings: a model whose lm_head IS its embedding (as the loader sets it up when
 * tie_word_embeddings is true) gets, in that one tensor, the sum of the gradients the
 * untied model with equal tables gives its two tensors.
 */
TEST(train_tied_embeddings_sum_both_uses)
{
	train_fixture f;
	dl_train_config cfg;
	dl_model   *tied = NULL;
	dl_trainer *tu = NULL,
			   *tt = NULL;
	dl_error	err;
	dl_status	st;
	double		lu = 0,
				lt = 0,
				d = 0,
				maxg = 0;
	int64_t		nu,
				nt;
	size_t		table = 0;

	if (!train_open("neox-par-f32", 2, &f, &err, &st))
		SKIP("fixture neox-par-f32/train_expected.safetensors absent");
	if (st == DL_OK)
		st = dl_model_load(fixture_path("neox-par-f32"), f.be, &tied, &err);
	if (st == DL_OK)
	{
		table = (size_t) f.m->cfg.vocab_size * f.m->cfg.n_embd;
		/* equal tables in the untied model; the tied one points lm_head at wte */
		f.be->copy(f.be, f.m->p.lm_head, f.m->p.wte, table * sizeof(float));
		tied->p.lm_head = tied->p.wte;
		tied->cfg.tie_embeddings = true;
		fixture_config(&f, &cfg);
		st = trainer_create(f.m, NULL, &cfg, NULL, 0, &tu, &err);
	}
	if (st == DL_OK)
		st = trainer_create(tied, NULL, &cfg, NULL, 0, &tt, &err);
	if (st == DL_OK)
		st = trainer_backward(tu, f.ex, f.n, &lu, &nu, &err);
	if (st == DL_OK)
		st = trainer_backward(tt, f.ex, f.n, &lt, &nt, &err);
	if (st == DL_OK)
	{
		size_t		n;
		const float *gu = trainer_grads(tu, &n),
				   *gt = trainer_grads(tt, &n);
		size_t		wte = (size_t) ((const char *) f.m->p.wte - (const char *) f.m->param_mem) / sizeof(float),
					head = (size_t) ((const char *) f.m->p.lm_head - (const char *) f.m->param_mem) / sizeof(float);

		for (size_t i = 0; i < table; i++)
		{
			double		sum = (double) gu[wte + i] + gu[head + i];

			maxg = fmax(maxg, fabs(sum));
			d = fmax(d, fabs(gt[wte + i] - sum));
			/* nothing may land in the unused lm_head region of the tied model */
			d = fmax(d, fabs(gt[head + i]) * 1e6);
		}
	}
	trainer_free(tu);
	trainer_free(tt);
	dl_model_free(tied);
	train_close(&f);
	CHECK_OK(st, &err);
	CHECKF(lu == lt, "losses differ: %.9g untied, %.9g tied", lu, lt);
	CHECKF(d <= 1e-6 * maxg, "tied gradient differs from the sum by %g (largest %g)", d, maxg);
}

/* Evaluation gives the training pass's loss and leaves the gradients alone. */
TEST(train_eval_matches_backward_loss)
{
	train_fixture f;
	dl_train_config cfg;
	dl_trainer *tr = NULL;
	dl_error	err;
	dl_status	st;
	double		le = 0,
				lb = 0;
	int64_t		ne = 0,
				nb = 0;
	int			zero = 1;

	if (!train_open("gptj-f32", 2, &f, &err, &st))
		SKIP("fixture gptj-f32/train_expected.safetensors absent");
	if (st == DL_OK)
	{
		fixture_config(&f, &cfg);
		st = trainer_create(f.m, NULL, &cfg, NULL, 0, &tr, &err);
	}
	if (st == DL_OK)
		st = trainer_eval(tr, f.ex, f.n, &le, &ne, &err);
	if (st == DL_OK)
	{
		size_t		n;
		const float *g = trainer_grads(tr, &n);

		for (size_t i = 0; i < n; i++)
			zero &= g[i] == 0.0f;
		st = trainer_backward(tr, f.ex, f.n, &lb, &nb, &err);
	}
	trainer_free(tr);
	train_close(&f);
	CHECK_OK(st, &err);
	CHECK(zero);
	CHECKF(le == lb && ne == nb && ne > 0, "eval %.9g / %lld, backward %.9g / %lld",
		   le, (long long) ne, lb, (long long) nb);
}

/* Bytes of n floats as model_backward.c places them: rounded up to the alignment. */
static size_t
placed(const dl_backend *be, size_t n)
{
	return (n * sizeof(float) + be->alignment - 1) / be->alignment * be->alignment;
}

/* What one layer keeps besides its input, for T tokens (model_backward.c's layer_acts). */
static size_t
layer_act_bytes(const dl_model *m, size_t T)
{
	const dl_config *c = &m->cfg;
	size_t		E = c->n_embd,
				b;

	/* ln1 and its mean and rstd, qkv, att, lse, fc */
	b = placed(m->be, T * E) + 2 * placed(m->be, T) + placed(m->be, T * 3 * E) +
		placed(m->be, T * E) + placed(m->be, T * c->n_head) + placed(m->be, T * c->n_inner);
	if (c->arch == DL_ARCH_GPTNEOX)
		b += placed(m->be, T * E) + 2 * placed(m->be, T);
	if (config_block(c) == DL_BLOCK_SEQUENTIAL)
		b += placed(m->be, T * E);
	return b;
}

/*
 * Activation checkpointing on a fixture model: the activations shrink by n_layer - 1
 * layers' buffers, and over two steps (an update between them) the loss, the label
 * count and every gradient equal those without it bit for bit, as does evaluation's
 * loss, which recomputes nothing.
 */
static void
check_checkpoint(const char *name, int *failed_)
{
	train_fixture f;
	dl_train_config cfg;
	dl_model   *mc = NULL;
	dl_trainer *plain = NULL,
			   *ckpt = NULL;
	dl_train_acts *acts[2] = {NULL, NULL};
	dl_error	err;
	dl_status	st;
	size_t		bytes[2] = {0, 0},
				saving = 0;
	int			same = 1,
				step;

	if (!train_open(name, 2, &f, &err, &st))
		SKIP("fixture %s/train_expected.safetensors absent", name);
	for (int c = 0; c < 2 && st == DL_OK; c++)
	{
		st = dl_train_acts_create(f.m, NULL, f.tokens, f.m->cfg.max_pos, c, &acts[c], &err);
		if (st == DL_OK)
			bytes[c] = dl_train_acts_bytes(acts[c]);
	}
	if (st == DL_OK)
	{
		saving = (size_t) (f.m->cfg.n_layer - 1) * layer_act_bytes(f.m, f.tokens);
		st = dl_model_load(fixture_path(name), f.be, &mc, &err);
	}
	if (st == DL_OK)
	{
		fixture_config(&f, &cfg);
		st = trainer_create(f.m, NULL, &cfg, NULL, 0, &plain, &err);
		cfg.checkpoint = 1;
	}
	if (st == DL_OK)
		st = trainer_create(mc, NULL, &cfg, NULL, 0, &ckpt, &err);
	for (step = 0; step < 2 && st == DL_OK; step++)
	{
		double		lp,
					lc,
					ep,
					ec;
		int64_t		np,
					nc,
					enp,
					enc;
		size_t		n;
		float		lr,
					norm;

		st = trainer_backward(plain, f.ex, f.n, &lp, &np, &err);
		if (st == DL_OK)
			st = trainer_backward(ckpt, f.ex, f.n, &lc, &nc, &err);
		if (st == DL_OK)
		{
			const float *gp = trainer_grads(plain, &n);

			same = lp == lc && np == nc && memcmp(gp, trainer_grads(ckpt, &n), n * sizeof(float)) == 0;
		}
		if (st == DL_OK)
			st = trainer_update(plain, np, step, &lr, &norm, &err);
		if (st == DL_OK)
			st = trainer_update(ckpt, nc, step, &lr, &norm, &err);
		if (st == DL_OK)
			st = trainer_eval(plain, f.ex, f.n, &ep, &enp, &err);
		if (st == DL_OK)
			st = trainer_eval(ckpt, f.ex, f.n, &ec, &enc, &err);
		if (st == DL_OK)
			same &= ep == ec && enp == enc;
		if (!same)
			break;
	}
	for (int c = 0; c < 2; c++)
		dl_train_acts_free(acts[c]);
	trainer_free(plain);
	trainer_free(ckpt);
	dl_model_free(mc);
	train_close(&f);
	CHECK_OK(st, &err);
	CHECKF(same, "%s: step %d differs with checkpointing", name, step);
	CHECKF(bytes[0] - bytes[1] == saving && saving > 0,
		   "%s: activations of %zu bytes, %zu with checkpointing; expected %zu less",
		   name, bytes[0], bytes[1], saving);
}

TEST(train_checkpoint_gptj_f32)
{
	check_checkpoint("gptj-f32", failed_);
}

TEST(train_checkpoint_neox_par_f32)
{
	check_checkpoint("neox-par-f32", failed_);
}

TEST(train_checkpoint_neox_seq_f32)
{
	check_checkpoint("neox-seq-f32", failed_);
}

/* An allocation that always fails, as on a device without room. */
static void *
alloc_nothing(dl_backend *be, size_t bytes, dl_error *err)
{
	(void) be;
	dl_fail(err, DL_ENOMEM, "out of memory allocating %zu bytes", bytes);
	return NULL;
}

/* Without room for the activations, the hint says what checkpointing would need. */
TEST(train_acts_out_of_memory_suggests_checkpointing)
{
	train_fixture f;
	dl_train_acts *a = NULL;
	dl_error	err;
	dl_status	st;
	void	   *(*alloc) (dl_backend *, size_t, dl_error *);
	char		hint[2][sizeof(err.hint)];

	if (!train_open("gptj-f32", 1, &f, &err, &st))
		SKIP("fixture gptj-f32/train_expected.safetensors absent");
	CHECK_OK(st, &err);
	alloc = f.be->alloc;
	f.be->alloc = alloc_nothing;
	for (int c = 0; c < 2; c++)
	{
		if (dl_train_acts_create(f.m, NULL, 1 << 20, f.m->cfg.max_pos, c, &a, &err) != DL_ENOMEM)
			st = DL_EINVAL;
		snprintf(hint[c], sizeof(hint[c]), "%s", err.hint);
	}
	f.be->alloc = alloc;
	train_close(&f);
	CHECK(st == DL_OK);
	CHECKF(strstr(hint[0], "MB with checkpointing: turn it on") != NULL, "hint: %s", hint[0]);
	CHECKF(strstr(hint[1], "with checkpointing: lower the batch size") != NULL, "hint: %s", hint[1]);
}

/* Warmup from 0, then constant or linear decay to 0 at total_steps (and no further). */
TEST(train_schedule_warmup_then_constant_or_linear)
{
	train_fixture f;
	dl_error	err;
	dl_status	st;

	if (!train_open("gptj-f32", 1, &f, &err, &st))
		SKIP("fixture gptj-f32/train_expected.safetensors absent");
	for (int decay = 0; decay <= 1 && st == DL_OK; decay++)
	{
		dl_train_config cfg;
		dl_trainer *tr = NULL;

		fixture_config(&f, &cfg);
		cfg.lr = 2.0f;
		cfg.warmup_steps = 4;
		cfg.total_steps = 10;
		cfg.linear_decay = decay;
		st = trainer_create(f.m, NULL, &cfg, NULL, 0, &tr, &err);
		for (int s = 0; s < 13 && st == DL_OK; s++)
		{
			float		lr,
						norm;
			double		want = s < 4 ? s / 4.0 : !decay ? 1.0 : s < 10 ? (10 - s) / 6.0 : 0.0;

			/* zero gradients: the schedule alone, the parameters do not move */
			st = trainer_update(tr, 1, s, &lr, &norm, &err);
			if (st == DL_OK && (fabs(lr - 2.0 * want) > 1e-6 || norm != 0.0f))
				st = dl_fail(&err, DL_EINVAL, "decay %d step %d: lr %g, expected %g (norm %g)",
							 decay, s, lr, 2.0 * want, norm);
		}
		trainer_free(tr);
	}
	train_close(&f);
	CHECK_OK(st, &err);
}

/* Batches and settings the trainer must refuse, with the reason. */
TEST(train_rejects_bad_input)
{
	train_fixture f;
	dl_train_config cfg;
	dl_trainer *tr = NULL;
	dl_error	err;
	dl_status	st;
	int32_t		ids[8] = {1, 2, 3, 4, 5, 6, 7, 8};
	dl_example	ex = {ids, 8, 4};
	double		loss;
	int64_t		nl;
	float		lr,
				norm;
	struct
	{
		int			n;
		int			first;
		int32_t		id;
		const char *what;
	}			bad[] = {
		{8, 0, 1, "first label"},
		{8, 9, 1, "first label"},
		{0, 1, 1, "has 0 tokens"},
		{8, 4, 100000, "token id"},
		{8, 4, -1, "token id"},
	};

	if (!train_open("gptj-f32", 1, &f, &err, &st))
		SKIP("fixture gptj-f32/train_expected.safetensors absent");
	CHECK_OK(st, &err);
	fixture_config(&f, &cfg);
	cfg.max_tokens = 12;
	cfg.max_length = 10;
	st = trainer_create(f.m, NULL, &cfg, NULL, 0, &tr, &err);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]) && st == DL_OK; i++)
	{
		dl_example	e = {ids, bad[i].n, bad[i].first};

		ids[5] = bad[i].id;
		if (trainer_backward(tr, &e, 1, &loss, &nl, &err) != DL_EINVAL || !strstr(err.msg, bad[i].what))
			st = dl_fail(&err, DL_EINVAL, "case %zu (%s) was not refused as expected", i, bad[i].what);
		ids[5] = 6;
	}
	if (st == DL_OK)
	{
		dl_example	two[2] = {ex, ex};
		dl_example	longer = {ids, 11, 4};
		int32_t		many[11] = {0};

		longer.ids = many;
		if (trainer_backward(tr, two, 2, &loss, &nl, &err) != DL_EINVAL || !strstr(err.msg, "exceeds the limit of 12"))
			st = dl_fail(&err, DL_EINVAL, "a batch over max_tokens was not refused");
		else if (trainer_backward(tr, &longer, 1, &loss, &nl, &err) != DL_EINVAL || !strstr(err.msg, "the limit is 10"))
			st = dl_fail(&err, DL_EINVAL, "an example over max_length was not refused");
		else if (trainer_update(tr, 0, 0, &lr, &norm, &err) != DL_EINVAL || !strstr(err.msg, "no label tokens"))
			st = dl_fail(&err, DL_EINVAL, "an update without labels was not refused");
	}
	/* no label at all is not an error: nothing to learn from, loss 0 */
	if (st == DL_OK)
	{
		ex.first_label = 8;
		st = trainer_backward(tr, &ex, 1, &loss, &nl, &err);
		if (st == DL_OK && (loss != 0.0 || nl != 0))
			st = dl_fail(&err, DL_EINVAL, "an example without labels gave loss %g over %lld", loss, (long long) nl);
	}
	trainer_free(tr);
	tr = NULL;
	if (st == DL_OK)
	{
		cfg.max_length = f.m->cfg.max_pos + 1;
		if (trainer_create(f.m, NULL, &cfg, NULL, 0, &tr, &err) != DL_EINVAL || !strstr(err.msg, "positions"))
			st = dl_fail(&err, DL_EINVAL, "max_length over the model's positions was not refused");
		trainer_free(tr);
		tr = NULL;
	}
	if (st == DL_OK)
	{
		cfg.max_length = 10;
		cfg.lr = -1.0f;
		if (trainer_create(f.m, NULL, &cfg, NULL, 0, &tr, &err) != DL_EINVAL || !strstr(err.msg, "learning rate"))
			st = dl_fail(&err, DL_EINVAL, "a negative learning rate was not refused");
		trainer_free(tr);
	}
	train_close(&f);
	CHECK_OK(st, &err);
}
