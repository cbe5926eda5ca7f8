/*
 * dolly_cli.c: the engine without PostgreSQL: generate text from a model directory,
 * benchmark it, make a random model, fine-tune one on a JSON-lines file, convert one to
 * safetensors, merge a LoRA adapter into one. This file reads the options and runs the commands that read a model;
 * dolly_cli_train.c has those that write one.
 *
 *   dolly-cli generate --model DIR [options] INSTRUCTION
 *   dolly-cli bench --model DIR [--threads N] [--prompt-tokens 512] [--gen-tokens 64] [--batch B]
 *   dolly-cli bench-gemm --model DIR [--threads N] [--prompt-tokens 512]
 *   dolly-cli load --model DIR [--device cpu|cuda[:N]] [--threads N] [--bf16]
 *   dolly-cli init --arch gpt_neox|gptj --layers N --hidden H --heads A [options]
 *                  --tokenizer FILE --out DIR
 *   dolly-cli train --model DIR --data FILE.jsonl --out DIR [options]
 *   dolly-cli logits --model DIR --out FILE.safetensors TEXT
 *   dolly-cli convert --model DIR --out DIR
 *   dolly-cli merge --model BASE_DIR --adapter ADAPTER_DIR --out DIR
 *
 * generate answers by Dolly's pipeline (pipeline.h: the template unless --raw, the stop
 * token, the response read out), as the model server does, on stdout; the prefill and
 * decode speeds on stderr. bench prints
 * one line "prefill_tok_s=X decode_tok_s=Y batch=B threads=N" (seeded random prompt ids;
 * the B prompts prefill in one pass, then B sequences decode together: aggregate tokens/s). bench-gemm times the
 * matrix products of a prefill through the backend against cblas_sgemm itself on the same
 * shapes, and the share of a prefill spent in them. load only loads the model and prints one
 * line "load_s=X peak_rss_mb=Y param_mb=Z" (tests/bench/bench_load.py).
 *
 * logits writes the ids and logits of a raw text (ids I32 [T], logits F32 [T, V]) for
 * tests/check_saved_model.py. init, train, convert and merge write model directories
 * (dolly_cli_train.c).
 */
#include "dolly_cli.h"
#include "cuda_plugin.h"
#include "generate.h"
#include "model.h"
#include "pipeline.h"
#include "prompt.h"
#include "safetensors.h"
#include "sampler.h"
#include "sysinfo.h"
#include "tokenizer.h"

#include <cblas.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Print the usage text to f. */
static void
usage(FILE *f)
{
	fprintf(f,
			"usage:\n"
			"  dolly-cli generate --model DIR [--device cpu|cuda[:N]] [--threads N] [--bf16] [--max-new-tokens N]\n"
			"                     [--temperature T] [--top-p P] [--top-k K] [--greedy] [--seed S]\n"
			"                     [--context TEXT] [--raw] INSTRUCTION\n"
			"  dolly-cli bench --model DIR [--device cpu|cuda[:N]] [--threads N] [--bf16] [--prompt-tokens N]\n"
			"                  [--gen-tokens N] [--batch B]\n"
			"  dolly-cli bench-gemm --model DIR [--threads N] [--prompt-tokens N]\n"
			"  dolly-cli load --model DIR [--device cpu|cuda[:N]] [--threads N] [--bf16]\n"
			"  dolly-cli init --arch gpt_neox|gptj --layers N --hidden H --heads A [--inner F]\n"
			"                 [--context C] [--rotary-pct P] [--tie-embeddings] --tokenizer FILE\n"
			"                 [--seed S] --out DIR\n"
			"  dolly-cli train --model DIR --data FILE.jsonl --out DIR [--device cpu|cuda[:N]] [--epochs 2]\n"
			"                  [--lr 5e-6] [--batch-size 8] [--max-length N] [--max-tokens N] [--warmup 50]\n"
			"                  [--seed 42] [--eval-fraction 0.05] [--threads N] [--checkpoint]\n"
			"                  [--lora [--lora-rank 8] [--lora-alpha 16] [--lora-dropout 0.05]\n"
			"                   [--lora-targets q_proj,v_proj]]\n"
			"  dolly-cli logits --model DIR --out FILE.safetensors [--threads N] [--bf16] TEXT\n"
			"  dolly-cli convert --model DIR --out DIR\n"
			"  dolly-cli merge --model BASE_DIR --adapter ADAPTER_DIR --out DIR\n"
			"  (--bf16: the CPU keeps the matrices in bfloat16, half the memory;\n"
			"   --adapter DIR: generate, logits and bench run a PEFT LoRA adapter of the model;\n"
			"   bench takes up to 8, one per sequence in turn, and the model alone for one more;\n"
			"   merge writes the model with the adapter merged into its weights, as PEFT's\n"
			"   merge_and_unload, in the base's dtypes and shards)\n");
}

int
report(const dl_error *err)
{
	fprintf(stderr, "dolly-cli: %s\n", err->msg);
	if (err->hint[0])
		fprintf(stderr, "hint: %s\n", err->hint);
	return 1;
}

int
parse_long(const char *opt, const char *s, long long lo, long long hi, long long *out)
{
	char	   *end;

	errno = 0;
	*out = strtoll(s, &end, 10);
	if (errno || end == s || *end || *out < lo || *out > hi)
	{
		fprintf(stderr, "dolly-cli: %s must be a whole number in [%lld, %lld], not \"%s\"\n", opt, lo, hi, s);
		return 1;
	}
	return 0;
}

/* Parse a float for option opt; 0 on success (ranges are the sampler's to check). */
static int
parse_float(const char *opt, const char *s, float *out)
{
	char	   *end;

	errno = 0;
	*out = strtof(s, &end);
	if (errno || end == s || *end)
	{
		fprintf(stderr, "dolly-cli: %s must be a number, not \"%s\"\n", opt, s);
		return 1;
	}
	return 0;
}

/* Fill o from argv[2..]; 0 on success. */
static int
parse_options(int argc, char **argv, options *o)
{
	long long	v;

	*o = (options) {
		.threads = sys_cpu_count(), .cuda_device = -1, .max_new = 256,
		/* Dolly's pipeline defaults: sampling, top_p 0.92, no top-k */
		.sampling = {1, 1.0f, 0, 0.92f},
		.seed = (uint64_t) time(NULL),
		.prompt_tokens = 512, .gen_tokens = 64, .batch = 1,
		.rotary_pct = 0.25f,
		/* Dolly v2's recipe where it does not depend on the model's size */
		.epochs = 2, .lr = -1, .batch_size = 8, .warmup = -1, .eval_fraction = 0.05f
	};
	lora_defaults(&o->lora_cfg);
	for (int i = 2; i < argc; i++)
	{
		const char *a = argv[i];
		const char *val = i + 1 < argc ? argv[i + 1] : NULL;
		int			bad = 0;

		if (strcmp(a, "--greedy") == 0)
		{
			o->sampling.do_sample = 0;
			continue;
		}
		if (strcmp(a, "--raw") == 0)
		{
			o->raw = 1;
			continue;
		}
		if (strcmp(a, "--tie-embeddings") == 0)
		{
			o->tie = 1;
			continue;
		}
		if (strcmp(a, "--checkpoint") == 0)
		{
			o->checkpoint = 1;
			continue;
		}
		if (strcmp(a, "--bf16") == 0)
		{
			o->bf16 = 1;
			continue;
		}
		if (strcmp(a, "--lora") == 0)
		{
			o->lora = 1;
			continue;
		}
		if (strncmp(a, "--", 2) != 0)
		{
			if (o->instruction)
			{
				fprintf(stderr, "dolly-cli: unexpected argument \"%s\" (quote the instruction)\n", a);
				return 1;
			}
			o->instruction = a;
			continue;
		}
		if (val == NULL)
		{
			fprintf(stderr, "dolly-cli: %s needs a value\n", a);
			return 1;
		}
		i++;
		if (strcmp(a, "--model") == 0)
			o->model = val;
		else if (strcmp(a, "--context") == 0)
			o->context = val;
		else if (strcmp(a, "--threads") == 0)
			bad = parse_long(a, val, 1, 1024, &v), o->threads = (int) v;
		else if (strcmp(a, "--device") == 0)
		{
			/* cpu, cuda or cuda:N */
			o->cuda_device = -1;
			if (strncmp(val, "cuda", 4) == 0 && val[4] == '\0')
				o->cuda_device = 0;
			else if (strncmp(val, "cuda:", 5) == 0)
				bad = parse_long(a, val + 5, 0, 63, &v), o->cuda_device = (int) v;
			else if (strcmp(val, "cpu") != 0)
			{
				fprintf(stderr, "dolly-cli: --device must be cpu, cuda or cuda:N, not \"%s\"\n", val);
				bad = 1;
			}
		}
		else if (strcmp(a, "--max-new-tokens") == 0)
			bad = parse_long(a, val, 1, 1 << 20, &v), o->max_new = (int) v;
		else if (strcmp(a, "--top-k") == 0)
			bad = parse_long(a, val, 0, 1 << 30, &v), o->sampling.top_k = (int) v;
		else if (strcmp(a, "--seed") == 0)
			bad = parse_long(a, val, 0, INT64_MAX, &v), o->seed = (uint64_t) v, o->seed_given = 1;
		else if (strcmp(a, "--prompt-tokens") == 0)
			bad = parse_long(a, val, 1, 1 << 20, &v), o->prompt_tokens = (int) v;
		else if (strcmp(a, "--gen-tokens") == 0)
			bad = parse_long(a, val, 1, 1 << 20, &v), o->gen_tokens = (int) v;
		else if (strcmp(a, "--batch") == 0)
			bad = parse_long(a, val, 1, 4096, &v), o->batch = (int) v;
		else if (strcmp(a, "--temperature") == 0)
			bad = parse_float(a, val, &o->sampling.temperature);
		else if (strcmp(a, "--top-p") == 0)
			bad = parse_float(a, val, &o->sampling.top_p);
		else if (strcmp(a, "--arch") == 0)
			o->arch = val;
		else if (strcmp(a, "--layers") == 0)
			bad = parse_long(a, val, 1, 1024, &v), o->layers = (int) v;
		else if (strcmp(a, "--hidden") == 0)
			bad = parse_long(a, val, 1, 1 << 16, &v), o->hidden = (int) v;
		else if (strcmp(a, "--heads") == 0)
			bad = parse_long(a, val, 1, 1024, &v), o->heads = (int) v;
		else if (strcmp(a, "--inner") == 0)
			bad = parse_long(a, val, 1, 1 << 18, &v), o->inner = (int) v;
		else if (strcmp(a, "--rotary-pct") == 0)
			bad = parse_float(a, val, &o->rotary_pct);
		else if (strcmp(a, "--tokenizer") == 0)
			o->tokenizer = val;
		else if (strcmp(a, "--out") == 0)
			o->out = val;
		else if (strcmp(a, "--data") == 0)
			o->data = val;
		else if (strcmp(a, "--epochs") == 0)
			bad = parse_long(a, val, 1, 10000, &v), o->epochs = (int) v;
		else if (strcmp(a, "--lr") == 0)
			bad = parse_float(a, val, &o->lr);
		else if (strcmp(a, "--batch-size") == 0)
			bad = parse_long(a, val, 1, 4096, &v), o->batch_size = (int) v;
		else if (strcmp(a, "--max-length") == 0)
			bad = parse_long(a, val, 2, 1 << 20, &v), o->max_length = (int) v;
		else if (strcmp(a, "--max-tokens") == 0)
			bad = parse_long(a, val, 1, 1 << 24, &v), o->max_tokens = (int) v;
		else if (strcmp(a, "--warmup") == 0)
			bad = parse_long(a, val, 0, 100000000, &v), o->warmup = (int) v;
		else if (strcmp(a, "--eval-fraction") == 0)
			bad = parse_float(a, val, &o->eval_fraction);
		else if (strcmp(a, "--adapter") == 0)
		{
			if (o->nadapters == 8)
			{
				fprintf(stderr, "dolly-cli: at most 8 adapters\n");
				return 1;
			}
			o->adapters[o->nadapters++] = val;
		}
		else if (strcmp(a, "--lora-rank") == 0)
			bad = parse_long(a, val, 1, DL_LORA_MAX_RANK, &v), o->lora_cfg.r = (int) v;
		else if (strcmp(a, "--lora-alpha") == 0)
			bad = parse_float(a, val, &o->lora_cfg.alpha);
		else if (strcmp(a, "--lora-dropout") == 0)
			bad = parse_float(a, val, &o->lora_cfg.dropout);
		else if (strcmp(a, "--lora-targets") == 0)
		{
			char		list[256],
					   *save = NULL;

			snprintf(list, sizeof(list), "%s", val);
			o->lora_cfg.ntargets = 0;
			for (char *t = strtok_r(list, ",", &save); t && !bad; t = strtok_r(NULL, ",", &save))
				if (o->lora_cfg.ntargets == DL_LORA_MAX_TARGETS)
				{
					fprintf(stderr, "dolly-cli: --lora-targets takes at most %d modules\n", DL_LORA_MAX_TARGETS);
					bad = 1;
				}
				else
					snprintf(o->lora_cfg.targets[o->lora_cfg.ntargets++], 32, "%s", t);
		}
		else
		{
			fprintf(stderr, "dolly-cli: unknown option \"%s\"\n", a);
			return 1;
		}
		if (bad)
			return 1;
	}
	if (o->model == NULL && strcmp(argv[1], "init") != 0)
	{
		fprintf(stderr, "dolly-cli: --model DIR is required\n");
		return 1;
	}
	return 0;
}

/*
 * The backend o asks for; 0 on success. On a GPU, mode says how: bfloat16 to generate,
 * mixed (float32 master weights, bfloat16 products) to train.
 */
static int
backend(const options *o, dl_cuda_mode mode, dl_backend **be, dl_error *err)
{
	/* the CUDA plugin: $DOLLY_CUDA_PLUGIN, else the one built next to us (make) */
	const char *plugin = getenv("DOLLY_CUDA_PLUGIN") ? getenv("DOLLY_CUDA_PLUGIN") : "./" DL_CUDA_PLUGIN_FILE;

	if ((o->cuda_device >= 0 ? backend_cuda_create(plugin, o->cuda_device, mode, be, err)
		 : backend_cpu_create(o->threads, o->bf16, be, err)) != DL_OK)
		return report(err);
	return 0;
}

/* What was loaded, and how long it took since t0. */
static void
loaded(const options *o, const dl_model *m, double t0)
{
	fprintf(stderr, "loaded %s: %s, %d layers, width %d, vocabulary %d, %zu MB, %.2f s, %d threads\n",
			o->model, config_arch_name(m->cfg.arch), m->cfg.n_layer, m->cfg.n_embd,
			m->cfg.vocab_size, m->param_bytes >> 20, sys_now_s() - t0, o->threads);
}

int
load(const options *o, dl_cuda_mode mode, dl_backend **be, dl_model **m, dl_error *err)
{
	double		t0 = sys_now_s();

	if (backend(o, mode, be, err))
		return 1;
	if (dl_model_load(o->model, *be, m, err) != DL_OK)
		return report(err);
	loaded(o, *m, t0);
	return 0;
}

int
load_adapters(const options *o, const dl_model *m, dl_lora **out, dl_error *err)
{
	for (int i = 0; i < o->nadapters; i++)
		if (dl_lora_load(m, o->adapters[i], &out[i], err) != DL_OK)
		{
			while (i-- > 0)
				dl_lora_free(out[i]);
			return report(err);
		}
	return 0;
}

/* generate: one instruction through Dolly's pipeline (or --raw, a continuation), on stdout. */
static int
cmd_generate(const options *o)
{
	dl_error	err;
	dl_backend *be = NULL;
	dl_pipeline *p = NULL,
			   *tp = NULL,
			   *text;
	dl_kv_cache *c = NULL;
	dl_generator *g = NULL;
	char	   *answer = NULL;
	int32_t    *ids = NULL;
	dl_lora    *lora[8] = {NULL};
	int			n_ids,
				n_gen,
				id,
				rc = 1;
	double		t0 = sys_now_s(),
				t1,
				t2;
	dl_gen_request req;

	if (o->instruction == NULL)
	{
		fprintf(stderr, "dolly-cli: generate needs an INSTRUCTION\n");
		return 1;
	}
	if (o->raw && o->context)
	{
		fprintf(stderr, "dolly-cli: --context needs the Dolly template; leave out --raw\n");
		return 1;
	}
	if (backend(o, DL_CUDA_BF16, &be, &err))
		goto done;
	if (pipeline_open(o->model, be, NULL, NULL, &p, &err) != DL_OK)
	{
		report(&err);
		goto done;
	}
	loaded(o, p->model, t0);
	if (load_adapters(o, p->model, lora, &err))
		goto done;
	/* an adapter with token rows brings its tokenizer, which has their tokens (lora.h) */
	if ((lora[0] && lora[0]->ntok &&
		 pipeline_open(o->adapters[0], NULL, NULL, NULL, &tp, &err) != DL_OK) ||
		pipeline_prompt(text = tp ? tp : p, o->instruction, o->context, o->raw, &ids, &n_ids,
						&err) != DL_OK)
	{
		report(&err);
		goto done;
	}
	req = (dl_gen_request) {ids, n_ids, o->max_new, pipeline_stop_id(text, o->raw), o->sampling,
	o->seed, lora[0]};
	/* a cache just long enough; a prompt beyond the model's context fails in gen_add */
	if (dl_kv_cache_create(p->model, 1, n_ids + o->max_new < p->model->cfg.max_pos ? n_ids + o->max_new : p->model->cfg.max_pos,
						   512, &c, &err) != DL_OK ||
		gen_create(p->model, c, &g, &err) != DL_OK ||
		gen_add(g, &req, &id, &err) != DL_OK)
	{
		report(&err);
		goto done;
	}

	t0 = sys_now_s();
	while (gen_pending_prompt(g, id) > 0)
		if (gen_step(g, &err) != DL_OK)
		{
			report(&err);
			goto done;
		}
	t1 = sys_now_s();
	while (gen_running(g))
		if (gen_step(g, &err) != DL_OK)
		{
			report(&err);
			goto done;
		}
	t2 = sys_now_s();

	(void) gen_tokens(g, id, &n_gen);
	if (pipeline_answer(text, gen_prompt(g, id, &n_ids), n_ids, n_gen, o->raw, &answer, &err) != DL_OK)
	{
		report(&err);
		goto done;
	}
	printf("%s\n", answer);
	fprintf(stderr, "prefill: %d tokens, %.1f tokens/s; decode: %d tokens, %.1f tokens/s\n",
			n_ids, n_ids / (t1 - t0), n_gen - 1, n_gen > 1 ? (n_gen - 1) / (t2 - t1) : 0.0);
	rc = 0;
done:
	free(answer);
	free(ids);
	gen_free(g);
	dl_kv_cache_free(c);
	for (int i = 0; i < o->nadapters; i++)
		dl_lora_free(lora[i]);
	pipeline_close(tp);
	pipeline_close(p);
	if (be)
		be->destroy(be);
	return rc;
}

/* Seeded random prompt ids in [0, V). */
static void
random_ids(int32_t *ids, int n, int V, uint64_t seed)
{
	dl_rng		rng;

	rng_seed(&rng, seed);
	for (int i = 0; i < n; i++)
		ids[i] = (int32_t) (rng_next(&rng) % (uint64_t) V);
}

/* bench: prefill and batched decode tokens/s on random prompts. */
static int
cmd_bench(const options *o)
{
	dl_error	err;
	dl_backend *be = NULL;
	dl_model   *m = NULL;
	dl_kv_cache *c = NULL;
	dl_generator *g = NULL;
	int32_t    *ids = NULL;
	dl_lora    *lora[8] = {NULL};
	int			rc = 1,
				B = o->batch,
				P = o->prompt_tokens;
	double		t0,
				t1,
				t2;

	if (load(o, DL_CUDA_BF16, &be, &m, &err) || load_adapters(o, m, lora, &err))
		goto done;
	ids = malloc((size_t) B * P * sizeof(int32_t));
	if (ids == NULL)
		goto done;
	random_ids(ids, B * P, m->cfg.vocab_size, 1234);
	/* room for all prompts in one pass: the first step is pure prefill */
	if (dl_kv_cache_create(m, B, P + o->gen_tokens, B * P, &c, &err) != DL_OK ||
		gen_create(m, c, &g, &err) != DL_OK)
	{
		report(&err);
		goto done;
	}
	for (int b = 0; b < B; b++)
	{
		/* with adapters, sequence b runs adapter b mod (n + 1), the last of each turn none */
		dl_gen_request req = {ids + (size_t) b * P, P, o->gen_tokens, -1, {0, 1.0f, 0, 1.0f}, 0,
		lora[b % (o->nadapters + 1)]};
		int			id;

		if (gen_add(g, &req, &id, &err) != DL_OK)
		{
			report(&err);
			goto done;
		}
	}
	t0 = sys_now_s();
	if (gen_step(g, &err) != DL_OK)
	{
		report(&err);
		goto done;
	}
	t1 = sys_now_s();
	/* every sequence has its first token: the rest are batched decode steps */
	while (gen_running(g))
		if (gen_step(g, &err) != DL_OK)
		{
			report(&err);
			goto done;
		}
	t2 = sys_now_s();
	printf("prefill_tok_s=%.1f decode_tok_s=%.1f batch=%d threads=%d adapters=%d\n",
		   (double) B * P / (t1 - t0),
		   o->gen_tokens > 1 ? (double) B * (o->gen_tokens - 1) / (t2 - t1) : 0.0, B, o->threads,
		   o->nadapters);
	rc = 0;
done:
	free(ids);
	gen_free(g);
	dl_kv_cache_free(c);
	for (int i = 0; i < o->nadapters; i++)
		dl_lora_free(lora[i]);
	dl_model_free(m);
	if (be)
		be->destroy(be);
	return rc;
}

/* Best-of-reps seconds of one matrix product through the backend (threads of its pool). */
static double
time_ours(dl_backend *be, float *out, const float *in, const float *W, int M, int K, int N, int reps)
{
	double		best = 1e30;

	for (int r = 0; r < reps; r++)
	{
		double		t0 = sys_now_s();

		be->matmul_forward(be, out, in, W, NULL, M, K, N, 0);
		t0 = sys_now_s() - t0;
		best = t0 < best ? t0 : best;
	}
	return best;
}

/* Best-of-reps seconds of the same product as one cblas_sgemm call. */
static double
time_cblas(float *out, const float *in, const float *W, int M, int K, int N, int reps)
{
	double		best = 1e30;

	for (int r = 0; r < reps; r++)
	{
		double		t0 = sys_now_s();

		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, in, K, W, K, 0.0f, out, N);
		t0 = sys_now_s() - t0;
		best = t0 < best ? t0 : best;
	}
	return best;
}

/*
 * bench-gemm: the prefill's matrix products (qkv, projection, MLP in and out; M = the
 * prompt's tokens) through the backend against cblas_sgemm with OpenBLAS running its own
 * `threads` threads, and the share of a whole prefill they take.
 */
static int
cmd_bench_gemm(const options *o)
{
	dl_error	err;
	dl_backend *be = NULL;
	dl_model   *m = NULL;
	dl_kv_cache *c = NULL;
	float	   *in = NULL,
			   *W = NULL,
			   *out = NULL,
			   *lg = NULL;
	int32_t    *ids = NULL;
	int			rc = 1,
				M = o->prompt_tokens,
				reps = 5;
	double		ours_total = 0,
				cblas_total = 0,
				flops_total = 0,
				prefill = 1e30;
	int			shapes[4][2];
	dl_rng		rng;

	if (load(o, DL_CUDA_BF16, &be, &m, &err))
		goto done;
	{
		int			E = m->cfg.n_embd,
					F = m->cfg.n_inner;
		int			s[4][2] = {{E, 3 * E}, {E, E}, {E, F}, {F, E}};

		memcpy(shapes, s, sizeof(shapes));
	}
	in = malloc((size_t) M * m->cfg.n_inner * sizeof(float));
	W = malloc((size_t) 3 * m->cfg.n_embd * m->cfg.n_inner * sizeof(float));
	out = malloc((size_t) M * 3 * m->cfg.n_inner * sizeof(float));
	ids = malloc(M * sizeof(int32_t));
	lg = malloc((size_t) m->cfg.vocab_size * sizeof(float));
	if (!in || !W || !out || !ids || !lg)
		goto done;
	rng_seed(&rng, 1);
	for (size_t i = 0; i < (size_t) M * m->cfg.n_inner; i++)
		in[i] = rng_uniformf(&rng) - 0.5f;
	for (size_t i = 0; i < (size_t) 3 * m->cfg.n_embd * m->cfg.n_inner; i++)
		W[i] = (rng_uniformf(&rng) - 0.5f) * 0.1f;

	for (int s = 0; s < 4; s++)
	{
		int			K = shapes[s][0],
					N = shapes[s][1];
		double		flops = 2.0 * M * K * N,
					t_ours,
					t_blas;

		t_ours = time_ours(be, out, in, W, M, K, N, reps);
		/* the CPU backend keeps OpenBLAS single-threaded; give it the threads for its run */
		openblas_set_num_threads(o->threads);
		t_blas = time_cblas(out, in, W, M, K, N, reps);
		openblas_set_num_threads(1);
		printf("gemm M=%d K=%d N=%d ours_gflops=%.1f cblas_gflops=%.1f ratio=%.3f\n",
			   M, K, N, flops / t_ours * 1e-9, flops / t_blas * 1e-9, t_blas / t_ours);
		ours_total += t_ours * m->cfg.n_layer;
		cblas_total += t_blas * m->cfg.n_layer;
		flops_total += flops * m->cfg.n_layer;
	}

	random_ids(ids, M, m->cfg.vocab_size, 1234);
	if (dl_kv_cache_create(m, 1, M, M, &c, &err) != DL_OK)
	{
		report(&err);
		goto done;
	}
	for (int r = 0; r < 3; r++)
	{
		dl_seq		s = {0, 0, M, ids, DL_LOGITS_LAST, NULL};
		double		t0 = sys_now_s();

		if (dl_model_forward(m, c, &s, 1, lg, &err) != DL_OK)
		{
			report(&err);
			goto done;
		}
		t0 = sys_now_s() - t0;
		prefill = t0 < prefill ? t0 : prefill;
	}
	printf("gemm_total ours_gflops=%.1f cblas_gflops=%.1f ratio=%.3f prefill_s=%.4f matmul_share=%.3f threads=%d\n",
		   flops_total / ours_total * 1e-9, flops_total / cblas_total * 1e-9,
		   cblas_total / ours_total, prefill, ours_total / prefill, o->threads);
	rc = 0;
done:
	free(in);
	free(W);
	free(out);
	free(ids);
	free(lg);
	dl_kv_cache_free(c);
	dl_model_free(m);
	if (be)
		be->destroy(be);
	return rc;
}

double
peak_rss_mb(void)
{
	FILE	   *f = fopen("/proc/self/status", "r");
	char		line[256];
	double		mb = -1;
	long		kb;

	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "VmHWM: %ld kB", &kb) == 1)
			mb = kb / 1024.0;
	if (f)
		fclose(f);
	return mb;
}

/* load: the time and peak memory of loading the model, nothing else. */
static int
cmd_load(const options *o)
{
	dl_error	err;
	dl_backend *be = NULL;
	dl_model   *m = NULL;
	double		t0 = sys_now_s();
	int			rc = load(o, DL_CUDA_BF16, &be, &m, &err);

	if (rc == 0)
		printf("load_s=%.3f peak_rss_mb=%.1f param_mb=%.1f\n", sys_now_s() - t0, peak_rss_mb(),
			   m->param_bytes / 1048576.0);
	dl_model_free(m);
	if (be)
		be->destroy(be);
	return rc;
}

/* logits: the ids and logits of a raw text, into a safetensors file. */
static int
cmd_logits(const options *o)
{
	dl_error	err;
	dl_backend *be = NULL;
	dl_model   *m = NULL;
	dl_tokenizer *tok = NULL;
	dl_kv_cache *c = NULL;
	dl_lora    *lora[8] = {NULL};
	int32_t    *ids = NULL;
	float	   *lg = NULL;
	int			n,
				rc = 1;

	if (o->instruction == NULL || o->out == NULL)
	{
		fprintf(stderr, "dolly-cli: logits needs --out FILE.safetensors and a TEXT\n");
		return 1;
	}
	if (load(o, DL_CUDA_BF16, &be, &m, &err) || load_adapters(o, m, lora, &err))
		goto done;
	if (tok_load_dir(lora[0] && lora[0]->ntok ? o->adapters[0] : o->model, &tok, &err) != DL_OK ||
		tok_encode(tok, o->instruction, strlen(o->instruction), &ids, &n, &err) != DL_OK)
	{
		report(&err);
		goto done;
	}
	if (n < 1 || n > m->cfg.max_pos)
	{
		fprintf(stderr, "dolly-cli: the text has %d tokens; the model takes 1 to %d\n", n, m->cfg.max_pos);
		goto done;
	}
	lg = malloc((size_t) n * m->cfg.vocab_size * sizeof(float));
	if (lg == NULL)
	{
		fprintf(stderr, "dolly-cli: out of memory\n");
		goto done;
	}
	{
		dl_seq		s = {0, 0, n, ids, DL_LOGITS_ALL, lora[0]};
		st_write_tensor t[2] = {
			{"ids", ST_I32, 1, {n}, ids},
			{"logits", ST_F32, 2, {n, m->cfg.vocab_size}, lg},
		};

		if (dl_kv_cache_create(m, 1, n, n, &c, &err) != DL_OK ||
			dl_model_forward(m, c, &s, 1, lg, &err) != DL_OK ||
			st_write(o->out, t, 2, NULL, 0, &err) != DL_OK)
		{
			report(&err);
			goto done;
		}
	}
	rc = 0;
done:
	free(lg);
	free(ids);
	dl_kv_cache_free(c);
	for (int i = 0; i < o->nadapters; i++)
		dl_lora_free(lora[i]);
	tok_free(tok);
	dl_model_free(m);
	if (be)
		be->destroy(be);
	return rc;
}

int
main(int argc, char **argv)
{
	options		o;

	if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)
	{
		usage(argc < 2 ? stderr : stdout);
		return argc < 2 ? 2 : 0;
	}
	if (parse_options(argc, argv, &o))
	{
		usage(stderr);
		return 2;
	}
	if (strcmp(argv[1], "generate") == 0)
		return cmd_generate(&o);
	if (strcmp(argv[1], "bench") == 0)
		return cmd_bench(&o);
	if (strcmp(argv[1], "bench-gemm") == 0)
		return cmd_bench_gemm(&o);
	if (strcmp(argv[1], "load") == 0)
		return cmd_load(&o);
	if (strcmp(argv[1], "init") == 0)
		return cmd_init(&o);
	if (strcmp(argv[1], "train") == 0)
		return cmd_train(&o);
	if (strcmp(argv[1], "logits") == 0)
		return cmd_logits(&o);
	if (strcmp(argv[1], "convert") == 0)
		return cmd_convert(&o);
	if (strcmp(argv[1], "merge") == 0)
		return cmd_merge(&o);
	fprintf(stderr, "dolly-cli: unknown command \"%s\"\n", argv[1]);
	usage(stderr);
	return 2;
}
